"""The speed rewrites inside InceptionV3 keep its variables and what it computes.

Each block kind runs with every rewrite on (`hhjax.model.lowering.Lowering`) against the plain
block: inference outputs, training outputs with batch statistics, the updated statistics and
the gradients. The whole rewritten network is held to the Keras parity bar (1e-4) against
tf_keras itself.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hhjax import entry
from hhjax.model import inception
from hhjax.model import lowering
from hhjax.weights import keras_h5

ALL_ON = lowering.Lowering(fast_convs=True, fold_bn=True, merge_1x1=True, fast_pools=True)


def random_variables(module, x, seed: int = 0):
  """Variables for `module` drawn with numpy (no init to compile): He-normal kernels and
  nonzero BatchNorm offsets and statistics (init's 0 / 0 / 1 would make folding a near no-op
  and prove little)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "['var']" in name:
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif "['kernel']" in name:
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape)
    else:
      value = rng.normal(0.0, 0.2, leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def max_relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert a.shape == b.shape
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# Every block kind, with the channel counts of its place in the network and a small grid.
BLOCKS = {
    'stem': (functools.partial(inception.Stem), (2, 35, 35, 3)),
    'mixed0': (functools.partial(inception.InceptionA, pool_features=32), (2, 5, 5, 192)),
    'mixed4': (functools.partial(inception.InceptionC, channels_7x7=128), (2, 5, 5, 768)),
    'mixed8': (functools.partial(inception.InceptionD), (2, 5, 5, 768)),
    'mixed9': (functools.partial(inception.InceptionE), (2, 3, 3, 1280)),
}


@pytest.fixture(scope='module', params=sorted(BLOCKS))
def block_pair(request):
  make, shape = BLOCKS[request.param]
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, shape), jnp.float32)
  plain, fast = make(), make(lowering=ALL_ON)
  variables = random_variables(plain, x)
  return types.SimpleNamespace(name=request.param, plain=plain, fast=fast, x=x,
                               variables=variables)


def test_rewrites_keep_the_variables_of_every_block(block_pair):
  b = block_pair
  fast_vars = jax.eval_shape(b.fast.init, jax.random.PRNGKey(0), b.x)
  assert jax.tree.map(jnp.shape, fast_vars) == jax.tree.map(jnp.shape, b.variables)


def test_rewritten_block_matches_plain_block_in_training(block_pair):
  b = block_pair

  def run(m):
    def loss(params):
      y, updated = m.apply({'params': params, 'batch_stats': b.variables['batch_stats']}, b.x,
                           True, mutable=['batch_stats'])
      # Weights that differ per channel and cell, so that every gradient entry matters.
      w = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
      return jnp.sum(y * w), (y, updated['batch_stats'])
    return jax.jit(jax.grad(loss, has_aux=True))(b.variables['params'])

  (g_fast, (y_fast, stats_fast)), (g_plain, (y_plain, stats_plain)) = run(b.fast), run(b.plain)
  assert max_relative_error(y_fast, y_plain) <= 1e-5
  jax.tree.map(lambda f, p: np.testing.assert_allclose(f, p, rtol=1e-5, atol=1e-6),
               stats_fast, stats_plain)
  errors = jax.tree.map(max_relative_error, g_fast, g_plain)
  worst = max(jax.tree.leaves(errors))
  assert worst <= 1e-4, errors


def test_rewritten_block_matches_plain_block_in_inference_with_gradients(block_pair):
  # Inference-mode BatchNorm folds; fine-tuning with train_bn=False differentiates through
  # the fold.
  b = block_pair

  def run(m):
    def loss(params):
      y = m.apply({'params': params, 'batch_stats': b.variables['batch_stats']}, b.x, False)
      return jnp.sum(jnp.sin(y)), y
    return jax.jit(jax.grad(loss, has_aux=True))(b.variables['params'])

  (g_fast, y_fast), (g_plain, y_plain) = run(b.fast), run(b.plain)
  assert max_relative_error(y_fast, y_plain) <= 1e-5
  errors = jax.tree.map(max_relative_error, g_fast, g_plain)
  assert max(jax.tree.leaves(errors)) <= 1e-4, errors


def test_rewrites_leave_keras_source_order_unchanged():
  # keras_h5 and the parity tests read the plain model's unit order.
  model = inception.InceptionV3(lowering=ALL_ON)
  assert jax.tree.map(jnp.shape, jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                                jnp.zeros((1, 75, 75, 3)))) == jax.tree.map(
      jnp.shape, jax.eval_shape(inception.InceptionV3().init, jax.random.PRNGKey(0),
                                jnp.zeros((1, 75, 75, 3))))
  assert len(inception.conv_bn_paths()) == 94


def test_bfloat16_compute_keeps_float32_variables_and_stays_close():
  make, shape = BLOCKS['mixed0']
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, shape), jnp.float32)
  plain, half = make(), make(dtype=jnp.bfloat16, lowering=ALL_ON)
  variables = random_variables(plain, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(
      jax.eval_shape(half.init, jax.random.PRNGKey(0), x)))
  y = jax.jit(lambda v, x: plain.apply(v, x, False))(variables, x)
  y_half = jax.jit(lambda v, x: half.apply(v, x, False))(variables, x)
  assert y_half.dtype == jnp.bfloat16
  assert max_relative_error(y_half, y) <= 3e-2


@pytest.fixture(scope='module')
def keras_notop(keras_notop_h5):
  """tf_keras's InceptionV3 endpoints on a random-weights notop file, and ours from it."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  import keras_reference  # pylint: disable=g-import-not-at-top
  keras_model = tf_keras.applications.InceptionV3(
      weights=str(keras_notop_h5), include_top=False, input_shape=(150, 150, 3))
  endpoints, names = keras_reference.endpoint_model(tf_keras, keras_model)
  model, variables = keras_h5.load_h5(keras_notop_h5)
  return types.SimpleNamespace(endpoints=endpoints, names=names, model=model,
                               variables=variables)


def test_rewritten_network_matches_tf_keras_within_parity_bar(keras_notop):
  k = keras_notop
  x = np.random.default_rng(5).uniform(-1, 1, (2, 150, 150, 3)).astype(np.float32)
  theirs = dict(zip(k.names, k.endpoints.predict(x, verbose=0)))
  ours = jax.jit(k.model.clone(lowering=ALL_ON).apply)(k.variables, x)
  errors = {name: max_relative_error(ours[name], theirs[name]) for name in theirs}
  assert max(errors.values()) <= 1e-4, errors


def test_config_speed_switches_reach_the_classifier():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  auto = entry.model(config, 2)
  expected = jax.default_backend() == 'cpu'
  assert auto.lowering == lowering.Lowering(expected, expected, expected, expected)
  assert auto.dtype == jnp.float32
  config.speed.fold_bn = 'off'
  config.speed.merge_1x1 = 'on'
  config.speed.compute_dtype = 'bfloat16'
  model = entry.model(config, 2)
  assert (model.lowering.fold_bn, model.lowering.merge_1x1) == (False, True)
  assert model.dtype == jnp.bfloat16
  config.speed.fold_bn = 'sometimes'
  with pytest.raises(ValueError, match='config.speed.fold_bn'):
    entry.model(config, 2)


def test_classifier_normalises_uint8_images_on_the_device_as_the_pipeline_does():
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from hhjax.data import decode  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  pixels = np.random.default_rng(3).integers(0, 256, (2, 75, 75, 3)).astype(np.uint8)
  for preprocessing in ('inception', 'rescale'):
    config.data.preprocessing = preprocessing
    model = entry.model(config, 2)
    floats = decode.normalize(tf.constant(pixels), preprocessing).numpy()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), floats)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(variables, pixels), apply(variables, floats))
