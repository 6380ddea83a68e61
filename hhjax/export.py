"""--mode=export: a workdir's classifier as Keras files or as a TensorFlow SavedModel.

    python main.py --workdir=W --mode=export --format=keras [--export_dir=DIR]
    python main.py --workdir=W --mode=export --format=saved_model [--export_dir=DIR]

`keras` writes DIR/model.keras (Keras 3, `keras.saving.load_model`) and DIR/model.h5 (tf_keras,
`tf_keras.models.load_model`): the Keras tutorial's model (keras.applications InceptionV3 cut at
config.model.cut, then the head) holding the checkpoint's weights, compiled as our fine-tuning
phase trains (RMSprop at config.finetune.learning_rate; the blocks before
config.finetune.unfreeze_from frozen, and the BatchNorm layers too unless config.finetune.train_bn,
which is how Keras keeps them in inference mode), so `fit` continues from there. The class names
and the preprocessing travel inside both files for --mode=import_keras to find again.

`saved_model` writes DIR/saved_model through `jax.experimental.jax2tf`, lowered for CPU, GPU and
TPU. Its `serving_default` signature takes `images`, uint8 RGB [batch, height, width, 3] of any
size and batch size; resizes them to the training size as `--mode=predict` does (config.data's
image_size and resize_method), normalises them as config.data.preprocessing says and returns
`probabilities` [batch, classes] and the constant `class_names`. Loading it needs TensorFlow only:

    model = tf.saved_model.load(DIR + '/saved_model')
    out = model.signatures['serving_default'](images=tf.constant(uint8_images))

DIR defaults to WORKDIR/export; nothing there is overwritten.
"""

from collections.abc import Iterator
import contextlib
import importlib
import json
import os
import pathlib
import shutil
import uuid
import zipfile
from typing import Any

from absl import logging
import h5py
import jax
import ml_collections
import numpy as np

from hhjax import entry
from hhjax import errors
from hhjax import workdir as workdir_lib
from hhjax.model import backbones
from hhjax.model import classifier
from hhjax.weights import keras_classifier

FORMATS = ('keras', 'saved_model')
KERAS_FILES = ('model.keras', 'model.h5')
SAVED_MODEL_DIR = 'saved_model'
# jax2tf lowers the model for each of these, so the SavedModel serves on any of them.
SAVED_MODEL_PLATFORMS = ('cpu', 'cuda', 'tpu')
_PACKAGES = {'keras': 'keras==3.15.1', 'tf_keras': 'tf_keras==2.21.0'}


def _import(name: str, purpose: str):
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise errors.MissingPackageError(
        f'{purpose} needs the package {name}, which is not installed ({e}): '
        f'pip install {_PACKAGES.get(name, name)}') from None


def _check_new(path: pathlib.Path) -> None:
  if path.exists():
    raise errors.OutputExistsError(f'{path} exists already: remove it or choose another '
                                   '--export_dir.')


def _check_writable_dir(out_dir: pathlib.Path) -> None:
  """Refuses an export folder that is a file or cannot be created or written, before any work."""
  if out_dir.exists() and not out_dir.is_dir():
    raise errors.OutputExistsError(f'--export_dir={out_dir} is a file, not a folder: remove it '
                                   'or choose another --export_dir.')
  try:
    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / f'.write_probe.{os.getpid()}.{uuid.uuid4().hex[:8]}'
    probe.mkdir()
    probe.rmdir()
  except OSError as e:
    raise errors.OutputNotWritableError(
        f'Cannot write the export into {out_dir}: {e.strerror or e} (errno {e.errno}). Choose '
        'a folder you may write with --export_dir=DIR.') from None


@contextlib.contextmanager
def _output(path: pathlib.Path) -> Iterator[pathlib.Path]:
  """A path to write `path`'s file or folder at, moved there when the block succeeds.

  A temporary folder beside it keeps the name, whose extension Keras reads.
  """
  _check_new(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
  tmp.mkdir()
  try:
    yield tmp / path.name
    (tmp / path.name).replace(path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- Keras


def _trainable(entry: keras_classifier.KerasLayerPath,
               config: ml_collections.ConfigDict) -> bool:
  """Whether the Keras layer `entry` trains in our fine-tuning phase, in Keras's terms."""
  if entry.block == 'head':
    return True
  ft = config.finetune
  blocks = backbones.get(config.model.get('backbone')).blocks
  opened = blocks[blocks.index(ft.unfreeze_from):] if ft.unfreeze_from in blocks else blocks
  if entry.is_batch_norm and not ft.train_bn:
    return False   # Keras runs a frozen BatchNormalization in inference mode, as we do
  return entry.block in opened


def _compile_for_fit(keras_module, model, spec: keras_classifier.KerasClassifier,
                     config: ml_collections.ConfigDict) -> None:
  for entry in keras_classifier.keras_layer_paths(model, spec):
    entry.layer.trainable = _trainable(entry, config)
  binary = classifier.num_outputs(spec.num_classes) == 1
  model.compile(
      optimizer=keras_module.optimizers.RMSprop(
          learning_rate=float(config.finetune.learning_rate), rho=float(config.optimizer.rho),
          epsilon=float(config.optimizer.epsilon)),
      loss='binary_crossentropy' if binary else 'sparse_categorical_crossentropy',
      metrics=['accuracy'])


def _keras_model(keras_module, spec, variables, config):
  model = keras_classifier.build_keras_classifier(keras_module, spec, variables)
  _compile_for_fit(keras_module, model, spec, config)
  return model


def export_keras(spec: keras_classifier.KerasClassifier, variables: dict[str, Any],
                 config: ml_collections.ConfigDict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Writes out_dir/model.keras (Keras 3) and out_dir/model.h5 (tf_keras)."""
  keras3 = _import('keras', '--format=keras (the .keras file)')
  tf_keras = _import('tf_keras', '--format=keras (the .h5 file)')
  metadata = json.dumps(keras_classifier.metadata(spec))
  keras_path, h5_path = (out_dir / name for name in KERAS_FILES)
  with _output(keras_path) as tmp:
    _keras_model(keras3, spec, variables, config).save(str(tmp))
    with zipfile.ZipFile(tmp, 'a') as archive:
      archive.writestr(keras_classifier.METADATA_MEMBER, metadata)
  with _output(h5_path) as tmp:
    _keras_model(tf_keras, spec, variables, config).save(str(tmp))
    with h5py.File(tmp, 'a') as f:
      f.attrs[keras_classifier.METADATA_ATTRIBUTE] = metadata
  return [keras_path, h5_path]


# ---------------------------------------------------------------------------- SavedModel


def export_saved_model(model: classifier.Classifier, variables: dict[str, Any],
                       class_names: list[str], image_size: int,
                       out_dir: pathlib.Path, resize_method: str = 'bilinear') -> pathlib.Path:
  """Writes out_dir/saved_model: uint8 images in, class probabilities out (see the module doc).

  Images of any size are resized inside, to `image_size` with `resize_method` and normalised
  with the model's preprocessing, in the TensorFlow ops `--mode=predict` runs on a file
  (hhjax.data.decode), so a server need not know the training size.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  from hhjax.data import decode  # pylint: disable=g-import-not-at-top (TensorFlow)

  def probabilities(variables, images):
    return classifier.probabilities(model.apply(variables, images, train=False))

  converted = jax2tf.convert(
      probabilities, polymorphic_shapes=[None, f'(b, {image_size}, {image_size}, 3)'],
      with_gradient=False, native_serialization_platforms=SAVED_MODEL_PLATFORMS)
  module = tf.Module()
  # Variables, not constants: the weights sit in the SavedModel's variables/ files.
  module.weights = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False), variables)
  module.class_names = tf.constant(class_names)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')])
  def serve(images):
    inputs = decode.normalize(decode.resize(images, image_size, resize_method),
                              model.preprocessing)
    inputs = tf.ensure_shape(inputs, [None, image_size, image_size, 3])
    return {'probabilities': converted(module.weights, inputs),
            'class_names': tf.identity(module.class_names)}

  module.serve = serve
  path = out_dir / SAVED_MODEL_DIR
  with _output(path) as tmp:
    tf.saved_model.save(module, str(tmp), signatures={'serving_default': serve})
  return path


# --------------------------------------------------------------------------------- command


def export(config: ml_collections.ConfigDict, workdir: str, fmt: str,
           export_dir: str | os.PathLike | None = None,
           checkpoint: str = 'latest') -> list[pathlib.Path]:
  """Exports the latest (or 'best') checkpoint in `workdir` in format `fmt` (see FORMATS).

  Returns:
    The paths written.
  """
  if fmt not in FORMATS:
    raise errors.ConfigError(f'--format must be one of {FORMATS}, got {fmt!r}.')
  out_dir = pathlib.Path(export_dir or os.path.join(workdir_lib.absolute(workdir), 'export'))
  # Before the restore: an existing output, a folder that cannot be written or a missing
  # package fails at once.
  _check_writable_dir(out_dir)
  for name in KERAS_FILES if fmt == 'keras' else (SAVED_MODEL_DIR,):
    _check_new(out_dir / name)
  if fmt == 'keras':
    _import('keras', '--format=keras (the .keras file)')
    _import('tf_keras', '--format=keras (the .h5 file)')
  _, model, state, class_names, step = entry.restore_for_inference(config, workdir,
                                                                      checkpoint)
  variables = jax.tree.map(np.asarray, jax.device_get(
      {'params': state['params'], 'batch_stats': state['batch_stats']}))
  if fmt == 'keras':
    spec = entry.keras_classifier_spec(config, len(class_names), class_names)
    paths = export_keras(spec, variables, config, out_dir)
  else:
    paths = [export_saved_model(model, variables, list(class_names),
                                int(config.data.image_size), out_dir,
                                resize_method=config.data.resize_method)]
  for path in paths:
    logging.info('Exported step %d of %s to %s', step, workdir, path)
  return paths
