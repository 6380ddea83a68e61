"""--mode=eval: loss, accuracy and the confusion matrix of a checkpoint over one split.

    python main.py --workdir=W --mode=eval [--split=validation|test|train|DIR] \
        [--checkpoint=latest|best|STEP]

--split names the run's validation split (the default: config.data.validation_split, or the
share held out of the training split), its test split (config.data.test_split), its training
split (without a held-out share), or an image folder DIR whose subfolders are the model's
classes. The results go to WORKDIR/eval/<split>-step_<step>.json and the pictures into the
folder of the same name beside it: an evaluation of another split or step never writes over
this one, and none writes over the training run's own eval.json, test.json or pictures. The
same `Evaluator` (hhjax.training.evaluation) runs at the end of every training epoch.
"""

import dataclasses
import hashlib
import os
from typing import Any

from etils import epath
import jax
import ml_collections
import tensorflow as tf

from hhjax import entry
from hhjax import errors
from hhjax import pictures
from hhjax import run_report
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax.data import sources
from hhjax.data import spec as data_spec
from hhjax.training import evaluation

EVAL_DIR = 'eval'
# The names --split takes besides an image folder.
SPLITS = ('validation', 'test', 'train')


@dataclasses.dataclass(frozen=True)
class Target:
  """What --split names: the data to read, its split there, and the name of its files."""
  data: data_spec.DataSpec
  split: str
  name: str


def _folder_target(data: data_spec.DataSpec, path: str) -> Target:
  path = path.rstrip('/')
  root, split = os.path.split(path)
  # The folder's own name, and a hash of where it is: two folders of one name stay apart.
  digest = hashlib.sha256(workdir_lib.absolute(path).encode()).hexdigest()[:8]
  spec = dataclasses.replace(data, source='folder', dir=root or '.', train_split=split,
                             validation_split=split, validation_fraction=0.0, test_split=None,
                             cache_decoded=False)
  return Target(spec, split, f'folder-{split}-{digest}')


def target(data: data_spec.DataSpec, split: str) -> Target:
  """The data, split and file name that --split names (see the module's docstring)."""
  if split == 'validation':
    return Target(data, data.validation, 'validation')
  if split == 'test':
    if not data.test_split:
      raise errors.ConfigError(
          '--split=test: this run has no test split (config.data.test_split is None). Give '
          '--split=validation, train, or an image folder of class subfolders.')
    return Target(data, data.test_split, 'test')
  if split == 'train':
    return Target(data, data.train_split, 'train')
  if tf.io.gfile.isdir(split):
    return _folder_target(data, split)
  raise errors.ConfigError(
      f'--split={split!r}: must be one of {", ".join(SPLITS)} or an image folder whose '
      'subfolders are the classes (no such folder).')


def result_path(workdir: str, name: str, step: int) -> str:
  """WORKDIR/eval/<name>-step_<step>.json; its pictures go into the folder without '.json'."""
  return os.path.join(workdir_lib.absolute(workdir), EVAL_DIR, f'{name}-step_{step:06d}.json')


def _check_held_out(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The held-out validation of a --config given must be the one the run held out."""
  path = epath.Path(workdir) / workdir_lib.CONFIG_FILE
  if not path.exists():
    return
  saved = workdir_lib.parse_config_json(path.read_text(), str(path))
  trained, given = data_spec.held_out_identity(saved), data_spec.held_out_identity(config)
  if trained != given:
    raise errors.ConfigError(
        f'--split=validation: the given --config holds out another validation share '
        f'({given}) than {workdir} was trained with ({trained}); its rows would overlap '
        'what trained. Leave out --config, or set config.data.validation_split / '
        'validation_fraction / seed as they were.')


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = 'latest',
             split: str = 'validation') -> dict[str, Any]:
  """Evaluates a checkpoint in `workdir` ('latest', 'best' or a step) on `split`.

  Prints loss, accuracy, the confusion matrix and the metrics of hhjax.eval_metrics; writes
  WORKDIR/eval/<split>-step_<step>.json and, in the folder of that name, the pictures of
  hhjax.pictures (confusion matrix, reliability diagram, misclassified images) and a run report
  of this evaluation, report.html.
  """
  workdir_lib.check_inference_config(config, workdir)
  sharding.check_batch_size(entry.eval_batch_size(config), 'config.eval_batch_size')
  chosen = target(entry.data(config), split)
  if split == 'validation' and chosen.data.holds_out:
    _check_held_out(config, workdir)
  mesh, model, state, class_names, step = entry.restore_for_inference(config, workdir,
                                                                      checkpoint)
  if split not in SPLITS:
    _check_folder_classes(chosen, class_names)
  evaluator = evaluation.Evaluator(model, len(class_names), mesh,
                                   evaluation.eval_batches(chosen.data, chosen.split),
                                   label_smoothing=entry.label_smoothing(config),
                                   metrics=entry.eval_metrics(config))
  result = evaluator(state['params'], state['batch_stats'])
  is_main = jax.process_index() == 0
  path = result_path(workdir, chosen.name, step)
  folder = path[:-len('.json')]
  if is_main:
    epath.Path(folder).mkdir(parents=True, exist_ok=True)
  out = evaluation.report(result, class_names, step, workdir_lib.absolute(workdir), is_main,
                          split=chosen.split, path=path, pictures_dir=folder)
  pictures.write_eval_pictures(chosen.data, result, class_names, step, folder,
                               is_main=is_main, split=chosen.split)
  if is_main:
    root = workdir_lib.absolute(workdir)
    run_report.write_and_log(
        root, [run_report.evaluation_of(out, f'--mode=eval --split={split}',
                                        os.path.relpath(folder, root), key='eval')],
        path=os.path.join(folder, run_report.REPORT_FILE))
  return out


def _check_folder_classes(chosen: Target, class_names: list[str]) -> None:
  found = list(sources.table(chosen.data, chosen.split).class_names)
  if found != list(class_names):
    raise errors.DataError(
        f'--split={os.path.join(chosen.data.dir, chosen.split)}: its class folders {found} are '
        f'not the classes the model was trained on {list(class_names)}; labels would mean '
        'other classes. Give a folder with one subfolder per class, named as in training.')
