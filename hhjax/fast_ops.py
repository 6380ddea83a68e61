"""Faster lowerings of the model's operations that keep its numerics.

XLA:CPU runs some convolutions far below the machine's matmul rate, and the same
arithmetic written another way runs much faster (benchmarks/README.md has the figures):

* a stride-1 'VALID' convolution is slow, while the same convolution with explicit
  zero padding [(0, kh - 1), (0, kw - 1)] followed by a crop to the valid size is fast
  and gives bit-identical outputs (gradients equal up to float32 summation order);
* a 1x1 stride-1 convolution is faster as a matrix product over the channel axis;
* a convolution of the 3-channel image is 3-4x faster as one matrix product over its
  patches (im2col);
* an inference-mode BatchNorm is an affine map per channel, so it folds into the
  preceding convolution's kernel and a bias (float32 rounding differs slightly);
* several 1x1 convolutions that read the same tensor run as one convolution with their
  kernels concatenated, the output split afterwards;
* the 3x3 max and average pools, and their gradients, are far faster as maxima / sums of
  shifted slices than as XLA:CPU's reduce_window.

Every function here is pure and works on plain arrays, so the model keeps the parameter
tree that the Keras weight import fills: the rewrites happen when the model is applied.
GPU and TPU compilers handle 'VALID' and 1x1 convolutions well, so `resolve_switch`
turns the CPU rewrites on for the CPU backend only unless a config says otherwise.
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PaddingLike = str | Sequence[tuple[int, int]]

_NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


def resolve_switch(value: Any, *, name: str = 'switch', backend: str | None = None) -> bool:
  """Turns a config switch ('auto', 'on'/'off', True/False, None) into a bool.

  'auto' (and None) means on for the CPU backend and off elsewhere: the CPU rewrites
  help XLA:CPU and are unmeasured elsewhere.

  Args:
    value: the config value.
    name: the config field, for the error message.
    backend: the JAX backend name; defaults to `jax.default_backend()`.

  Returns:
    Whether the rewrite is on.
  """
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if value is None or (isinstance(value, str) and value.lower() == 'auto'):
    return (backend or jax.default_backend()) == 'cpu'
  if isinstance(value, str) and value.lower() in ('on', 'true', 'yes', '1'):
    return True
  if isinstance(value, str) and value.lower() in ('off', 'false', 'no', '0'):
    return False
  raise ValueError(
      f'{name} must be "auto", "on", "off", True or False; found {value!r}.')


@dataclasses.dataclass(frozen=True)
class Lowering:
  """Which rewrites the model applies (all off: the plain Keras-order computation).

  Attributes:
    fast_convs: stride-1 'VALID' convolutions as pad + crop, 1x1 stride-1 convolutions as
      matmuls (forward bit-identical), and convolutions of the few-channel image as one
      matmul over patches (equal up to float32 summation order, like every gradient).
    fold_bn: an inference-mode BatchNorm (frozen layers, or fine-tuning with
      train_bn=False) folded into its convolution's kernel and a bias. Float32 rounding
      differs slightly (about 1e-6 relative).
    merge_1x1: the 1x1 convolutions of a block that read the block's input run as one
      convolution. Same arithmetic per output channel.
    fast_pools: the 3x3 pools and their gradients as elementwise maxima / sums of shifted
      slices instead of XLA:CPU's slow reduce_window. Max pool forward bit-identical, its
      gradient to the same first maximum of each window; average pool and the gradients
      equal up to float32 summation order.
  """
  fast_convs: bool = False
  fold_bn: bool = False
  merge_1x1: bool = False
  fast_pools: bool = False

  @classmethod
  def from_config(cls, speed: Mapping[str, Any] | None,
                  backend: str | None = None) -> 'Lowering':
    """Resolves `config.speed` ('auto' = on for the CPU backend); absent fields are off."""
    speed = speed or {}
    return cls(**{f.name: resolve_switch(speed[f.name], name=f'config.speed.{f.name}',
                                         backend=backend)
                  for f in dataclasses.fields(cls) if f.name in speed})


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str | None) -> Any:
  """config.speed.compute_dtype -> a dtype; parameters stay float32 whatever is chosen."""
  if name is None:
    return jnp.float32
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'config.speed.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}; '
                     f'found {name!r}.')
  return COMPUTE_DTYPES[name]


def _explicit_pads(padding: PaddingLike, in_hw: Sequence[int], kernel_hw: Sequence[int],
                   strides: Sequence[int]) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    return list(lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides), padding))
  return [tuple(p) for p in padding]


def conv_1x1_as_matmul(x: Array, kernel: Array, *, precision: Any = None,
                       preferred_element_type: Any = None) -> Array:
  """A 1x1 stride-1 convolution (NHWC input, HWIO kernel) as a product over channels."""
  if kernel.shape[:2] != (1, 1):
    raise ValueError(f'expected a 1x1 kernel (1, 1, in, out); found shape {kernel.shape}.')
  return lax.dot_general(
      x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())),
      precision=precision, preferred_element_type=preferred_element_type)


def conv_valid_as_pad_crop(x: Array, kernel: Array, *, precision: Any = None,
                           preferred_element_type: Any = None) -> Array:
  """A stride-1 'VALID' convolution as a padded convolution cropped to the valid size.

  Pads [(0, kh - 1), (0, kw - 1)] at the bottom and right: the first H - kh + 1 rows and
  W - kw + 1 columns of that output are exactly the valid convolution (the padded cells
  only enter the rows and columns that the crop drops), and XLA:CPU runs it several
  times faster.

  Args:
    x: NHWC input.
    kernel: HWIO kernel.
    precision: passed to `lax.conv_general_dilated`.
    preferred_element_type: passed to `lax.conv_general_dilated`.

  Returns:
    The NHWC output of the 'VALID' convolution.
  """
  kh, kw = kernel.shape[:2]
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  if h < 1 or w < 1:
    raise ValueError(f'input {x.shape[1:3]} is smaller than kernel {(kh, kw)}.')
  y = lax.conv_general_dilated(
      x, kernel, (1, 1), [(0, kh - 1), (0, kw - 1)], dimension_numbers=_NHWC_HWIO,
      precision=precision, preferred_element_type=preferred_element_type)
  return y[:, :h, :w, :]


IM2COL_MAX_IN_CHANNELS = 4


def conv_as_patch_matmul(x: Array, kernel: Array, strides: Sequence[int],
                         padding: PaddingLike, *, precision: Any = None,
                         preferred_element_type: Any = None) -> Array:
  """A convolution as one matmul over its input patches (im2col), NHWC / HWIO.

  For inputs with few channels (the RGB image into the first convolution) XLA:CPU's
  convolution is slow, 3-4x slower than gathering the kh * kw strided slices along the
  channel axis and multiplying by the kernel reshaped to (kh * kw * in, out). Equal to the
  convolution up to float32 summation order.

  Args:
    x: NHWC input.
    kernel: HWIO kernel.
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or explicit [(lo, hi), (lo, hi)].
    precision: passed to the matmul.
    preferred_element_type: passed to the matmul.

  Returns:
    The NHWC output.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  pads = _explicit_pads(padding, x.shape[1:3], (kh, kw), (sh, sw))
  x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  n, h, w, _ = x.shape
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  patches = jnp.concatenate(
      [lax.slice(x, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                 (1, sh, sw, 1)) for i in range(kh) for j in range(kw)], axis=-1)
  return lax.dot_general(
      patches, kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())),
      precision=precision, preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                         padding: PaddingLike, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> Array:
  """Drop-in for `lax.conv_general_dilated` that picks the fast CPU lowering.

  NHWC/HWIO undilated ungrouped convolutions: with at most IM2COL_MAX_IN_CHANNELS input
  channels (the image) and a kernel larger than 1x1, a matmul over the patches (any stride
  and padding); otherwise, stride 1 without padding, a matmul (1x1) or pad + crop (larger
  kernels). Every other convolution goes to `lax.conv_general_dilated` unchanged. Pass it
  as `nn.Conv(conv_general_dilated=...)`.
  """
  def fallback():
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)

  if lhs.ndim != 4 or rhs.ndim != 4:
    return fallback()
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
    return fallback()
  ones = (1, 1)
  if (tuple(lhs_dilation or ones) != ones or tuple(rhs_dilation or ones) != ones
      or feature_group_count != 1 or batch_group_count != 1):
    return fallback()
  kwargs = dict(precision=precision, preferred_element_type=preferred_element_type)
  if rhs.shape[2] <= IM2COL_MAX_IN_CHANNELS and rhs.shape[:2] != (1, 1):
    return conv_as_patch_matmul(lhs, rhs, window_strides, padding, **kwargs)
  if tuple(window_strides) != ones:
    return fallback()
  pads = _explicit_pads(padding, lhs.shape[1:3], rhs.shape[:2], ones)
  if any(p != (0, 0) for p in pads):
    return fallback()
  if rhs.shape[:2] == (1, 1):
    return conv_1x1_as_matmul(lhs, rhs, **kwargs)
  return conv_valid_as_pad_crop(lhs, rhs, **kwargs)


def _window_tap(x: Array, i: int, j: int, out_hw: Sequence[int], stride: int) -> Array:
  """x[:, i + stride*h, j + stride*w, :] for every output cell (h, w): one tap of a window."""
  n, _, _, c = x.shape
  ho, wo = out_hw
  return lax.slice(x, (0, i, j, 0),
                   (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                   (1, stride, stride, 1))


def _max_pool_taps(x: Array) -> Array:
  ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  y = _window_tap(x, 0, 0, (ho, wo), 2)
  for i in range(3):
    for j in range(3):
      if i or j:
        y = jnp.maximum(y, _window_tap(x, i, j, (ho, wo), 2))
  return y


def _max_pool_taps_grad(x: Array, dy: Array) -> Array:
  """The max pool's gradient: each window's gradient to its first maximum (row-major).

  That is TensorFlow's rule and `reduce_window`'s (select `>=`, first wins). Tap by tap, a
  mask marks the cells that hold the window's maximum and no earlier tap did; the masked
  gradient goes back to the tap's cells as a strided (interior-padded) `lax.pad`. Windows
  overlap, so a cell can receive from up to four windows: the sum's order differs from
  `reduce_window`'s, so the result equals it up to float32 rounding.
  """
  _, h, w, _ = x.shape
  ho, wo = dy.shape[1:3]
  y = _max_pool_taps(x)
  taken = jnp.zeros(y.shape, bool)
  dx = jnp.zeros_like(x)
  for i in range(3):
    for j in range(3):
      hit = (_window_tap(x, i, j, (ho, wo), 2) == y) & ~taken
      taken = taken | hit
      pads = ((0, 0, 0), (i, h - i - 2 * (ho - 1) - 1, 1), (j, w - j - 2 * (wo - 1) - 1, 1),
              (0, 0, 0))
      dx = dx + lax.pad(jnp.where(hit, dy, jnp.zeros((), dy.dtype)),
                        jnp.zeros((), dy.dtype), pads)
  return dx


@jax.custom_vjp
def max_pool_3x3_s2(x: Array) -> Array:
  """Keras's MaxPooling2D((3, 3), strides=(2, 2)) ('valid'), NHWC.

  The forward pass is the maximum of the window's nine strided slices (bit-identical to
  `reduce_window`, which XLA:CPU runs several times slower); the gradient goes to the first
  maximum of each window, as TensorFlow's, computed from the same slices
  (`_max_pool_taps_grad`: 3.5-5x faster than `reduce_window`'s gradient on XLA:CPU).
  """
  return _max_pool_taps(x)


max_pool_3x3_s2.defvjp(lambda x: (_max_pool_taps(x), x),
                       lambda x, dy: (_max_pool_taps_grad(x, dy),))


def _window_counts(h: int, w: int) -> np.ndarray:
  """Cells of each 3x3 'SAME' window inside an h x w image.

  3 per axis, 2 at a border (1 if the axis is 1 long); shape (1, h, w, 1).
  """
  rc = np.minimum(np.arange(h) + 2, h) - np.maximum(np.arange(h) - 1, 0)
  cc = np.minimum(np.arange(w) + 2, w) - np.maximum(np.arange(w) - 1, 0)
  return (rc[:, None] * cc[None, :]).astype(np.float32)[None, :, :, None]


def _box_sums(x: Array) -> Array:
  """Sums over each 3x3 window, zero outside the image: shifted slices, rows then columns."""
  _, h, w, _ = x.shape
  xp = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
  rows = xp[:, 0:h] + xp[:, 1:h + 1] + xp[:, 2:h + 2]
  return rows[:, :, 0:w] + rows[:, :, 1:w + 1] + rows[:, :, 2:w + 2]


def _avg_pool_sums(x: Array) -> Array:
  return _box_sums(x) / jnp.asarray(_window_counts(*x.shape[1:3]), x.dtype)


@jax.custom_vjp
def avg_pool_3x3_same(x: Array) -> Array:
  """Keras's AveragePooling2D((3, 3), strides=(1, 1), padding='same'), NHWC.

  Padded cells are left out of the average. The forward pass sums shifted slices, rows then
  columns (equal to `reduce_window` up to float32 summation order, several times faster on
  XLA:CPU). The 3x3 box sum is its own adjoint, so the gradient is the box sum of the
  gradient divided by each window's count: the same slices again.
  """
  return _avg_pool_sums(x)


avg_pool_3x3_same.defvjp(
    lambda x: (_avg_pool_sums(x), None),
    lambda _, dy: (_box_sums(dy / jnp.asarray(_window_counts(*dy.shape[1:3]), dy.dtype)),))


def fold_bn(kernel: Array, beta: Array, mean: Array, var: Array,
            epsilon: float = 1e-3) -> tuple[Array, Array]:
  """Folds an inference-mode BatchNorm without scale into the preceding conv.

  conv(x, k) -> (y - mean) / sqrt(var + eps) + beta equals conv(x, k * s) + (beta - mean * s)
  with s = 1 / sqrt(var + eps) per output channel. Differentiable: gradients reach
  `kernel` and `beta` as through the unfolded pair.

  Args:
    kernel: conv kernel, output channels last (HWIO).
    beta: BN offset (Keras's beta, Flax's `bias`), [out].
    mean: BN moving mean, [out].
    var: BN moving variance, [out].
    epsilon: BN epsilon (Keras: 1e-3).

  Returns:
    (folded kernel, bias), same dtypes as `kernel` and `beta`.
  """
  s = lax.rsqrt(var + epsilon)
  return (kernel * s).astype(kernel.dtype), (beta - mean * s).astype(beta.dtype)


def merge_kernels(kernels: Sequence[Array]) -> Array:
  """Concatenates kernels (same input, ...HWI shape) along the output axis."""
  shapes = {tuple(k.shape[:-1]) for k in kernels}
  if len(shapes) != 1:
    raise ValueError('kernels merged into one convolution must agree on all but the '
                     f'output axis; found shapes {[tuple(k.shape) for k in kernels]}.')
  return jnp.concatenate(kernels, axis=-1)


def split_channels(y: Array, sizes: Sequence[int]) -> list[Array]:
  """Splits the last axis into consecutive pieces of the given sizes."""
  if sum(sizes) != y.shape[-1]:
    raise ValueError(f'sizes {list(sizes)} sum to {sum(sizes)}, but the tensor has '
                     f'{y.shape[-1]} channels.')
  offsets = np.cumsum(sizes)[:-1].tolist()
  return jnp.split(y, offsets, axis=-1)


def merged_conv(x: Array, kernels: Sequence[Array], biases: Sequence[Array] | None = None,
                *, conv=None) -> list[Array]:
  """Runs several same-shape convolutions of one input as one and splits the result.

  Args:
    x: NHWC input that every convolution reads.
    kernels: HWIO kernels with equal H, W, I.
    biases: optional per-kernel biases (e.g. from `fold_bn`), added before the split.
    conv: function (x, kernel) -> y; default: a stride-1 'SAME' convolution via
      `conv_general_dilated` above.

  Returns:
    One output per kernel, in order.
  """
  if conv is None:
    conv = lambda x, k: conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=_NHWC_HWIO)
  y = conv(x, merge_kernels(kernels))
  if biases is not None:
    y = y + jnp.concatenate(biases, axis=-1).astype(y.dtype)
  return split_channels(y, [k.shape[-1] for k in kernels])


# x / 127.5 - 1 and x / 255 for every uint8 value, rounded as IEEE division (numpy, TF and
# Keras's preprocess_input): XLA turns a division by a constant into a multiplication by
# its reciprocal, which is 1 ulp off for about half of the values.
_NORMALIZE_TABLES = {
    'inception': np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0),
    'rescale': np.arange(256, dtype=np.float32) / np.float32(255.0),
}


def normalize_images(images: Array, preprocessing: str = 'inception',
                     dtype: Any = jnp.float32) -> Array:
  """Maps uint8 images to the model's input range on the device; floats pass through.

  Sending uint8 moves a quarter of the bytes from host to device. The result is
  bit-identical to normalising in float32 on the host: 'inception' is x / 127.5 - 1,
  'rescale' is x / 255.

  Args:
    images: uint8 [..., H, W, C] in [0, 255], or floats already normalised.
    preprocessing: 'inception' or 'rescale' (config.data.preprocessing).
    dtype: the float dtype to return.

  Returns:
    Float images.
  """
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images.astype(dtype)
  if images.dtype != jnp.uint8:
    raise ValueError(f'images must be uint8 or floating point; found {images.dtype}.')
  if preprocessing not in _NORMALIZE_TABLES:
    raise ValueError(f'preprocessing must be one of {sorted(_NORMALIZE_TABLES)}; '
                     f'found {preprocessing!r}.')
  table = jnp.asarray(_NORMALIZE_TABLES[preprocessing], dtype)
  return jnp.take(table, images.astype(jnp.int32), axis=0)
