"""Parity with Keras itself: load_h5 + InceptionV3 compute what Keras's InceptionV3 computes.

Random weights (no ImageNet weights are reachable from CI), saved by Keras in both legacy
layouts: tf_keras `save_weights` (weights-only, like the official files) without the top at
150x150, Keras 3 `model.save` (whole model) with the top at 299x299. The bar at every endpoint:
max |flax - keras| / max |keras| <= 1e-4.
"""

import re
import types

import jax
import numpy as np
from PIL import Image
import pytest

from hhjax.model import inception
from hhjax.weights import keras_h5
import keras_reference

TOLERANCE = 1e-4


def relative_errors(ours: dict, theirs: dict) -> dict[str, float]:
  errors = {}
  for name, reference in theirs.items():
    assert ours[name].shape == reference.shape, name
    errors[name] = float(np.max(np.abs(np.asarray(ours[name]) - reference))
                         / np.max(np.abs(reference)))
  return errors


def assert_parity(ours: dict, theirs: dict) -> None:
  assert set(ours) == set(theirs)
  errors = relative_errors(ours, theirs)
  bad = {k: v for k, v in errors.items() if not v <= TOLERANCE}
  assert not bad, f'relative errors above {TOLERANCE}: {bad} (all: {errors})'


def real_images(real_data_dir, size: int, count_per_class: int) -> np.ndarray:
  """A few validation images, resized and preprocessed as Keras's preprocess_input does."""
  files = []
  for label in ('horses', 'humans'):
    files += sorted((real_data_dir / 'validation' / label).glob('*.png'))[:count_per_class]
  images = [np.asarray(Image.open(f).convert('RGB').resize((size, size), Image.BILINEAR),
                       np.float32) for f in files]
  return np.stack(images) / 127.5 - 1.0


def keras_rank(layer_name: str) -> int:
  """The creation counter in Keras's automatic layer names (conv2d -> 0, conv2d_7 -> 7)."""
  match = re.fullmatch(r'(?:conv2d|batch_normalization)(?:_(\d+))?', layer_name)
  assert match, layer_name
  return int(match.group(1) or 0)


def order_from_keras(model) -> list[str]:
  """Our module paths for the Keras model's layers with weights, in `model.layers` order.

  Keras names layers by creation, and creation follows the source; our `conv_bn_paths()` is in
  source order too. So the k-th created Conv2D (and its BatchNormalization) is our k-th unit.
  """
  layers = [layer for layer in model.layers if layer.weights]
  kinds = {'Conv2D': 'conv', 'BatchNormalization': 'bn'}
  units = inception.conv_bn_paths()
  ranks = {kind: sorted(keras_rank(l.name) for l in layers if type(l).__name__ == cls)
           for cls, kind in kinds.items()}
  order = []
  for layer in layers:
    cls = type(layer).__name__
    if cls == 'Dense':
      order.append(layer.name)
      continue
    kind = kinds[cls]
    order.append(f'{units[ranks[kind].index(keras_rank(layer.name))]}/{kind}')
  return order


# ------------------------------------------------------------------------------- no top, 150px


def _run_both(keras_module, keras_model, model, variables):
  """x -> (our endpoints, Keras's endpoints) for the same images."""
  keras_endpoints, names = keras_reference.endpoint_model(keras_module, keras_model)
  apply = jax.jit(model.apply)

  def run_both(x):
    theirs = dict(zip(names, keras_endpoints.predict(x, verbose=0)))
    return apply(variables, x), theirs
  return run_both


@pytest.fixture(scope='module')
def notop(keras_notop_h5):
  """tf_keras reading the weights-only file (its own loader) and ours reading the same file."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  keras_model = tf_keras.applications.InceptionV3(
      weights=str(keras_notop_h5), include_top=False, input_shape=(150, 150, 3))
  model, variables = keras_h5.load_h5(keras_notop_h5)
  return types.SimpleNamespace(keras_model=keras_model, model=model, variables=variables,
                               run_both=_run_both(tf_keras, keras_model, model, variables))


def test_load_h5_reads_notop_weights_only_file_as_notop(notop):
  assert (notop.model.final_endpoint, notop.model.include_top) == ('mixed10', False)


def test_notop_matches_tf_keras_on_random_inputs_at_150(notop):
  x = np.random.default_rng(1).uniform(-1, 1, (2, 150, 150, 3)).astype(np.float32)
  assert_parity(*notop.run_both(x))


def test_notop_matches_tf_keras_on_real_images_at_150(notop, real_data_dir):
  assert_parity(*notop.run_both(real_images(real_data_dir, 150, 1)))


def test_keras_layer_order_is_tf_keras_model_layers_order(notop):
  assert order_from_keras(notop.keras_model) == keras_h5.keras_layer_order()


def test_file_of_keras_model_cut_at_mixed7_loads_as_mixed7(notop, tmp_path):
  import tf_keras  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'cut.h5'
  tf_keras.Model(notop.keras_model.input,
                 notop.keras_model.get_layer('mixed7').output).save_weights(str(path))
  model, variables = keras_h5.load_h5(path)
  assert (model.final_endpoint, model.include_top) == ('mixed7', False)
  _, expected = keras_h5.cut(notop.model, notop.variables, 'mixed7')
  jax.tree.map(np.testing.assert_array_equal, variables, expected)


# ------------------------------------------------------------------------------ with top, 299px


@pytest.fixture(scope='module')
def top(tmp_path_factory):
  """A random Keras 3 InceptionV3 with top saved whole with model.save('x.h5')."""
  import keras  # pylint: disable=g-import-not-at-top
  keras_model = keras.applications.InceptionV3(weights=None, include_top=True)
  keras_reference.randomize(keras_model, seed=2)
  path = tmp_path_factory.mktemp('keras3') / 'inception_v3_top_model.h5'
  keras_model.save(str(path))
  model, variables = keras_h5.load_h5(path)
  return types.SimpleNamespace(keras_model=keras_model, model=model, path=path,
                               run_both=_run_both(keras, keras_model, model, variables))


def test_load_h5_reads_whole_model_file_with_top(top):
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(top.path) as f:
    assert 'model_weights' in f and 'layer_names' not in f.attrs  # the whole-model layout
  model = top.model
  assert (model.final_endpoint, model.include_top, model.num_classes) == ('mixed10', True, 1000)


def test_top_matches_keras3_on_random_input_at_299(top):
  x = np.random.default_rng(3).uniform(-1, 1, (1, 299, 299, 3)).astype(np.float32)
  assert_parity(*top.run_both(x))


def test_top_matches_keras3_on_real_image_at_299(top, real_data_dir):
  assert_parity(*top.run_both(real_images(real_data_dir, 299, 1)[1:]))


def test_keras_layer_order_is_keras3_model_layers_order(top):
  assert order_from_keras(top.keras_model) == keras_h5.keras_layer_order(include_top=True)


