"""The 3x3 pools and their gradients from shifted slices (config.speed.fast_pools).

XLA:CPU's `reduce_window` and its gradient are several times slower than the same arithmetic
written as elementwise maxima / sums of strided slices. The max pool's forward pass is
bit-identical and its gradient goes to each window's first maximum, as TensorFlow's; the
average pool and the gradients equal the plain ones up to float32 summation order.
"""

from collections.abc import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


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
