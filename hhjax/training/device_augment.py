"""The training images' augmentation in JAX, inside the jitted train step (data.augment.on).

With config.data.augment.on='device' the input pipeline decodes and resizes each image (or
reads its decoded cache) and ships its uint8 pixels together with what the host drew for it
(`hhjax.data.augment.draws`: a few numbers per image, from the same (seed, salt, position) as
the host path). The step then does the per-pixel work here:

    prepare = for_data(data)          # None when the host augments
    images = prepare(batch)           # float32 model inputs, normalised

in the host path's order: the random-resized crop, ImageDataGenerator's warp and flips, random
erasing, then the normalisation of config.data.preprocessing.

The warp reproduces TensorFlow's ImageProjectiveTransformV3 (bilinear, the same float32
matrix) and, for 'wrap' and 'constant', the scipy conventions hhjax.data.augment adds to it,
so that the two paths agree to float32 rounding on the same pixels (tests/test_device_augment.py
bounds it by 0.05 grey levels). What differs by design: the host path augments the resized
image before rounding it, this one after (config.data.resize_method='bilinear' moves each
input pixel by at most half a grey level; 'nearest' not at all), and the 'random' fill of
random erasing draws its noise with JAX's generator, not TensorFlow's.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hhjax.data import spec as data_spec
from hhjax.model import preprocessing as preprocessing_lib

# Coordinates this close to the border count as inside (hhjax.data.augment's _EDGE_EPS).
_EDGE_EPS = 1e-6


def _coordinates(m6: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """Input (x, y) [H, W] that every output pixel reads, as ImageProjectiveTransformV3."""
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing='ij')
  return m6[0] * xs + m6[1] * ys + m6[2], m6[3] * xs + m6[4] * ys + m6[5]


def _reflect(coord: jax.Array, size: int) -> jax.Array:
  """TensorFlow's REFLECT map (d c b a | a b c d | d c b a), then clamped."""
  if size <= 1:
    return jnp.zeros_like(coord)
  sz2 = 2.0 * size
  below = coord
  below = jnp.where(below < sz2, sz2 * jnp.trunc(-below / sz2) + below, below)
  below = jnp.where(below < -size, below + sz2, -below - 1)
  above = coord - sz2 * jnp.trunc(coord / sz2)
  above = jnp.where(above >= size, sz2 - above - 1, above)
  coord = jnp.where(coord < 0, below, jnp.where(coord > size - 1, above, coord))
  return jnp.clip(coord, 0.0, size - 1.0)


def _scipy_wrap(coord: jax.Array, size: int) -> jax.Array:
  """scipy.ndimage's mode='wrap': period size - 1 (hhjax.data.augment._scipy_wrap)."""
  period = float(size - 1)
  if_negative = coord + period * (jnp.floor(-coord / period) + 1)
  if_beyond = coord - period * jnp.floor(coord / period)
  coord = jnp.where(coord < -_EDGE_EPS, if_negative,
                    jnp.where(coord > period + _EDGE_EPS, if_beyond, coord))
  return jnp.clip(coord, 0.0, period)


def _bilinear(image: jax.Array, x: jax.Array, y: jax.Array, fill: float) -> jax.Array:
  """TensorFlow's bilinear_interpolation: reads outside [0, n) give `fill`."""
  height, width = image.shape[0], image.shape[1]
  x0, y0 = jnp.floor(x), jnp.floor(y)
  x1, y1 = x0 + 1, y0 + 1

  def read(yy, xx):
    inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    yi = jnp.clip(yy, 0, height - 1).astype(jnp.int32)
    xi = jnp.clip(xx, 0, width - 1).astype(jnp.int32)
    return jnp.where(inside[..., None], image[yi, xi], jnp.float32(fill))

  top = (x1 - x)[..., None] * read(y0, x0) + (x - x0)[..., None] * read(y0, x1)
  bottom = (x1 - x)[..., None] * read(y1, x0) + (x - x0)[..., None] * read(y1, x1)
  return (y1 - y)[..., None] * top + (y - y0)[..., None] * bottom


def _scipy_bilinear(image: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
  """hhjax.data.augment._bilinear_gather: in-range coordinates, the far neighbour clamped."""
  height, width = image.shape[0], image.shape[1]
  x0, y0 = jnp.floor(x), jnp.floor(y)
  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  x1, y1 = jnp.minimum(x0 + 1, width - 1), jnp.minimum(y0 + 1, height - 1)
  top = image[y0, x0] * (1 - wx) + image[y0, x1] * wx
  bottom = image[y1, x0] * (1 - wx) + image[y1, x1] * wx
  return top * (1 - wy) + bottom * wy


def warp(image: jax.Array, m6: jax.Array, fill_mode: str = 'nearest',
         cval: float = 0.0) -> jax.Array:
  """hhjax.data.augment.warp in JAX: float32 image [H, W, C] through the matrix rows m6 [6]."""
  height, width = image.shape[0], image.shape[1]
  x, y = _coordinates(m6, height, width)
  if fill_mode == 'wrap':
    return _scipy_bilinear(image, _scipy_wrap(x, width), _scipy_wrap(y, height))
  if fill_mode == 'nearest':
    out = _bilinear(image, jnp.clip(x, 0.0, width - 1.0), jnp.clip(y, 0.0, height - 1.0), cval)
  elif fill_mode == 'reflect':
    out = _bilinear(image, _reflect(x, width), _reflect(y, height), cval)
  elif fill_mode == 'constant':
    out = _bilinear(image, x, y, cval)
    inside = ((x >= -_EDGE_EPS) & (x <= width - 1 + _EDGE_EPS) &
              (y >= -_EDGE_EPS) & (y <= height - 1 + _EDGE_EPS))
    out = jnp.where(inside[..., None], out, jnp.float32(cval))
  else:
    raise ValueError(f'fill_mode must be one of {data_spec.FILL_MODES}, got {fill_mode!r}.')
  return out


def crop_resize(image: jax.Array, box: jax.Array) -> jax.Array:
  """hhjax.data.augment.crop_resize in JAX: the box (top, left, h, w), resized to S x S."""
  height, width = image.shape[0], image.shape[1]
  box = box.astype(jnp.float32)

  def axis(start, length, size):
    at = start + (jnp.arange(size, dtype=jnp.float32) + 0.5) * length / size - 0.5
    return jnp.clip(at, start, start + length - 1)
  y, x = jnp.meshgrid(axis(box[0], box[2], height), axis(box[1], box[3], width), indexing='ij')
  return _scipy_bilinear(image, x, y)


def _flip(image: jax.Array, flip: jax.Array) -> jax.Array:
  image = jnp.where(flip[0], image[:, ::-1], image)
  return jnp.where(flip[1], image[::-1], image)


def _erase(image: jax.Array, box: jax.Array, noise_seed: jax.Array,
           erasing: data_spec.ErasingSpec) -> jax.Array:
  height, width = image.shape[0], image.shape[1]
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = ((rows >= box[0]) & (rows < box[0] + box[2]) &
            (cols >= box[1]) & (cols < box[1] + box[3]))
  if erasing.value == data_spec.ERASE_RANDOM:
    key = jax.random.wrap_key_data(noise_seed.astype(jnp.uint32), impl='threefry2x32')
    fill = jax.random.uniform(key, image.shape, jnp.float32, 0.0, 255.0)
  else:
    fill = jnp.full(image.shape, float(erasing.value), jnp.float32)
  return jnp.where(inside[..., None], fill, image)


def augment_pixels(batch: dict[str, jax.Array], data: data_spec.DataSpec) -> jax.Array:
  """The batch's augmented images, float32 [b, S, S, 3] in [0, 255], not normalised.

  `batch` holds 'image' (uint8 pixels) and the draws of hhjax.data.augment.draws.
  """
  aug, erasing = data.augment, data.random_erasing

  def one(example):
    image = example['image'].astype(jnp.float32)
    if 'crop' in example:
      image = crop_resize(image, example['crop'])
    if 'warp' in example:
      image = _flip(warp(image, example['warp'], aug.fill_mode, float(aug.cval)),
                    example['flip'])
    if 'erase' in example:
      image = _erase(image, example['erase'], example['erase_seed'], erasing)
    return image

  keys = ('image', 'crop', 'warp', 'flip', 'erase', 'erase_seed')
  return jax.vmap(one)({k: batch[k] for k in keys if k in batch})


def _normalize(pixels: jax.Array, preprocessing: str) -> jax.Array:
  """float32 pixels in [0, 255] -> model inputs (hhjax.model.preprocessing's formula)."""
  divisor, offset = preprocessing_lib.formula(preprocessing)
  order = preprocessing_lib.channel_order(preprocessing)
  if order is not None:
    pixels = pixels[..., list(order)]
  return pixels / np.float32(divisor) + jnp.asarray(offset, jnp.float32)


def for_data(data: data_spec.DataSpec) -> Callable[[dict[str, Any]], jax.Array] | None:
  """batch -> the step's float32 model inputs when the device augments; None otherwise."""
  if not data.augments_on_device:
    return None

  def prepare(batch):
    return _normalize(augment_pixels(batch, data), data.preprocessing)
  return prepare
