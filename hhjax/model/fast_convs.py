"""Faster lowerings of the model's convolutions that keep its numerics (config.speed).

XLA:CPU runs some convolutions far below the machine's matmul rate, and the same arithmetic
written another way runs much faster (benchmarks/README.md has the figures):

* a stride-1 'VALID' convolution is slow, while the same convolution with explicit zero padding
  [(0, kh - 1), (0, kw - 1)] followed by a crop to the valid size is fast and gives the same
  outputs: bit-identical in the model's shapes where measured, equal up to float32 summation
  order in general (XLA's kernels for the two shapes may sum in another order on some CPUs),
  and so are the gradients;
* a 1x1 stride-1 convolution is faster as a matrix product over the channel axis;
* a convolution of the 3-channel image is 3-4x faster as one matrix product over its patches
  (im2col);
* an inference-mode BatchNorm is an affine map per channel, so it folds into the preceding
  convolution's kernel and a bias (float32 rounding differs slightly);
* several 1x1 convolutions that read the same tensor run as one convolution with their kernels
  concatenated, the output split afterwards.

Every function here is pure and works on plain arrays, so the model keeps the parameter tree
that the Keras weight import fills: the rewrites happen when the model is applied
(`hhjax.model.lowering` says which are on).
"""

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PaddingLike = str | Sequence[tuple[int, int]]

_NHWC_HWIO = ('NHWC', 'HWIO', 'NHWC')


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
