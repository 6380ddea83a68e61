"""--mode=import_keras: a classifier trained in Keras becomes a workdir.

    python main.py --mode=import_keras --keras_model=model.h5 --workdir=W [--config=...]

The file is a whole-model .h5 (`model.save('model.h5')`, as the Keras tutorial saves), a Keras 3
`.keras` file, or a weights-only .h5 (`save_weights`); `hhjax.weights.keras_model` reads it.
The workdir gets `config.json` and a checkpoint at step 0, from which `--mode=eval`,
`--mode=predict`, `--mode=export` and `--mode=train` run as from one of ours:

* the config is --config (or configs/default.py) with what the file says put in:
  config.model.cut, head, hidden and dropout, config.data.image_size (and, from files hhjax
  exported, config.data.preprocessing); config.finetune.unfreeze_from, when past the file's
  cut, becomes the cut's top two blocks (`unfreeze_from_for`); config.model.pretrained becomes
  None, since the checkpoint holds every weight;
* the checkpoint is the state at step 0 of the config's first phase with a fresh optimizer. The
  training loop starts any config's phases from a step-0 checkpoint, so
  `--mode=train --config.warmup.epochs=0 --config.finetune.epochs=5` fine-tunes the model;
* class names: those a file hhjax exported carries (checked against the config's data when
  --config is given and its data need no download); else the config's data's (an image
  folder's class folders, TFDS's labels), when --config is given; else class_0, class_1, ...
"""

import os
import pathlib
from collections.abc import Sequence
from typing import Any

from absl import logging
from etils import epath
import ml_collections

from hhjax import checkpointing
from hhjax import compat
from hhjax import config_checks
from hhjax import entry
from hhjax import errors
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax.model import backbones
from hhjax.model import classifier
from hhjax.training import phases as phases_lib
from hhjax.training import restore
from hhjax.training import state as state_lib
from hhjax.weights import keras_h5
from hhjax.weights import keras_model


def _set(config: ml_collections.ConfigDict, field: str, value: Any,
         why: str = 'from the Keras file') -> None:
  """Sets config.<field> ('model.cut'), logging a change from what the config said."""
  section, name = field.split('.')
  before = config[section].get(name)
  if before != value:
    logging.info('config.%s = %r (%s; the config said %r).', field, value, why, before)
  config[section][name] = value


def unfreeze_from_for(cut: str, unfreeze_from: str,
                      backbone: str = backbones.DEFAULT) -> str | None:
  """The block fine-tuning opens from under the file's cut when the config's is past it.

  None when the config's value fits (a block up to the cut, or 'stem'). Otherwise the cut's top
  two blocks, as the default config opens mixed6 and mixed7 of its mixed7 cut and Keras's
  InceptionV3 fine-tuning example trains the top two blocks (the cut's one block for mixed0).
  """
  blocks = classifier.backbone_blocks(cut, backbone)
  if unfreeze_from == 'stem' or unfreeze_from in blocks:
    return None
  return blocks[max(0, len(blocks) - 2)]


def config_for(spec: keras_model.KerasClassifier,
               config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` that describes the file's model."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    _set(config, 'model.backbone', spec.backbone)
    _set(config, 'model.cut', spec.cut)
    _set(config, 'model.head', spec.head)
    _set(config, 'model.hidden', spec.hidden)
    _set(config, 'model.dropout', spec.dropout)
    start = unfreeze_from_for(spec.cut, config.finetune.unfreeze_from, spec.backbone)
    if start is not None:
      _set(config, 'finetune.unfreeze_from', start,
           f'{config.finetune.unfreeze_from!r} is past the file\'s cut {spec.cut}: fine-tuning '
           'opens its top blocks')
    if spec.image_size:
      _set(config, 'data.image_size', spec.image_size)
    if spec.preprocessing:
      _set(config, 'data.preprocessing', spec.preprocessing)
    config.model.pretrained = None   # the checkpoint holds every weight
  config_checks.validate(config)
  return config


def _class_names(spec: keras_model.KerasClassifier, config: ml_collections.ConfigDict,
                 data_class_names: bool) -> list[str]:
  """The file's class names, else the config's data's, else class_0, class_1, ..."""
  names = list(spec.class_names) if spec.class_names else None
  if names is not None and data_class_names and _needs_download(config):
    logging.info('Class names %s from the Keras file; not checked against the config\'s data, '
                 'which is not downloaded for that (it is when training needs it).', names)
    data_class_names = False
  if data_class_names:
    from hhjax.data import pipeline  # pylint: disable=g-import-not-at-top (TensorFlow)
    info = pipeline.dataset_info(entry.data(config))
    data_names = [str(c) for c in info.class_names]
    if names is None and len(data_names) != spec.num_classes:
      raise errors.DataError(
          f'The Keras model has {spec.num_classes} classes, the config\'s data '
          f'{len(data_names)}: {data_names}. Point --config at the data it was trained on.')
    if names is not None and names != data_names:
      raise errors.DataError(
          f'The Keras file names its classes {names}, the config\'s data has {data_names}. '
          'Point --config at the data it was trained on.')
    names = data_names
  return names or [f'class_{i}' for i in range(spec.num_classes)]


def _needs_download(config: ml_collections.ConfigDict) -> bool:
  """Whether reading the config's data would download it (a TFDS dataset not prepared)."""
  if config.data.source != 'tfds':
    return False
  from hhjax.data import sources  # pylint: disable=g-import-not-at-top (TensorFlow)
  return sources.tfds_download(entry.data(config)) is not None


def _check_new_workdir(workdir: str) -> None:
  checkpoints = epath.Path(workdir_lib.checkpoint_dir(workdir))
  if checkpoints.exists() and any(checkpoints.iterdir()):
    raise errors.OutputExistsError(
        f'{workdir} holds checkpoints already; import into a new --workdir.')


def import_keras(path: str | os.PathLike, workdir: str, config: ml_collections.ConfigDict, *,
                 data_class_names: bool = True,
                 class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes WORKDIR/config.json and a step-0 checkpoint holding the Keras classifier in `path`.

  Args:
    path: a Keras classifier file (see the module docstring).
    workdir: a new workdir (one with checkpoints is refused).
    config: the config to start from; it also describes a weights-only file's model.
    data_class_names: read the class names from the config's data when the file has none.
    class_names: the class names to record, instead (the file's must agree).

  Returns:
    {'workdir', 'model' (in words), 'class_names', 'config'}.
  """
  workdir = workdir_lib.absolute(workdir)
  _check_new_workdir(workdir)
  spec, variables = keras_model.read_classifier(pathlib.Path(path),
                                                entry.keras_classifier_spec(config))
  config = config_for(spec, config)
  if class_names is not None:
    names = list(class_names)
    if (spec.class_names and list(spec.class_names) != names) or len(names) != spec.num_classes:
      raise errors.DataError(f'class_names {names} do not fit the Keras file\'s classes '
                             f'{spec.class_names or spec.num_classes}.')
  else:
    names = _class_names(spec, config, data_class_names)
  model = entry.model(config, len(names))
  keras_h5.check_variables(variables,
                           state_lib.abstract_variables(model, entry.image_size(config)),
                           str(path))
  phase = entry.phases(config)[0]
  setup = entry.setup_for(config)(phase, variables['params'])
  state = state_lib.from_variables(variables, setup.tx, int(config.seed), sharding.make_mesh())
  compat.quiet_orbax()
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with checkpointing.Checkpoints(workdir_lib.checkpoint_dir(workdir),
                                 keep=int(config.keep_checkpoints)) as ckpts:
    restore.save(ckpts, state, restore.CheckpointMeta(
        step=0, phase=phase.name, progress=phases_lib.Progress(phase.name),
        class_names=tuple(names), config=workdir_lib.config_dict(config),
        imported_from=str(path)))
    ckpts.wait()
  workdir_lib.save_config(config, workdir, is_main=True)
  logging.info('Imported %s (%s; classes %s) into %s.', path, spec.describe(), names, workdir)
  return {'workdir': workdir, 'model': spec.describe(), 'class_names': names, 'config': config}
