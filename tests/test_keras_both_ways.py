"""Keras both ways, against Keras itself: import, fine-tune here, export to Keras and TensorFlow.

Keras (tf_keras and Keras 3) builds the tutorial's classifier with random weights (as the parity
tests do), trains it for a few steps and saves it in each format; hhjax imports it and must
predict what Keras predicts on the 256 real validation images, and fine-tune it with the losses
Keras computes for the same batches. The fine-tuned workdir is then exported, and Keras and
TensorFlow (in a process where JAX cannot be imported) must predict what hhjax predicts.
Images are 75x75, the smallest InceptionV3 takes, to keep the module fast.
"""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
from PIL import Image
import pytest

from configs import smoke
from hhjax import entry
from hhjax import errors
from hhjax import export
from hhjax import import_keras
from hhjax import predict
from hhjax import train
from hhjax import workdir as workdir_lib
from hhjax.data import pipeline
from hhjax.data import spec as data_spec
from hhjax.model import classifier
from hhjax.model import preprocessing
from hhjax.weights import keras_model
import keras_classifiers


def _spec(config):
  """What the input pipeline reads of `config`."""
  return data_spec.DataSpec.from_config(config)


ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 75
KERAS_TOLERANCE = 1e-4          # |hhjax - Keras| on probabilities
SAVED_MODEL_TOLERANCE = 1e-5    # |hhjax - SavedModel| on probabilities
LEARNING_RATE = 1e-6            # small: the spread-out head (spread_outputs) is sensitive


def base_config(folder: pathlib.Path, preprocessing_name: str = 'inception'):
  """The smoke config on a small real image folder at 75x75, without augmentation."""
  config = smoke.get_config()
  config.data.source = 'folder'
  config.data.dir = str(folder)
  config.data.validation_split, config.data.test_split = 'validation', None
  config.data.image_size = SIZE
  config.data.preprocessing = preprocessing_name
  config.data.augment.enabled = False
  config.data.num_parallel_calls = 1
  config.batch_size = config.eval_batch_size = 4
  return config


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model, variables, pixels):
  # One compilation per model: the import and the export of the same one share it.
  return classifier.probabilities(model.apply(variables, pixels))


def hhjax_probabilities(workdir, pixels: np.ndarray) -> tuple[np.ndarray, list[str]]:
  """What hhjax's predict computes for uint8 `pixels`, from the workdir's latest checkpoint."""
  config = workdir_lib.load_config(str(workdir))
  _, model, state, class_names, _ = entry.restore_for_inference(config, str(workdir))
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  return np.asarray(_probabilities(model, variables, pixels)), list(class_names)


def assert_spread(probabilities: np.ndarray) -> None:
  """Probabilities that differ between images: else agreeing on them would prove little."""
  assert probabilities.std(axis=0).max() > 0.1, probabilities.std(axis=0)


@pytest.fixture(scope='module')
def data(real_data_dir, tmp_path_factory):
  """The 256 validation images as uint8 pixels, and a small image folder to train on."""
  folder = keras_classifiers.image_folder(real_data_dir, tmp_path_factory.mktemp('images'))
  files, _ = keras_classifiers.labelled_files(real_data_dir, 'validation')
  train_files, train_labels = keras_classifiers.labelled_files(folder, 'train')
  return types.SimpleNamespace(
      folder=folder, pixels=keras_classifiers.pixels(files, SIZE),
      train_pixels=keras_classifiers.pixels(train_files, SIZE), train_labels=train_labels)


def trained_in_keras(keras, data, preprocessing_name, **model_kwargs):
  """The tutorial's model, trained two steps in `keras`, and its probabilities on the images."""
  model = keras_classifiers.tutorial_model(keras, size=SIZE, **model_kwargs)
  model.fit(preprocessing.normalize_np(data.train_pixels, preprocessing_name), data.train_labels,
            batch_size=4, epochs=1, shuffle=False, verbose=0)
  inputs = preprocessing.normalize_np(data.pixels, preprocessing_name)
  keras_classifiers.spread_outputs(keras, model, inputs[::4])
  probabilities = model.predict(inputs, batch_size=64, verbose=0)
  assert_spread(probabilities)
  return model, probabilities


@pytest.fixture(scope='module')
def tf_keras_tutorial(data, tmp_path_factory):
  """The tutorial exactly (mixed7, Flatten, Dense 1024, Dropout 0.2, sigmoid; rescale 1/255),
  saved by tf_keras as model.save('model.h5') and save_weights('weights.h5')."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('tf_keras')
  model, probabilities = trained_in_keras(tf_keras, data, 'rescale')
  model.save(str(tmp / 'model.h5'))
  model.save_weights(str(tmp / 'weights.h5'))
  return types.SimpleNamespace(h5=tmp / 'model.h5', weights=tmp / 'weights.h5',
                               probabilities=probabilities[:, 0])


@pytest.fixture(scope='module')
def keras3_model(data, tmp_path_factory):
  """Keras 3: mixed5, global average pooling, Dense 64, no dropout (so that fine-tuning here
  and in Keras compute the same), sigmoid; saved as model.keras and as model.h5. The model
  stays live for the fine-tuning comparison."""
  import keras  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('keras3')
  model, probabilities = trained_in_keras(keras, data, 'inception', cut='mixed5', head='gap',
                                          hidden=64, dropout=0, seed=1)
  model.save(str(tmp / 'model.keras'))
  model.save(str(tmp / 'model.h5'))
  return types.SimpleNamespace(model=model, keras=tmp / 'model.keras', h5=tmp / 'model.h5',
                               probabilities=probabilities[:, 0])


@pytest.fixture(scope='module')
def tf_keras_base():
  """A tf_keras InceptionV3 at 75x75 that small models share: one build (seconds) for all."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  base = tf_keras.applications.InceptionV3(input_shape=(SIZE, SIZE, 3), include_top=False,
                                           weights=None)
  return tf_keras, base, base.get_layer('mixed0').output


@pytest.fixture(scope='module')
def keras3_workdir(keras3_model, data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('keras3_workdir') / 'w'
  import_keras.import_keras(keras3_model.keras, str(workdir), base_config(data.folder))
  return workdir


@pytest.fixture(scope='module', autouse=True)
def refused_by_main(tmp_path_factory):
  """main.py importing a small CNN's whole-model file, started first: the interpreter's start
  and imports overlap the rest of the module."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp('other')
  inputs = tf_keras.Input((SIZE, SIZE, 3))
  x = tf_keras.layers.Conv2D(16, 3, use_bias=False, name='my_conv')(inputs)
  x = tf_keras.layers.BatchNormalization(scale=False)(x)
  x = tf_keras.layers.Flatten()(tf_keras.layers.Activation('relu')(x))
  tf_keras.Model(inputs, tf_keras.layers.Dense(1, activation='sigmoid')(x)).save(
      str(tmp / 'other.h5'))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.Popen(
      [sys.executable, str(ROOT / 'main.py'), '--mode=import_keras',
       f'--keras_model={tmp / "other.h5"}', f'--workdir={tmp / "w"}'],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  yield proc, tmp / 'w'
  if proc.poll() is None:
    proc.kill()
  proc.communicate()


# ---------------------------------------------------------------------------------- import


def test_tutorial_h5_from_tf_keras_imported_predicts_as_tf_keras(tf_keras_tutorial, data,
                                                                   tmp_path):
  workdir = tmp_path / 'w'
  import_keras.import_keras(tf_keras_tutorial.h5, str(workdir),
                            base_config(data.folder, 'rescale'))
  model = workdir_lib.load_config(str(workdir)).model
  assert (model.cut, model.head, model.hidden, model.dropout) == ('mixed7', 'flatten', 1024, 0.2)
  probabilities, class_names = hhjax_probabilities(workdir, data.pixels)
  assert class_names == ['horses', 'humans']
  worst = np.abs(probabilities[:, 1] - tf_keras_tutorial.probabilities).max()
  print(f'tf_keras model.h5 (mixed7, flatten): max |hhjax - keras| = {worst:.2e}')
  assert worst <= KERAS_TOLERANCE


def test_weights_only_h5_takes_the_model_from_the_config(tf_keras_tutorial, data):
  with pytest.raises(errors.KerasWeightsError, match='holds weights only.*--config'):
    keras_model.read_classifier(tf_keras_tutorial.weights)
  config = base_config(data.folder)
  config.model.cut, config.model.head, config.model.hidden = 'mixed7', 'flatten', 1024
  spec, variables = keras_model.read_classifier(tf_keras_tutorial.weights,
                                                      entry.keras_classifier_spec(config))
  whole_spec, whole = keras_model.read_classifier(tf_keras_tutorial.h5)
  assert spec == whole_spec
  jax.tree.map(np.testing.assert_array_equal, variables, whole)

  config.model.hidden = 512   # not the model the weights belong to; mixed7 has 140 layers
  with pytest.raises(errors.KerasWeightsError,
                     match=r'layer #140 "dense(_\d+)?" \(dense(_\d+)?/kernel:0 \(6912, 1024\)'
                           r'.*head/hidden \(kernel \(6912, 512\)'):
    keras_model.read_classifier(tf_keras_tutorial.weights,
                                                      entry.keras_classifier_spec(config))


def test_keras3_keras_file_imported_predicts_as_keras3(keras3_model, keras3_workdir, data):
  config = workdir_lib.load_config(str(keras3_workdir))
  model = config.model
  assert (model.cut, model.head, model.hidden, model.dropout) == ('mixed5', 'gap', 64, 0.0)
  probabilities, class_names = hhjax_probabilities(keras3_workdir, data.pixels)
  assert class_names == ['horses', 'humans']
  worst = np.abs(probabilities[:, 1] - keras3_model.probabilities).max()
  print(f'Keras 3 model.keras (mixed5, gap): max |hhjax - keras| = {worst:.2e}')
  assert worst <= KERAS_TOLERANCE


def test_keras3_h5_reads_as_its_keras_file(keras3_model):
  spec, variables = keras_model.read_classifier(keras3_model.h5)
  keras_spec, keras_variables = keras_model.read_classifier(keras3_model.keras)
  assert spec == keras_spec
  jax.tree.map(np.testing.assert_array_equal, variables, keras_variables)


def test_softmax_head_imports_with_generic_class_names(tf_keras_base, data, tmp_path):
  tf_keras, base, _ = tf_keras_base
  keras = keras_classifiers.tutorial_model(tf_keras, cut='mixed0', head='gap', hidden=0,
                                           dropout=0, num_classes=3, seed=2, base=base)
  pixels = data.pixels[::16]
  keras_classifiers.spread_outputs(tf_keras, keras, preprocessing.normalize_np(pixels))
  keras.save(str(tmp_path / 'softmax.h5'))
  result = import_keras.import_keras(tmp_path / 'softmax.h5', str(tmp_path / 'w'),
                                     base_config(data.folder), data_class_names=False)
  assert result['class_names'] == ['class_0', 'class_1', 'class_2']
  probabilities, _ = hhjax_probabilities(tmp_path / 'w', pixels)
  expected = keras.predict(preprocessing.normalize_np(pixels), verbose=0)
  assert_spread(expected)
  worst = np.abs(probabilities - expected).max()
  print(f'tf_keras softmax (mixed0, gap, 3 classes): max |hhjax - keras| = {worst:.2e}')
  assert worst <= KERAS_TOLERANCE


# ------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope='module')
def fine_tuned(keras3_model, keras3_workdir, tmp_path_factory):
  """Three fine-tuning steps from the imported Keras 3 model, here and in Keras, same batches.

  One step per epoch, so metrics.jsonl holds each step's loss.
  """
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp('fine_tuned') / 'w'
  shutil.copytree(keras3_workdir, workdir)
  config = workdir_lib.load_config(str(workdir))
  config.warmup.epochs, config.finetune.epochs, config.steps_per_epoch = 0, 3, 1
  config.finetune.learning_rate, config.finetune.unfreeze_from = LEARNING_RATE, 'mixed5'
  batches = list(pipeline.create_dataset(_spec(config), 'train').take(3).as_numpy_iterator())
  keras_losses, untrained = keras_classifiers.fine_tune_losses(
      keras, tf, keras3_model.model, batches, cut='mixed5', hidden=True,
      unfreeze_from='mixed5', learning_rate=LEARNING_RATE)
  train.train_and_evaluate(config, str(workdir))
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return types.SimpleNamespace(workdir=workdir, rows=rows, keras_losses=keras_losses,
                               untrained=untrained)


def test_imported_model_fine_tunes_with_the_losses_keras_computes(fine_tuned):
  assert [(r['step'], r['phase']) for r in fine_tuned.rows] == [
      (1, 'finetune'), (2, 'finetune'), (3, 'finetune')]
  ours = [r['train_loss'] for r in fine_tuned.rows]
  print(f'fine-tuning losses: hhjax {ours}, keras {fine_tuned.keras_losses}, '
        f'untrained {fine_tuned.untrained}')
  np.testing.assert_allclose(ours, fine_tuned.keras_losses, rtol=1e-4)
  # The steps move the last loss 100 times further than the tolerance: a wrong update shows.
  moved = abs(fine_tuned.keras_losses[-1] / fine_tuned.untrained[-1] - 1)
  assert moved > 1e-2, moved


# ---------------------------------------------------------------------------------- export


_SERVE_WITHOUT_JAX = '''
import importlib.abc, sys
class NoJax(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'hhjax'):
      raise ImportError(f'{name} is not importable here')
sys.meta_path.insert(0, NoJax())
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']
pixels = np.load(sys.argv[2])
outputs = [serve(images=tf.constant(pixels[:100])), serve(images=tf.constant(pixels[100:]))]
np.save(sys.argv[3], np.concatenate([o['probabilities'].numpy() for o in outputs]))
print([n.decode() for n in outputs[0]['class_names'].numpy()])
# Image files at their own size (300x300, and one cropped to 300x200): resized inside.
from PIL import Image
files = open(sys.argv[4]).read().split()
full = [np.asarray(Image.open(f).convert('RGB')) for f in files]
full[-1] = full[-1][:200]
np.save(sys.argv[5], np.concatenate([serve(images=tf.constant(p[None]))['probabilities'].numpy()
                                     for p in full]))
assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')]
'''


@pytest.fixture(scope='module')
def exported(fine_tuned, data, tmp_path_factory):
  """The fine-tuned workdir exported in both formats; TensorFlow starts serving the SavedModel
  in another process at once (it takes the longest), read by its test."""
  config = workdir_lib.load_config(str(fine_tuned.workdir))
  paths = export.export(config, str(fine_tuned.workdir), 'saved_model')
  tmp = tmp_path_factory.mktemp('served')
  np.save(tmp / 'pixels.npy', data.pixels)
  files = keras_classifiers.labelled_files(data.folder, 'validation')[0][:4]
  Image.open(files[-1]).crop((0, 0, 300, 200)).save(tmp / 'cropped.png')   # another shape
  files = [str(f) for f in files[:-1]] + [str(tmp / 'cropped.png')]
  (tmp / 'files.txt').write_text('\n'.join(files))
  serving = subprocess.Popen(
      [sys.executable, '-c', _SERVE_WITHOUT_JAX, str(paths[0]), str(tmp / 'pixels.npy'),
       str(tmp / 'out.npy'), str(tmp / 'files.txt'), str(tmp / 'files.npy')], cwd=tmp,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  paths += export.export(config, str(fine_tuned.workdir), 'keras')
  probabilities, class_names = hhjax_probabilities(fine_tuned.workdir, data.pixels)
  assert_spread(probabilities)
  yield types.SimpleNamespace(saved_model=paths[0], keras=paths[1], h5=paths[2],
                              probabilities=probabilities, class_names=class_names,
                              files=files, served_files=tmp / 'files.npy',
                              inputs=preprocessing.normalize_np(data.pixels),
                              serving=serving, served=tmp / 'out.npy')
  if serving.poll() is None:
    serving.kill()
  serving.communicate()


def _fits_one_step(model, data):
  history = model.fit(preprocessing.normalize_np(data.train_pixels[:4]), data.train_labels[:4],
                      batch_size=4, epochs=1, verbose=0)
  assert np.isfinite(history.history['loss'][0])


def _worst_difference(model, exported, what):
  """The largest |Keras's probability - hhjax's| over the exported model's test images."""
  worst = np.abs(model.predict(exported.inputs, verbose=0)[:, 0]
                 - exported.probabilities[:, 1]).max()
  print(f'export {what}: max |keras - hhjax| = {worst:.2e}')
  return worst


def test_exported_keras_file_loads_in_keras3_predicts_as_hhjax_and_fits(exported, data):
  import keras  # pylint: disable=g-import-not-at-top
  model = keras.saving.load_model(str(exported.keras))
  assert _worst_difference(model, exported, 'model.keras in Keras 3') <= KERAS_TOLERANCE
  assert type(model.optimizer).__name__ == 'RMSprop'
  model.jit_compile = False   # XLA's compile time is no part of the test
  _fits_one_step(model, data)


def test_exported_h5_loads_in_tf_keras_predicts_as_hhjax_and_fits(exported, data):
  import tf_keras  # pylint: disable=g-import-not-at-top
  model = tf_keras.models.load_model(str(exported.h5))
  assert _worst_difference(model, exported, 'model.h5 in tf_keras') <= KERAS_TOLERANCE
  _fits_one_step(model, data)


def test_saved_model_serves_uint8_batches_as_hhjax_predicts_without_jax(exported):
  stdout, stderr = exported.serving.communicate(timeout=300)
  assert exported.serving.returncode == 0, stderr[-3000:]
  assert stdout.strip().splitlines()[-1] == str(exported.class_names)
  worst = np.abs(np.load(exported.served) - exported.probabilities).max()
  print(f'export SavedModel in TensorFlow: max |tf - hhjax| = {worst:.2e}')
  assert worst <= SAVED_MODEL_TOLERANCE


def test_saved_model_resizes_images_of_any_size_as_predict_does(exported, fine_tuned):
  stdout, stderr = exported.serving.communicate(timeout=300)
  assert exported.serving.returncode == 0, stderr[-3000:]
  served = np.load(exported.served_files)
  config = workdir_lib.load_config(str(fine_tuned.workdir))
  predicted = predict.predict(config, str(fine_tuned.workdir), exported.files)
  assert [p for _, _, p in predicted] == pytest.approx(
      [served[i, exported.class_names.index(c)] for i, (_, c, _) in enumerate(predicted)],
      abs=SAVED_MODEL_TOLERANCE)


def test_exported_keras_files_import_back_bit_for_bit(exported, fine_tuned):
  config = workdir_lib.load_config(str(fine_tuned.workdir))
  _, _, state, _, _ = entry.restore_for_inference(config, str(fine_tuned.workdir))
  ours = jax.device_get({'params': state['params'], 'batch_stats': state['batch_stats']})
  for path in (exported.keras, exported.h5):
    spec, variables = keras_model.read_classifier(path)
    assert spec.class_names == ('horses', 'humans') and spec.preprocessing == 'inception'
    jax.tree.map(np.testing.assert_array_equal, variables, ours)


def test_import_needs_no_flag_but_the_file_for_exports_and_keras_files(
    exported, keras3_model, tmp_path, monkeypatch, caplog):
  # What main.py does with only --keras_model and --workdir: configs/default.py (cut mixed7,
  # unfreeze_from mixed6, TFDS) adapted to the file; with --config, its data are not downloaded
  # for a check of class names the file carries.
  from configs import default  # pylint: disable=g-import-not-at-top
  from hhjax.data import sources  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sources, '_network_problem', lambda *a, **k: pytest.fail('network'))
  monkeypatch.setattr(pipeline, 'dataset_info', lambda *a, **k: pytest.fail('data read'))
  for i, (path, names) in enumerate(((exported.keras, ['horses', 'humans']),
                                     (exported.h5, ['horses', 'humans']),
                                     (keras3_model.keras, ['class_0', 'class_1']))):
    config = default.get_config()
    config.data.dir = str(tmp_path / 'tfds')      # nothing prepared there
    caplog.clear()
    with caplog.at_level('INFO', logger='absl'):
      result = import_keras.import_keras(path, str(tmp_path / f'w{i}'), config,
                                         data_class_names=i == 0)
    saved = workdir_lib.load_config(str(tmp_path / f'w{i}'))
    assert result['class_names'] == names
    assert (saved.model.cut, saved.finetune.unfreeze_from, saved.data.image_size) == (
        'mixed5', 'mixed4', SIZE)
    assert caplog.text.count("config.finetune.unfreeze_from = 'mixed4' ('mixed6' is past the "
                             "file's cut mixed5") == 1
    assert caplog.text.count("config.model.cut = 'mixed5'") == 1
  assert import_keras.unfreeze_from_for('mixed0', 'mixed6') == 'mixed0'
  assert import_keras.unfreeze_from_for('mixed7', 'mixed6') is None
  assert import_keras.unfreeze_from_for('mixed0', 'stem') is None


def test_an_import_refuses_a_used_workdir_and_class_names_the_data_does_not_have(
    exported, fine_tuned, tmp_path):
  with pytest.raises(errors.OutputExistsError, match='holds checkpoints already'):
    import_keras.import_keras(exported.keras, str(fine_tuned.workdir), smoke.get_config())
  with pytest.raises(errors.DataError, match=r"names its classes \['horses', 'humans'\], the "
                                             r"config's data has \['class_0', 'class_1'\]"):
    import_keras.import_keras(exported.keras, str(tmp_path / 'w'), smoke.get_config())


def test_export_refuses_existing_outputs_and_names_a_missing_package(exported, fine_tuned,
                                                                    monkeypatch):
  config = workdir_lib.load_config(str(fine_tuned.workdir))
  with pytest.raises(errors.OutputExistsError, match='model.keras exists already'):
    export.export(config, str(fine_tuned.workdir), 'keras')
  real_import = export.importlib.import_module

  def no_tf_keras(name, *args):
    if name == 'tf_keras':
      raise ImportError("No module named 'tf_keras'")
    return real_import(name, *args)

  monkeypatch.setattr(export.importlib, 'import_module', no_tf_keras)
  with pytest.raises(errors.MissingPackageError, match='needs the package tf_keras.*pip install '
                                                       'tf_keras'):
    export.export(config, str(fine_tuned.workdir), 'keras', export_dir=exported.keras.parent / 'x')


# ------------------------------------------------------------------------------- bad files


def test_another_architecture_is_refused_by_main_naming_its_first_layer(refused_by_main):
  proc, workdir = refused_by_main
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == errors.EXIT_USER_ERROR, stderr[-3000:]
  assert ('not an InceptionV3 classifier (InceptionV3 cut at mixed10 and a head; its layers name '
          'none of VGG16, VGG19, ResNet50, ') in stderr
  assert ('): it has 2 '
          'layers with weights, that model 188. The first layer that does not fit is layer #0 '
          '"my_conv" (my_conv/kernel:0 (3, 3, 3, 16)), where the classifier expects its layer '
          '#0, backbone/stem/conv_1a_3x3/conv (kernel (3, 3, 3, 32))') in stderr
  assert not workdir.exists()


def _save(tf_keras, inputs, outputs, path):
  tf_keras.Model(inputs, outputs).save(str(path))
  return path


@pytest.mark.parametrize('head, message', [
    (lambda L, x: L.Dense(1, activation='sigmoid')(L.Dense(8, activation='relu')(
        L.Dense(8, activation='relu')(L.GlobalAveragePooling2D()(x)))),
     r'layer "dense_\d+" \(Dense\(8, relu\)\) is where the output Dense layer should be'),
    (lambda L, x: L.Dense(2, activation='softmax')(L.Flatten()(x)),
     r'layer "dense_\d+" \(Dense\(2, softmax\)\) is not an output layer hhjax has'),
    (lambda L, x: L.Dense(1, activation='sigmoid')(L.Dense(8, activation='tanh')(L.Flatten()(x))),
     r'layer "dense_\d+" \(Dense\(8, tanh\)\) is a hidden layer without relu'),
    (lambda L, x: L.Dense(1, activation='sigmoid')(L.BatchNormalization()(L.Flatten()(x))),
     r'layer "batch_normalization_\d+" \(BatchNormalization\) follows the head'),
    (lambda L, x: L.Dense(1, activation='sigmoid')(L.GlobalMaxPooling2D()(x)),
     r'layer "global_max_pooling2d\w*" \(GlobalMaxPooling2D\) is neither a layer of '
     r'InceptionV3 \(its layers name none of VGG16, .*\) nor of a head'),
], ids=['two hidden layers', 'two-unit softmax', 'tanh', 'batchnorm in the head', 'max pooling'])
def test_heads_hhjax_cannot_represent_are_refused_naming_the_layer(tf_keras_base, tmp_path,
                                                                   head, message):
  tf_keras, base, features = tf_keras_base
  path = _save(tf_keras, base.input, head(tf_keras.layers, features), tmp_path / 'm.h5')
  with pytest.raises(errors.KerasWeightsError, match=message):
    keras_model.read_classifier(path)


def test_a_backbone_alone_or_nested_is_refused_saying_what_is_read(tf_keras_base, tmp_path):
  tf_keras, base, features = tf_keras_base
  path = _save(tf_keras, base.input, features, tmp_path / 'backbone.h5')
  with pytest.raises(errors.KerasWeightsError, match='has no classification head.*pretrained'):
    keras_model.read_classifier(path)
  nested = tf_keras.Sequential([tf_keras.Model(base.input, features),
                                tf_keras.layers.GlobalAveragePooling2D(),
                                tf_keras.layers.Dense(1, activation='sigmoid')])
  nested.save(str(tmp_path / 'nested.h5'))
  with pytest.raises(errors.KerasWeightsError, match='holds a Keras Sequential model.*not nested'):
    keras_model.read_classifier(tmp_path / 'nested.h5')


def test_truncated_files_are_refused_as_truncated(keras3_model, tmp_path):
  for source in (keras3_model.h5, keras3_model.keras):
    data = source.read_bytes()
    path = tmp_path / f'truncated{source.suffix}'
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(errors.KerasWeightsError, match='truncated or corrupt'):
      keras_model.read_classifier(path)
  archive = tmp_path / 'not_keras.keras'
  with zipfile.ZipFile(archive, 'w') as z:
    z.writestr('readme.txt', 'hello')
  with pytest.raises(errors.KerasWeightsError, match=r"not a Keras .keras file.*readme.txt"):
    keras_model.read_classifier(archive)


def test_export_into_a_file_or_a_read_only_place_is_refused_before_any_work(tmp_path):
  # Checked before the restore: the workdir need not even hold a checkpoint.
  config = smoke.get_config()
  (tmp_path / 'a_file').write_text('not a folder')
  with pytest.raises(errors.OutputExistsError, match='a_file is a file, not a folder'):
    export.export(config, str(tmp_path), 'saved_model', export_dir=tmp_path / 'a_file')
  with pytest.raises(errors.OutputNotWritableError, match=r'Not a directory \(errno 20\)'):
    export.export(config, str(tmp_path), 'keras', export_dir=tmp_path / 'a_file' / 'sub')
  read_only = tmp_path / 'read_only'
  read_only.mkdir(mode=0o555)
  # Root may write into a 0o555 folder; sysfs refuses new folders to everyone.
  target = pathlib.Path('/sys/hhjax_export') if os.geteuid() == 0 else read_only / 'export'
  with pytest.raises(errors.OutputNotWritableError,
                     match=rf'Cannot write the export into {target}: .*Choose a folder'):
    export.export(config, str(tmp_path), 'saved_model', export_dir=target)
