"""The classifier: backbone cut, the seed's head, Keras's Dense init, strict pretrained loading."""

import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from hhjax import entry
from hhjax import errors
from hhjax.model import classifier as models
from hhjax.model import inception
from hhjax.training import state as state_lib
from hhjax.weights import pretrained


def _init(model, config):
  """The model's random initial variables, as a function of nothing (to jit or eval_shape)."""
  return functools.partial(state_lib.init_variables, model, config.data.image_size,
                           config.seed)


def _config(**model):
  config = default.get_config()
  config.data.image_size = 75
  config.model.update(model)
  return config


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(config, num_classes=2):
  model = entry.model(config, num_classes)
  return jax.eval_shape(_init(model, config))


def test_unknown_cut_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"cut='mixed11'.*'mixed0', 'mixed1'.*'mixed10'"):
    entry.model(_config(cut='mixed11'), 2)


def test_unknown_head_is_an_error():
  with pytest.raises(ValueError, match=r"head must be one of \('flatten', 'gap'\)"):
    entry.model(_config(head='pool'), 2)


def test_seed_model_has_keras_parameter_counts():
  # keras-reference.md: backbone up to mixed7 8,975,264 (with BN statistics); the seed's head
  # (Flatten 7x7x768 -> Dense 1024 -> Dense 1) 38,537,217.
  config = default.get_config()   # 150x150, cut mixed7, flatten head, 1024 hidden
  variables = _shapes(config)
  assert set(variables['params']) == {'backbone', 'head'}
  assert _count(variables['params']['head']) == 38_537_217
  assert _count(variables['params']['backbone']) + _count(variables['batch_stats']) == 8_975_264
  assert 'mixed8' not in variables['params']['backbone']
  assert variables['params']['head']['hidden']['kernel'].shape == (37_632, 1024)


def test_binary_head_has_one_sigmoid_output_and_multiclass_a_softmax():
  for num_classes, outputs in ((2, 1), (5, 5)):
    config = _config(cut='mixed0', head='gap', hidden=8)
    variables = _shapes(config, num_classes)
    assert variables['params']['head']['output']['kernel'].shape == (8, outputs)
  logits = jnp.array([[0.0], [2.0]])
  np.testing.assert_allclose(models.probabilities(logits),
                             [[0.5, 0.5], [1 - jax.nn.sigmoid(2.0), jax.nn.sigmoid(2.0)]],
                             rtol=1e-6)
  np.testing.assert_allclose(models.probabilities(jnp.zeros((1, 4))).sum(-1), [1.0])


def test_head_options_gap_and_no_hidden_layer():
  config = _config(cut='mixed0', head='gap', hidden=0, dropout=0.0)
  head = _shapes(config)['params']['head']
  assert list(head) == ['output'] and head['output']['kernel'].shape == (256, 1)


def test_dense_layers_use_keras_glorot_uniform_and_zero_bias():
  config = _config(cut='mixed0', head='flatten', hidden=128)
  model = entry.model(config, 3)
  head = jax.jit(_init(model, config))()['params']['head']
  for name, (fan_in, fan_out) in (('hidden', (7 * 7 * 256, 128)), ('output', (128, 3))):
    kernel = np.asarray(head[name]['kernel'])
    limit = np.sqrt(6 / (fan_in + fan_out))
    assert kernel.shape == (fan_in, fan_out)
    assert np.abs(kernel).max() <= limit * (1 + 1e-6)   # float32 rounding of the limit
    if kernel.size > 10_000:  # uniform on [-limit, limit]: std limit / sqrt(3), not lecun's
      assert abs(kernel.std() / (limit / np.sqrt(3)) - 1) < 0.02
      assert np.abs(kernel).max() > 0.99 * limit
    np.testing.assert_array_equal(head[name]['bias'], 0.0)


@pytest.fixture(scope='module')
def converted_mixed1(tmp_path_factory):
  """A converted-weights folder of InceptionV3 up to mixed1 with random values."""
  net = inception.InceptionV3(final_endpoint='mixed1')
  variables = jax.eval_shape(net.init, jax.random.PRNGKey(7), jnp.zeros((1, 75, 75, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                           dict(variables))
  path = tmp_path_factory.mktemp('weights') / 'mixed1'
  pretrained.save_converted(path, net, variables)
  return path, variables


def test_pretrained_backbone_is_loaded_and_the_head_kept(converted_mixed1):
  path, source = converted_mixed1
  config = _config(cut='mixed0', head='gap', hidden=4)
  model = entry.model(config, 2)
  variables = jax.jit(_init(model, config))()
  loaded = pretrained.load_backbone(variables, str(path), 'mixed0')
  for collection in ('params', 'batch_stats'):
    got = traverse_util.flatten_dict(loaded[collection]['backbone'], sep='/')
    want = {k: v for k, v in traverse_util.flatten_dict(source[collection], sep='/').items()
            if not k.startswith('mixed1/')}   # past the cut: left out on purpose
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  np.testing.assert_array_equal(loaded['params']['head']['output']['kernel'],
                                variables['params']['head']['output']['kernel'])


def test_pretrained_weights_ending_before_the_cut_are_an_error(converted_mixed1):
  path, _ = converted_mixed1
  config = _config(cut='mixed2', head='gap', hidden=4)
  variables = _shapes(config)
  with pytest.raises(ValueError, match='mixed2.*mixed1'):
    pretrained.load_backbone(variables, str(path), 'mixed2')


def test_pretrained_weights_that_do_not_fit_the_backbone_are_named(converted_mixed1):
  path, _ = converted_mixed1
  variables = _shapes(_config(cut='mixed0', head='gap', hidden=4))
  conv = variables['params']['backbone']['stem']['conv_1a_3x3']['conv']
  conv['kernel'] = jax.ShapeDtypeStruct((3, 3, 3, 16), jnp.float32)  # a model the file is not
  with pytest.raises(errors.KerasWeightsError,
                     match=r"do not fit the backbone cut at 'mixed0':\n1 arrays of another "
                           r'shape.*\n  params/stem/conv_1a_3x3/conv/kernel: \(3, 3, 3, 32\) vs '
                           r'\(3, 3, 3, 16\)'):
    pretrained.load_backbone(variables, str(path), 'mixed0')
