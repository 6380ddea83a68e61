"""Keras `ImageDataGenerator` augmentation as TensorFlow ops, for use inside tf.data.

Keras draws, per image, a rotation, two shifts, a shear and two zooms, builds one affine matrix
from them (`apply_affine_transform`), resamples the image through it with scipy (bilinear, a pull
from output to input coordinates, centred on the image centre), then flips. This module builds
the same 3x3 matrix with the same conventions and resamples with
`ImageProjectiveTransformV3`, so that a tf.data map can augment without Python per image:

    params = random_transform_params(seed, spec.augment, height, width)
    image = apply_transform(image, params, fill_mode='nearest')

Conventions copied from Keras, on purpose:
  * The matrix acts on (x, y) = (column, row) pixel coordinates and maps output to input.
  * `tx`, Keras's first translation, moves along columns but is drawn from
    `height_shift_range` times the image height; `ty` moves along rows and is drawn from
    `width_shift_range` times the width. (Keras's own naming, kept so that the same parameters
    mean the same thing here; with the seed's equal ranges on square images it changes nothing.)
  * The centring offsets are `height / 2 - 0.5` for x and `width / 2 - 0.5` for y.
  * Shear is in degrees; zoom draws `zx` and `zy` independently from [1 - z, 1 + z].
  * Flips come after the affine transform.

`apply_transform` matches `ImageDataGenerator.apply_transform` to float32 rounding (about 1e-3
grey levels) for every `fill_mode` Keras accepts; tests/test_augment.py checks it against Keras.

Beyond Keras's generator: torchvision's (timm's, Keras 3's) random-resized crop
(`random_resized_crop_box`, `crop_resize`) and a centre crop for evaluation (`centre_crop`),
and timm's random erasing (`random_erasing_box`, `erase`). `host_augment` applies them in
order on the host; `draws` gives the same parameters for the train step to apply on the
device (hhjax.training.device_augment); tests/test_device_augment.py checks both.
"""

from collections.abc import Mapping
import math
from typing import Any

import tensorflow as tf

from hhjax import errors
from hhjax.data import spec as data_spec
from hhjax.data import streams

# config.data.augment.fill_mode: what `apply_transform` accepts, as Keras does.
FILL_MODES = data_spec.FILL_MODES

# Coordinates this close to the border count as inside: scipy decides "inside" in float64, and
# an exact 90 degree rotation must not turn a border row into fill.
_EDGE_EPS = 1e-6

# The parameter names of Keras's `ImageDataGenerator.apply_transform`.
PARAM_NAMES = ('theta', 'tx', 'ty', 'shear', 'zx', 'zy', 'flip_horizontal', 'flip_vertical')


def zoom_bounds(zoom_range: Any) -> tuple[float, float]:
  """Keras's reading of `zoom_range`: a float z means [1 - z, 1 + z], a pair means itself."""
  if isinstance(zoom_range, (int, float)):
    return 1.0 - float(zoom_range), 1.0 + float(zoom_range)
  if len(zoom_range) == 2:
    return float(zoom_range[0]), float(zoom_range[1])
  raise errors.ConfigError(
      f'zoom_range must be a number or a pair [lower, upper], got {zoom_range!r}.')


def keras_transform_matrix(theta, tx, ty, shear, zx, zy, height, width) -> tf.Tensor:
  """The 3x3 matrix of Keras's `apply_affine_transform`, in float64.

  Args:
    theta: rotation in degrees.
    tx: translation along x (columns), in pixels.
    ty: translation along y (rows), in pixels.
    shear: shear angle in degrees.
    zx: zoom along x.
    zy: zoom along y.
    height: image rows.
    width: image columns.

  Returns:
    M such that the output pixel at (x, y) = (column, row) reads the input at M @ (x, y, 1).
  """
  f64 = lambda v: tf.cast(v, tf.float64)
  theta = f64(theta) * (math.pi / 180)
  shear = f64(shear) * (math.pi / 180)
  tx, ty, zx, zy = f64(tx), f64(ty), f64(zx), f64(zy)
  one = tf.ones_like(theta)
  zero = tf.zeros_like(theta)

  def matrix(rows):
    return tf.stack([tf.stack(row) for row in rows])

  cos, sin = tf.cos(theta), tf.sin(theta)
  rotation = matrix([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])
  shift = matrix([[one, zero, tx], [zero, one, ty], [zero, zero, one]])
  shearing = matrix([[one, -tf.sin(shear), zero], [zero, tf.cos(shear), zero], [zero, zero, one]])
  zoom = matrix([[zx, zero, zero], [zero, zy, zero], [zero, zero, one]])
  m = rotation @ shift @ shearing @ zoom
  # Keras's transform_matrix_offset_center(m, h, w): centre x on h/2 - 0.5 and y on w/2 - 0.5.
  o_x = f64(height) / 2 - 0.5
  o_y = f64(width) / 2 - 0.5
  offset = matrix([[one, zero, o_x * one], [zero, one, o_y * one], [zero, zero, one]])
  reset = matrix([[one, zero, -o_x * one], [zero, one, -o_y * one], [zero, zero, one]])
  return offset @ m @ reset


def _source_coordinates(m: tf.Tensor, height, width) -> tuple[tf.Tensor, tf.Tensor]:
  """Input (x, y) coordinates, float64 [height, width] each, read by every output pixel."""
  ys, xs = tf.meshgrid(tf.range(height, dtype=tf.float64), tf.range(width, dtype=tf.float64),
                       indexing='ij')
  return m[0, 0] * xs + m[0, 1] * ys + m[0, 2], m[1, 0] * xs + m[1, 1] * ys + m[1, 2]


def _scipy_wrap(coord: tf.Tensor, size) -> tf.Tensor:
  """scipy.ndimage's mode='wrap' coordinate mapping: period size - 1 (first and last overlap)."""
  period = tf.cast(size - 1, tf.float64)
  if_negative = coord + period * (tf.floor(-coord / period) + 1)
  if_beyond = coord - period * tf.floor(coord / period)
  coord = tf.where(coord < -_EDGE_EPS, if_negative,
                   tf.where(coord > period + _EDGE_EPS, if_beyond, coord))
  return tf.clip_by_value(coord, 0.0, period)


def _bilinear_gather(image: tf.Tensor, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
  """Bilinear samples of image [H, W, C] at in-range float64 coordinates x, y [H', W']."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  x0, y0 = tf.floor(x), tf.floor(y)
  wx = tf.cast(x - x0, image.dtype)[..., None]
  wy = tf.cast(y - y0, image.dtype)[..., None]
  x0, y0 = tf.cast(x0, tf.int32), tf.cast(y0, tf.int32)
  x1, y1 = tf.minimum(x0 + 1, width - 1), tf.minimum(y0 + 1, height - 1)
  at = lambda yy, xx: tf.gather_nd(image, tf.stack([yy, xx], axis=-1))
  top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
  bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
  return top * (1 - wy) + bottom * wy


def warp(image: tf.Tensor, m: tf.Tensor, *, fill_mode: str = 'nearest',
         cval: float = 0.0) -> tf.Tensor:
  """Resamples float32 image [H, W, C] through the float64 3x3 output -> input matrix `m`.

  Bilinear, with scipy.ndimage's fill modes (Keras's): the warp of `apply_transform`, which
  what `apply_transform` resamples with.
  """
  if fill_mode not in FILL_MODES:
    raise ValueError(f'fill_mode must be one of {FILL_MODES}, got {fill_mode!r}.')
  image = tf.convert_to_tensor(image, tf.float32)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  if fill_mode == 'wrap':
    # ImageProjectiveTransformV3's WRAP repeats with period n, scipy's 'wrap' with period n - 1.
    x, y = _source_coordinates(m, height, width)
    out = _bilinear_gather(image, _scipy_wrap(x, width), _scipy_wrap(y, height))
  else:
    transform = tf.cast(tf.reshape(m, [9])[:8], tf.float32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=tf.stack([height, width]),
        fill_value=tf.constant(cval, tf.float32), interpolation='BILINEAR',
        fill_mode=fill_mode.upper())[0]
    if fill_mode == 'constant':
      # scipy fills every pixel whose source lies outside the image; V3 would still blend a
      # border band between the edge pixels and cval.
      x, y = _source_coordinates(m, height, width)
      inside = ((x >= -_EDGE_EPS) & (x <= tf.cast(width - 1, tf.float64) + _EDGE_EPS) &
                (y >= -_EDGE_EPS) & (y <= tf.cast(height - 1, tf.float64) + _EDGE_EPS))
      out = tf.where(inside[..., None], out, tf.constant(cval, tf.float32))
  return tf.ensure_shape(out, image.shape)


def apply_transform(image: tf.Tensor, params: Mapping[str, Any], *, fill_mode: str = 'nearest',
                    cval: float = 0.0) -> tf.Tensor:
  """Keras's `ImageDataGenerator.apply_transform`, in TensorFlow ops.

  Args:
    image: float32 [H, W, C].
    params: any of PARAM_NAMES (Keras's transform_parameters); missing ones are neutral.
    fill_mode: how pixels read from outside the image are filled, as Keras's argument.
    cval: the fill value for fill_mode='constant'.

  Returns:
    The transformed image, float32 [H, W, C].
  """
  if fill_mode not in FILL_MODES:
    raise ValueError(f'fill_mode must be one of {FILL_MODES}, got {fill_mode!r}.')
  image = tf.convert_to_tensor(image, tf.float32)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  m = keras_transform_matrix(
      params.get('theta', 0.0), params.get('tx', 0.0), params.get('ty', 0.0),
      params.get('shear', 0.0), params.get('zx', 1.0), params.get('zy', 1.0), height, width)
  out = warp(image, m, fill_mode=fill_mode, cval=cval)
  flip_h = tf.cast(params.get('flip_horizontal', False), tf.bool)
  flip_v = tf.cast(params.get('flip_vertical', False), tf.bool)
  out = tf.cond(flip_h, lambda: tf.reverse(out, axis=[1]), lambda: out)
  out = tf.cond(flip_v, lambda: tf.reverse(out, axis=[0]), lambda: out)
  return tf.ensure_shape(out, image.shape)


def _shift_pixels(u: tf.Tensor, shift_range: float, size) -> tf.Tensor:
  """A Keras shift draw: fractions (< 1) of the image size, else pixels."""
  shift = (2 * u - 1) * shift_range
  if shift_range < 1:
    shift *= tf.cast(size, tf.float32)
  return shift


def random_transform_params(seed: tf.Tensor, aug: data_spec.AugmentSpec, height,
                            width) -> dict[str, tf.Tensor]:
  """Keras's `ImageDataGenerator.get_random_transform`, drawn statelessly from `seed`.

  Args:
    seed: int32/int64 [2], a stateless seed; the same seed gives the same parameters.
    aug: the ranges and flips (config.data.augment, under Keras's argument names).
    height: image rows.
    width: image columns.

  Returns:
    Keras's transform_parameters: float32 scalars 'theta', 'tx', 'ty', 'shear', 'zx', 'zy'
    and bool scalars 'flip_horizontal', 'flip_vertical'.
  """
  u = tf.random.stateless_uniform([8], seed=seed, dtype=tf.float32)
  zoom_lo, zoom_hi = zoom_bounds(aug.zoom_range)
  return {
      'theta': (2 * u[0] - 1) * float(aug.rotation_range),
      # Keras: tx from height_shift_range x rows, ty from width_shift_range x cols.
      'tx': _shift_pixels(u[1], float(aug.height_shift_range), height),
      'ty': _shift_pixels(u[2], float(aug.width_shift_range), width),
      'shear': (2 * u[3] - 1) * float(aug.shear_range),
      'zx': zoom_lo + u[4] * (zoom_hi - zoom_lo),
      'zy': zoom_lo + u[5] * (zoom_hi - zoom_lo),
      'flip_horizontal': (u[6] < 0.5) & bool(aug.horizontal_flip),
      'flip_vertical': (u[7] < 0.5) & bool(aug.vertical_flip),
  }


def random_augment(image: tf.Tensor, seed: tf.Tensor, aug: data_spec.AugmentSpec) -> tf.Tensor:
  """One Keras ImageDataGenerator augmentation of a float32 [H, W, C] image, seeded."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  params = random_transform_params(seed, aug, height, width)
  return apply_transform(image, params, fill_mode=aug.fill_mode, cval=aug.cval)


# ----------------------------------------------------------------------------- crops

# torchvision's, timm's and Keras 3's number of tries before the fallback.
_ATTEMPTS = 10


def crop_resize(image: tf.Tensor, box: tf.Tensor) -> tf.Tensor:
  """The box (top, left, h, w) of float32 image [S, S, C], bilinearly resized to S x S.

  Half-pixel centres with the coordinates clamped to the box, as tf.image.resize and PIL's
  resize of the cropped box: output column x reads left + (x + 0.5) * w / S - 0.5 (rows
  alike). No antialiasing: the box is never larger than the output.
  """
  height, width = int(image.shape[0]), int(image.shape[1])
  box = tf.cast(box, tf.float64)

  def axis(start, length, size):
    at = start + (tf.range(size, dtype=tf.float64) + 0.5) * length / size - 0.5
    return tf.clip_by_value(at, start, start + length - 1)
  y, x = tf.meshgrid(axis(box[0], box[2], height), axis(box[1], box[3], width), indexing='ij')
  return tf.ensure_shape(_bilinear_gather(image, x, y), image.shape)


def _log_uniform(u: tf.Tensor, bounds) -> tf.Tensor:
  lo, hi = math.log(bounds[0]), math.log(bounds[1])
  return tf.exp(lo + tf.cast(u, tf.float64) * (hi - lo))


def _first_valid(valid: tf.Tensor, values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(whether any attempt is valid, the values [k] of the first valid attempt of [n, k])."""
  first = tf.argmax(tf.cast(valid, tf.int32))
  return tf.reduce_any(valid), tf.gather(values, first)


def random_resized_crop_box(seed: tf.Tensor, crop: data_spec.CropSpec, height: int,
                            width: int) -> tf.Tensor:
  """torchvision's RandomResizedCrop.get_params (timm's, Keras 3's), drawn from `seed`.

  Up to 10 tries: an area fraction uniform in crop.scale and an aspect ratio (width / height)
  log-uniform in crop.ratio give w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio));
  the first box that fits is placed uniformly at random. If none fits, the fallback: the
  largest centred box whose aspect ratio is clipped into crop.ratio.

  Returns:
    int32 [4]: (top, left, box height, box width), in pixels.
  """
  u = tf.cast(tf.random.stateless_uniform([_ATTEMPTS, 4], seed=seed, dtype=tf.float32),
              tf.float64)
  area = float(height * width)
  target = area * (crop.scale[0] + u[:, 0] * (crop.scale[1] - crop.scale[0]))
  aspect = _log_uniform(u[:, 1], crop.ratio)
  w = tf.round(tf.sqrt(target * aspect))   # round half to even, as Python's round
  h = tf.round(tf.sqrt(target / aspect))
  valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  # randint(0, height - h) inclusive: floor(u * (height - h + 1)).
  top = tf.minimum(tf.floor(u[:, 2] * (height - h + 1)), height - h)
  left = tf.minimum(tf.floor(u[:, 3] * (width - w + 1)), width - w)
  found, box = _first_valid(valid, tf.stack([top, left, h, w], axis=1))
  in_ratio = width / height
  if in_ratio < min(crop.ratio):
    fw, fh = width, int(round(width / min(crop.ratio)))
  elif in_ratio > max(crop.ratio):
    fw, fh = int(round(height * max(crop.ratio))), height
  else:
    fw, fh = width, height
  fallback = tf.constant([(height - fh) // 2, (width - fw) // 2, fh, fw], tf.float64)
  return tf.cast(tf.where(found, box, fallback), tf.int32)


def centre_crop_box(fraction: float, height: int, width: int) -> tuple[int, int, int, int]:
  """The centred box of `fraction` of each side: (top, left, box height, box width).

  Sides round to whole pixels and the box's corner as torchvision's CenterCrop places it.
  """
  box_h, box_w = max(1, int(round(fraction * height))), max(1, int(round(fraction * width)))
  return (int(round((height - box_h) / 2)), int(round((width - box_w) / 2)), box_h, box_w)


def centre_crop(image: tf.Tensor, fraction: float | None) -> tf.Tensor:
  """float32 [S, S, C] -> its centre box of `fraction`, resized back to S x S (None: as is)."""
  if fraction is None:
    return image
  box = centre_crop_box(fraction, int(image.shape[0]), int(image.shape[1]))
  return crop_resize(image, tf.constant(box, tf.int32))


# ----------------------------------------------------------------------------- random erasing


def random_erasing_box(seed: tf.Tensor, erasing: data_spec.ErasingSpec, height: int,
                       width: int) -> tf.Tensor:
  """timm's RandomErasing (Zhong et al. 2017, Algorithm 1) box, drawn from `seed`.

  With probability erasing.probability, up to 10 tries: an area fraction uniform in
  erasing.scale and an aspect ratio (height / width) log-uniform in erasing.ratio give
  h = round(sqrt(area * ratio)), w = round(sqrt(area / ratio)); the first box with h < height
  and w < width is placed uniformly at random. No box fits, or the coin says no: nothing erased.

  Returns:
    int32 [4]: (top, left, box height, box width); height and width 0 when nothing is erased.
  """
  u = tf.cast(tf.random.stateless_uniform([_ATTEMPTS * 4 + 1], seed=seed, dtype=tf.float32),
              tf.float64)
  coin, u = u[0], tf.reshape(u[1:], [_ATTEMPTS, 4])
  area = float(height * width)
  target = area * (erasing.scale[0] + u[:, 0] * (erasing.scale[1] - erasing.scale[0]))
  aspect = _log_uniform(u[:, 1], erasing.ratio)
  h = tf.round(tf.sqrt(target * aspect))
  w = tf.round(tf.sqrt(target / aspect))
  valid = (w < width) & (h < height)
  top = tf.minimum(tf.floor(u[:, 2] * (height - h + 1)), height - h)
  left = tf.minimum(tf.floor(u[:, 3] * (width - w + 1)), width - w)
  found, box = _first_valid(valid, tf.stack([top, left, h, w], axis=1))
  erase = found & (coin < erasing.probability)
  return tf.cast(tf.where(erase, box, tf.zeros([4], tf.float64)), tf.int32)


def erase(image: tf.Tensor, box: tf.Tensor, fill: tf.Tensor) -> tf.Tensor:
  """image [H, W, C] with the box (top, left, h, w) replaced by `fill` (broadcast to it)."""
  height, width = image.shape[0], image.shape[1]
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = ((rows >= box[0]) & (rows < box[0] + box[2]) &
            (cols >= box[1]) & (cols < box[1] + box[3]))
  return tf.where(inside[..., None], tf.broadcast_to(tf.cast(fill, image.dtype), image.shape),
                  image)


def erase_fill(erasing: data_spec.ErasingSpec, noise_seed: tf.Tensor, shape) -> tf.Tensor:
  """What the erased box holds: erasing.value, or uniform noise in [0, 255] ('random')."""
  if erasing.value == data_spec.ERASE_RANDOM:
    return tf.random.stateless_uniform(shape, seed=noise_seed, maxval=255.0)
  return tf.constant(float(erasing.value), tf.float32)


# ----------------------------------------------------------------------------- per position


def transform_and_flips(params: Mapping[str, Any], height, width):
  """(float64 3x3 matrix, flip_horizontal, flip_vertical) of Keras's transform_parameters."""
  m = keras_transform_matrix(params['theta'], params['tx'], params['ty'], params['shear'],
                             params['zx'], params['zy'], height, width)
  return m, params['flip_horizontal'], params['flip_vertical']


def _seeds(seed: int, position: tf.Tensor) -> dict[str, tf.Tensor]:
  return {name: streams.stateless_seed(seed, salt, position)
          for name, salt in (('crop', streams.CROP_SALT), ('augment', streams.AUGMENT_SALT),
                             ('erase', streams.ERASE_SALT))}


def draws(spec: data_spec.DataSpec, position: tf.Tensor, height: int,
          width: int) -> dict[str, tf.Tensor]:
  """What the training image at stream `position` has drawn, for every augmentation on.

  The parameters both paths apply: 'crop' (int32 [4], the crop's (top, left, h, w)), 'warp' (float32 [6], ImageDataGenerator's matrix rows, as
  ImageProjectiveTransformV3 reads them), 'flip' (bool [2], horizontal, vertical), 'erase'
  (int32 [4], the erased box) and 'erase_seed' (int32 [2], for the 'random' fill). Each is
  drawn from (config.seed, its salt, position): the same draws on the host and on the device.
  """
  seeds = _seeds(spec.seed, position)
  out = {}
  if spec.crop.random_resized_crop:
    out['crop'] = random_resized_crop_box(seeds['crop'], spec.crop, height, width)
  if spec.augment.enabled:
    params = random_transform_params(seeds['augment'], spec.augment, height, width)
    m, flip_h, flip_v = transform_and_flips(params, height, width)
    out['warp'] = tf.cast(tf.reshape(m, [9])[:6], tf.float32)
    out['flip'] = tf.stack([flip_h, flip_v])
  if spec.random_erasing.enabled:
    out['erase'] = random_erasing_box(seeds['erase'], spec.random_erasing, height, width)
    out['erase_seed'] = tf.cast(
        tf.random.experimental.stateless_fold_in(seeds['erase'], 1), tf.int32)
  return out


def host_augment(image: tf.Tensor, spec: data_spec.DataSpec, position: tf.Tensor) -> tf.Tensor:
  """The training image at `position`, float32 [S, S, C] in [0, 255], augmented on the host.

  In this order: the random-resized crop, ImageDataGenerator's warp and flips (Keras's
  `random_augment`, unchanged when it is the only one on), random erasing.
  """
  height, width = int(image.shape[0]), int(image.shape[1])
  seeds = _seeds(spec.seed, position)
  if spec.crop.random_resized_crop:
    image = crop_resize(image, random_resized_crop_box(seeds['crop'], spec.crop, height, width))
  if spec.augment.enabled:
    image = random_augment(image, seeds['augment'], spec.augment)
  if spec.random_erasing.enabled:
    box = random_erasing_box(seeds['erase'], spec.random_erasing, height, width)
    noise_seed = tf.random.experimental.stateless_fold_in(seeds['erase'], 1)
    image = erase(image, box, erase_fill(spec.random_erasing, noise_seed, image.shape))
  return image
