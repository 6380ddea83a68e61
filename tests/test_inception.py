"""The Flax InceptionV3: its pieces against Keras's formulas, its shapes, names and modes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hhjax.model import inception
from hhjax.model.inception import ConvBN, InceptionV3
from hhjax.weights import pretrained


def abstract_variables(model, size=150):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# ------------------------------------------------------------------------ average pooling


def padding_excluding_average(x: np.ndarray) -> np.ndarray:
  """3x3/1 'same' average over the cells that exist, one window at a time."""
  _, h, w, _ = x.shape
  out = np.empty_like(x)
  for i in range(h):
    for j in range(w):
      window = x[:, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, :]
      out[:, i, j, :] = window.mean(axis=(1, 2))
  return out


def test_avg_pool_excludes_padding():
  x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
  got = np.asarray(inception.avg_pool_same(jnp.asarray(x)))
  np.testing.assert_allclose(got, padding_excluding_average(x), rtol=1e-6, atol=1e-6)
  # A corner averages 4 cells, an edge 6, not 9: constant input stays constant.
  ones = np.asarray(inception.avg_pool_same(jnp.ones((1, 4, 4, 1))))
  np.testing.assert_allclose(ones, 1.0, rtol=1e-7)


def test_avg_pool_matches_keras_average_pooling_same():
  import keras  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(1).normal(size=(2, 7, 6, 4)).astype(np.float32)
  theirs = keras.layers.AveragePooling2D((3, 3), strides=(1, 1), padding='same')(x)
  np.testing.assert_allclose(np.asarray(inception.avg_pool_same(jnp.asarray(x))),
                             keras.ops.convert_to_numpy(theirs), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ BatchNorm

CHANNELS = 5


@pytest.fixture(scope='module')
def bn_case():
  """A ConvBN whose 1x1 convolution is the identity, so it computes relu(BatchNorm(x)).

  The input has a large mean, where E[x^2] - E[x]^2 would lose the variance's digits.
  """
  rng = np.random.default_rng(0)
  x = (100.0 + rng.normal(size=(4, 6, 6, CHANNELS)) * rng.uniform(0.5, 2.0, CHANNELS))
  beta = rng.normal(size=CHANNELS)
  mean = 100.0 + rng.normal(size=CHANNELS)
  var = rng.uniform(0.5, 2.0, CHANNELS)
  variables = {
      'params': {'conv': {'kernel': np.eye(CHANNELS, dtype=np.float32)[None, None]},
                 'bn': {'bias': beta.astype(np.float32)}},
      'batch_stats': {'bn': {'mean': mean.astype(np.float32), 'var': var.astype(np.float32)}},
  }
  return ConvBN(CHANNELS, (1, 1)), variables, x.astype(np.float32), beta, mean, var


def relu_bn(x, mean, var, beta):
  """Keras's BatchNormalization(scale=False, epsilon=1e-3) then ReLU, in float64."""
  return np.maximum((x.astype(np.float64) - mean) / np.sqrt(var + 1e-3) + beta, 0.0)


def test_batchnorm_inference_uses_moving_statistics_and_keras_epsilon(bn_case):
  unit, variables, x, beta, mean, var = bn_case
  got = unit.apply(variables, x)
  np.testing.assert_allclose(got, relu_bn(x, mean, var, beta), rtol=1e-4, atol=1e-4)


def test_batchnorm_training_uses_biased_batch_variance_and_momentum_0_99(bn_case):
  unit, variables, x, beta, mean, var = bn_case
  got, updates = unit.apply(variables, x, train=True, mutable=['batch_stats'])
  x64 = x.astype(np.float64)
  batch_mean, batch_var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))  # biased
  np.testing.assert_allclose(got, relu_bn(x, batch_mean, batch_var, beta), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updates['batch_stats']['bn']['mean'],
                             0.99 * mean + 0.01 * batch_mean, rtol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['bn']['var'],
                             0.99 * var + 0.01 * batch_var, rtol=1e-5)


def test_batchnorm_matches_keras_layer_in_training_and_inference(bn_case):
  import keras  # pylint: disable=g-import-not-at-top
  unit, variables, x, beta, mean, var = bn_case
  bn = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.99, scale=False)
  bn.build(x.shape)
  bn.set_weights([beta.astype(np.float32), mean.astype(np.float32), var.astype(np.float32)])
  theirs_inference = keras.ops.convert_to_numpy(keras.ops.relu(bn(x, training=False)))
  theirs_train = keras.ops.convert_to_numpy(keras.ops.relu(bn(x, training=True)))
  _, moving_mean, moving_var = bn.get_weights()

  np.testing.assert_allclose(unit.apply(variables, x), theirs_inference, rtol=1e-4, atol=1e-4)
  ours_train, updates = unit.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(ours_train, theirs_train, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updates['batch_stats']['bn']['mean'], moving_mean, rtol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['bn']['var'], moving_var, rtol=1e-5)


# ------------------------------------------------------------------- structure and shapes


def test_endpoint_shapes_at_150_are_keras_shapes():
  out = jax.eval_shape(InceptionV3().apply, abstract_variables(InceptionV3()),
                       jnp.zeros((2, 150, 150, 3)))
  channels = [256, 288, 288] + [768] * 5 + [1280, 2048, 2048]
  sides = [16] * 3 + [7] * 5 + [3] * 3
  assert set(out) == set(inception.ENDPOINTS)
  for name, side, c in zip(inception.ENDPOINTS, sides, channels):
    assert out[name].shape == (2, side, side, c), name
  assert int(np.prod(out['mixed7'].shape[1:])) == 37_632  # what Flatten feeds the seed's head


def test_parameter_counts_are_keras_counts():
  notop = abstract_variables(InceptionV3())
  assert count(notop) == 21_802_784
  assert count(notop['batch_stats']) == 34_432  # Keras's non-trainable weights
  assert count(abstract_variables(InceptionV3(final_endpoint='mixed7'))) == 8_975_264
  top = abstract_variables(InceptionV3(include_top=True), size=299)
  assert count(top) == 21_802_784 + 2048 * 1000 + 1000


def test_layers_past_final_endpoint_are_not_created():
  model = InceptionV3(final_endpoint='mixed7')
  variables = abstract_variables(model)
  expected = {'stem'} | {f'mixed{i}' for i in range(8)}
  assert set(variables['params']) == expected
  assert set(variables['batch_stats']) == expected
  out = jax.eval_shape(model.apply, variables, jnp.zeros((1, 150, 150, 3)))
  assert set(out) == {f'mixed{i}' for i in range(8)}


def test_parameter_paths_name_blocks_and_units_like_keras():
  variables = abstract_variables(InceptionV3())
  paths = ['/'.join(k.key for k in keys)
           for keys, _ in jax.tree_util.tree_leaves_with_path(variables['params'])]
  assert 'mixed6/branch7x7_1/conv/kernel' in paths
  assert 'mixed0/branch_pool/bn/bias' in paths
  assert variables['params']['mixed6']['branch7x7_1']['conv']['kernel'].shape == (1, 1, 768, 160)
  assert set(variables['params']['mixed6']['branch7x7_1']['bn']) == {'bias'}  # no gamma
  assert set(variables['batch_stats']['mixed6']['branch7x7_1']['bn']) == {'mean', 'var'}
  # Every parameter is a conv kernel or a BatchNorm beta, and a block regex selects blocks.
  assert all(re.search(r'/(conv/kernel|bn/bias)$', p) for p in paths)
  assert sum(bool(re.match(r'^mixed[6-7]/', p)) for p in paths) == 2 * 2 * 10
  assert len(inception.conv_bn_paths()) == 94


def test_invalid_configurations_and_inputs_are_refused():
  x = jnp.zeros((1, 75, 75, 3))
  with pytest.raises(ValueError, match='final_endpoint="mixed10"'):
    abstract_variables(InceptionV3(final_endpoint='mixed7', include_top=True))
  with pytest.raises(ValueError, match='final_endpoint must be one of'):
    jax.eval_shape(InceptionV3(final_endpoint='mixed11').init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='at least 75x75'):
    jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, 74, 80, 3)))
  with pytest.raises(ValueError, match='train_from'):
    jax.eval_shape(lambda: InceptionV3().init(jax.random.key(0), x, train_from='mixed'))


# --------------------------------------------------------------- training mode, train_from


@pytest.fixture(scope='module')
def mixed7_runs(keras_notop_h5):
  """Network up to mixed7 on Keras-file weights: inference, train from mixed6, train all."""
  model, variables = pretrained.load_pretrained(keras_notop_h5, final_endpoint='mixed7')
  x = np.random.default_rng(0).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32)

  @jax.jit
  def run(variables, x):
    inference = model.apply(variables, x)
    from_mixed6 = model.apply(variables, x, train=True, train_from='mixed6',
                              mutable=['batch_stats'])
    everything = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return inference, from_mixed6, everything

  return variables, *run(variables, x)


def changed_leaves(new, old) -> list[bool]:
  return jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), new, old))


def test_train_from_keeps_earlier_blocks_in_inference_mode(mixed7_runs):
  variables, inference, (out, updates), _ = mixed7_runs
  for name in [f'mixed{i}' for i in range(6)]:
    np.testing.assert_allclose(out[name], inference[name], rtol=1e-5, atol=1e-5)
  assert not np.allclose(out['mixed6'], inference['mixed6'], rtol=1e-3, atol=1e-3)
  for block in ['stem'] + [f'mixed{i}' for i in range(8)]:
    changed = changed_leaves(updates['batch_stats'][block], variables['batch_stats'][block])
    if block in ('mixed6', 'mixed7'):
      assert all(changed), block
    else:
      assert not any(changed), block


def test_train_without_train_from_updates_every_block(mixed7_runs):
  variables, inference, _, (out, updates) = mixed7_runs
  assert all(changed_leaves(updates['batch_stats'], variables['batch_stats']))
  assert not np.allclose(out['mixed0'], inference['mixed0'], rtol=1e-3, atol=1e-3)
