"""The fast lowerings compute what the plain operations compute."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from hhjax.model import fast_convs
from hhjax.model import fast_pools
from hhjax.model import lowering
from hhjax.model import preprocessing

DN = ('NHWC', 'HWIO', 'NHWC')


def _plain_conv(x, k, padding='VALID', strides=(1, 1)):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def _grads(conv, x, k):
  # A nonlinear loss so that the incoming gradient differs per output cell.
  return jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k))), (0, 1)))(x, k)


def _assert_close(a, b, rtol=1e-6):
  # Relative to the largest magnitude: the only allowed difference is summation order.
  a, b = np.asarray(a), np.asarray(b)
  assert a.shape == b.shape
  assert np.max(np.abs(a - b)) <= rtol * np.max(np.abs(b)), np.max(np.abs(a - b))


@pytest.mark.parametrize('in_shape,kernel_shape', [
    ((2, 37, 37, 32), (3, 3, 32, 32)),    # the stem's 3x3 'VALID' conv, small
    ((2, 17, 17, 80), (3, 3, 80, 192)),   # the stem's 80 -> 192 conv, small
    ((2, 9, 11, 8), (1, 7, 8, 4)),        # non-square kernel and input
])
def test_valid_conv_as_pad_crop_is_identical_and_gradients_match(in_shape, kernel_shape):
  x, k = _normal(0, in_shape), _normal(1, kernel_shape)
  plain = jax.jit(_plain_conv)(x, k)
  fast = jax.jit(fast_convs.conv_valid_as_pad_crop)(x, k)
  assert fast.shape == plain.shape
  np.testing.assert_array_equal(fast, plain)
  # The backward convolutions may sum in another order: equal up to float32 rounding.
  for g_fast, g_plain in zip(_grads(fast_convs.conv_valid_as_pad_crop, x, k),
                             _grads(_plain_conv, x, k)):
    _assert_close(g_fast, g_plain)


def test_1x1_conv_as_matmul_matches_conv_with_gradients():
  x, k = _normal(0, (2, 16, 16, 288)), _normal(1, (1, 1, 288, 64))
  _assert_close(jax.jit(fast_convs.conv_1x1_as_matmul)(x, k), _plain_conv(x, k))
  fast_grads = _grads(fast_convs.conv_1x1_as_matmul, x, k)
  for g_fast, g_plain in zip(fast_grads, _grads(_plain_conv, x, k)):
    _assert_close(g_fast, g_plain)


def test_1x1_conv_as_matmul_rejects_larger_kernels():
  with pytest.raises(ValueError, match='1x1'):
    fast_convs.conv_1x1_as_matmul(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)))


@pytest.mark.parametrize('kernel_shape,strides,padding,route', [
    ((1, 1, 6, 5), (1, 1), 'VALID', 'matmul'),
    ((1, 1, 6, 5), (1, 1), 'SAME', 'matmul'),          # 1x1 'SAME' has no padding
    ((3, 3, 6, 5), (1, 1), 'VALID', 'pad_crop'),
    ((3, 3, 6, 5), (1, 1), [(0, 0), (0, 0)], 'pad_crop'),
    ((3, 3, 6, 5), (1, 1), 'SAME', 'plain'),
    ((1, 7, 6, 5), (1, 1), 'SAME', 'plain'),
    ((3, 3, 6, 5), (2, 2), 'VALID', 'plain'),          # stride 2 shows no slowdown
    ((1, 1, 6, 5), (2, 2), 'VALID', 'plain'),
    ((3, 3, 3, 5), (2, 2), 'VALID', 'patches'),        # the image into the first conv
    ((3, 3, 3, 5), (1, 1), 'SAME', 'patches'),
    ((5, 3, 4, 5), (2, 1), [(1, 2), (0, 1)], 'patches'),
    ((3, 3, 5, 5), (2, 2), 'VALID', 'plain'),          # more channels: XLA's conv
    ((1, 1, 3, 5), (1, 1), 'VALID', 'matmul'),
])
def test_conv_general_dilated_routes_and_matches_lax(kernel_shape, strides, padding, route,
                                                     monkeypatch):
  x, k = _normal(0, (2, 11, 11, kernel_shape[2])), _normal(1, kernel_shape)
  calls = []
  for name in ('conv_1x1_as_matmul', 'conv_valid_as_pad_crop', 'conv_as_patch_matmul'):
    original = getattr(fast_convs, name)
    monkeypatch.setattr(fast_convs, name,
                        lambda *a, _o=original, _n=name, **kw: calls.append(_n) or _o(*a, **kw))
  fast = fast_convs.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)
  expected_calls = {'matmul': ['conv_1x1_as_matmul'], 'pad_crop': ['conv_valid_as_pad_crop'],
                    'patches': ['conv_as_patch_matmul'], 'plain': []}[route]
  assert calls == expected_calls
  _assert_close(fast, _plain_conv(x, k, padding, strides))
  fast_grads = _grads(lambda x, k: fast_convs.conv_general_dilated(
      x, k, strides, padding, dimension_numbers=DN), x, k)
  plain_grads = _grads(lambda x, k: _plain_conv(x, k, padding, strides), x, k)
  # sin() of sums of up to 60 products: float32 rounding of the outputs reaches the
  # gradients scaled up (in float64 the two agree to 1e-15).
  for fast_grad, plain_grad in zip(fast_grads, plain_grads):
    _assert_close(fast_grad, plain_grad, rtol=1e-5)


def test_conv_general_dilated_leaves_other_layouts_to_lax():
  x, k = _normal(0, (2, 6, 9, 9)), _normal(1, (5, 6, 3, 3))   # NCHW / OIHW
  fast = fast_convs.conv_general_dilated(x, k, (1, 1), 'VALID')
  np.testing.assert_array_equal(fast, lax.conv_general_dilated(x, k, (1, 1), 'VALID'))


def test_flax_conv_with_fast_lowering_keeps_params_and_output():
  x = _normal(0, (2, 15, 15, 8))
  plain = nn.Conv(16, (3, 3), padding='VALID', use_bias=False)
  fast = nn.Conv(16, (3, 3), padding='VALID', use_bias=False,
                 conv_general_dilated=fast_convs.conv_general_dilated)
  variables = plain.init(jax.random.PRNGKey(0), x)
  assert (jax.tree.map(jnp.shape, fast.init(jax.random.PRNGKey(0), x))
          == jax.tree.map(jnp.shape, variables))
  # Bit-identical where measured before, except on an AMD EPYC (Zen 3, no AVX-512), where
  # XLA's kernel for this shape, run op by op, sums 26 of 5,408 outputs in another order
  # (1 ulp): equal up to float32 summation order is the promise (hhjax/model/fast_convs.py).
  _assert_close(fast.apply(variables, x), plain.apply(variables, x))


def _keras_bn(y, beta, mean, var, eps=1e-3):
  # keras/src/backend/jax/nn.py batch_normalization, scale=None.
  inv = lax.rsqrt(var + eps)
  return y * inv + (beta - mean * inv)


@pytest.mark.parametrize('kernel_shape', [(3, 3, 32, 64), (1, 1, 64, 48), (1, 7, 16, 24)])
def test_fold_bn_matches_conv_then_inference_bn(kernel_shape):
  x, k = _normal(0, (2, 12, 12, kernel_shape[2])), _normal(1, kernel_shape) * 0.1
  out = kernel_shape[-1]
  beta, mean = _normal(2, (out,)), _normal(3, (out,))
  # Variances over several orders of magnitude, some tiny so that eps matters.
  var = jnp.exp(_normal(4, (out,)) * 3.0)
  plain = jax.jit(lambda x, k: _keras_bn(_plain_conv(x, k, 'SAME'), beta, mean, var))(x, k)
  k_f, b_f = fast_convs.fold_bn(k, beta, mean, var, 1e-3)
  assert k_f.shape == k.shape and b_f.shape == beta.shape
  _assert_close(jax.jit(lambda x, k: _plain_conv(x, k, 'SAME') + b_f)(x, k_f), plain, rtol=1e-5)


def test_fold_bn_gradients_match_unfolded():
  x, k = _normal(0, (2, 9, 9, 8)), _normal(1, (3, 3, 8, 6)) * 0.2
  beta, mean, var = _normal(2, (6,)), _normal(3, (6,)), jnp.exp(_normal(4, (6,)))

  def plain(k, beta):
    return jnp.sum(jnp.sin(jax.nn.relu(_keras_bn(_plain_conv(x, k, 'SAME'), beta, mean, var))))

  def folded(k, beta):
    k_f, b_f = fast_convs.fold_bn(k, beta, mean, var)
    return jnp.sum(jnp.sin(jax.nn.relu(_plain_conv(x, k_f, 'SAME') + b_f)))

  for g_f, g_p in zip(jax.jit(jax.grad(folded, (0, 1)))(k, beta),
                      jax.jit(jax.grad(plain, (0, 1)))(k, beta)):
    _assert_close(g_f, g_p, rtol=1e-5)


def test_merged_1x1_convs_match_separate_convs_with_gradients():
  # mixed4's three 1x1 convolutions that read the block input (192, 128, 128 channels).
  x = _normal(0, (2, 7, 7, 96))
  kernels = [_normal(i, (1, 1, 96, c)) for i, c in enumerate((48, 32, 32), start=1)]
  biases = [_normal(10 + i, (k.shape[-1],)) for i, k in enumerate(kernels)]
  separate = [_plain_conv(x, k) + b for k, b in zip(kernels, biases)]
  merged = fast_convs.merged_conv(x, kernels, biases)
  assert [m.shape for m in merged] == [s.shape for s in separate]
  for m, s in zip(merged, separate):
    _assert_close(m, s)

  def loss(ks, fn):
    return sum(jnp.sum(jnp.sin(y) * (i + 1)) for i, y in enumerate(fn(ks)))

  g_merged = jax.jit(jax.grad(lambda ks: loss(ks, lambda ks: fast_convs.merged_conv(x, ks))))(
      kernels)
  g_separate = jax.jit(jax.grad(lambda ks: loss(ks, lambda ks: [_plain_conv(x, k) for k in ks])))(
      kernels)
  for a, b in zip(g_merged, g_separate):
    _assert_close(a, b, rtol=1e-5)   # weight gradients sum 98 terms with cancellation


def test_merge_kernels_rejects_different_inputs():
  with pytest.raises(ValueError, match='agree on all but the output axis'):
    fast_convs.merge_kernels([jnp.zeros((1, 1, 8, 4)), jnp.zeros((1, 1, 6, 4))])


def test_split_channels_rejects_wrong_sizes():
  with pytest.raises(ValueError, match='sum to 7'):
    fast_convs.split_channels(jnp.zeros((1, 2, 2, 8)), [3, 4])


def test_normalize_images_on_device_equals_float_preprocessing():
  images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
  as_float = images.astype(np.float32)
  np.testing.assert_array_equal(preprocessing.normalize_images(jnp.asarray(images), 'inception'),
                                as_float / np.float32(127.5) - np.float32(1.0))
  np.testing.assert_array_equal(preprocessing.normalize_images(jnp.asarray(images), 'rescale'),
                                as_float / np.float32(255.0))
  floats = jnp.linspace(-1, 1, 12).reshape(1, 2, 2, 3)
  np.testing.assert_array_equal(preprocessing.normalize_images(floats), floats)
  with pytest.raises(ValueError, match='preprocessing'):
    preprocessing.normalize_images(jnp.asarray(images), 'torch')


@pytest.mark.parametrize('value,backend,expected', [
    ('auto', 'cpu', True), ('auto', 'gpu', False), (None, 'tpu', False),
    ('on', 'gpu', True), ('off', 'cpu', False), (True, 'tpu', True), (False, 'cpu', False),
])
def test_resolve_switch(value, backend, expected):
  assert lowering.resolve_switch(value, backend=backend) is expected


def test_resolve_switch_rejects_unknown_values():
  with pytest.raises(ValueError, match='speed.fold_bn must be'):
    lowering.resolve_switch('sometimes', name='speed.fold_bn')


@pytest.mark.parametrize('shape', [(2, 9, 9, 5), (2, 8, 11, 3), (1, 3, 3, 4)])
def test_max_pool_from_slices_is_identical_and_routes_gradients_to_the_first_maximum(shape):
  rng = np.random.default_rng(0)
  # Rounded ReLU outputs: many ties, where the gradient goes to the first maximum only.
  x = jnp.asarray(np.maximum(np.round(rng.normal(size=shape), 1), 0), jnp.float32)
  plain = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
  fast = fast_pools.max_pool_3x3_s2
  np.testing.assert_array_equal(jax.jit(fast)(x), jax.jit(plain)(x))
  w = jnp.asarray(rng.normal(size=plain(x).shape), jnp.float32)
  grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * w)))(x)
  # Overlapping windows add in another order: equal up to float32 rounding.
  np.testing.assert_allclose(grad(fast), grad(plain), rtol=1e-6, atol=1e-6)
  # Each window sends its whole gradient to exactly one cell, the first maximum.
  ones = jax.jit(jax.grad(lambda x: jnp.sum(fast(x))))(x)
  np.testing.assert_array_equal(ones, jax.jit(jax.grad(lambda x: jnp.sum(plain(x))))(x))
  assert float(jnp.sum(ones)) == plain(x).size


@pytest.mark.parametrize('shape', [(2, 7, 7, 5), (2, 4, 9, 3), (1, 1, 2, 4)])
def test_avg_pool_from_slices_leaves_padding_out_with_the_same_gradients(shape):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  plain = lambda x: nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME',
                                count_include_pad=False)
  fast = fast_pools.avg_pool_3x3_same
  np.testing.assert_allclose(jax.jit(fast)(x), jax.jit(plain)(x), rtol=1e-6, atol=1e-6)
  # Border cells average only the cells that exist: the corner of a constant image stays put.
  np.testing.assert_allclose(fast(jnp.ones(shape)), 1.0, rtol=1e-6)
  w = jnp.asarray(rng.normal(size=shape), jnp.float32)
  grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * w)))(x)
  np.testing.assert_allclose(grad(fast), grad(plain), rtol=1e-6, atol=1e-6)
