"""How pixels become model inputs: the one definition of config.data.preprocessing.

    'inception'  x / 127.5 - 1   Keras's preprocess_input in 'tf' mode: what the ImageNet
                                 InceptionV3, Xception and MobileNetV2 weights expect
    'caffe'      BGR - mean      Keras's 'caffe' mode: RGB -> BGR, then the ImageNet mean
                                 (103.939, 116.779, 123.68) subtracted per channel: what the
                                 ImageNet VGG and ResNet weights expect
    'rescale'    x / 255         what the seed notebook did (ImageDataGenerator(rescale=1/255))
    'raw'        x               the pixels as they are: Keras's EfficientNet normalises inside
                                 the model (its preprocess_input is the identity)

Each is `x[..., channels] / divisor + offset` on float32 pixels in [0, 255], the offset one
number or one per (reordered) channel. The input pipeline applies it in
TensorFlow (`hhjax.data.decode.normalize`), the model applies it on the device to uint8 batches
(`normalize_images`), and the preview undoes it for display (`denormalize`): all three read
`FORMULAS` below, and the test suite checks that they agree bit for bit.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hhjax import errors

# Keras's ImageNet mean in BGR order ('caffe' mode), subtracted as float32.
_CAFFE_MEAN_BGR = np.asarray([103.939, 116.779, 123.68], np.float32)
# name -> (divisor, offset): input = pixel / divisor + offset, the offset a float32 scalar or
# one per channel (after CHANNEL_ORDERS' reordering).
FORMULAS = {'inception': (127.5, -1.0), 'rescale': (255.0, 0.0),
            'caffe': (1.0, -_CAFFE_MEAN_BGR), 'raw': (1.0, 0.0)}
# name -> the input channels in the order the model reads them; absent: as they come (RGB).
CHANNEL_ORDERS = {'caffe': (2, 1, 0)}
NAMES = tuple(FORMULAS)


def formula(preprocessing: str) -> tuple[float, Any]:
  """(divisor, offset) of `preprocessing`; a ConfigError names the allowed values."""
  if preprocessing not in FORMULAS:
    raise errors.ConfigError(
        f'config.data.preprocessing must be one of {NAMES}, got {preprocessing!r}.')
  return FORMULAS[preprocessing]


def channel_order(preprocessing: str) -> tuple[int, int, int] | None:
  """The channel reordering `preprocessing` applies first ((2, 1, 0): RGB -> BGR), or None."""
  formula(preprocessing)
  return CHANNEL_ORDERS.get(preprocessing)


def normalize_np(pixels: np.ndarray, preprocessing: str = 'inception') -> np.ndarray:
  """float32 pixels in [0, 255] -> model inputs, in numpy (IEEE division, as TF's)."""
  divisor, offset = formula(preprocessing)
  pixels = np.asarray(pixels, np.float32)
  order = channel_order(preprocessing)
  if order is not None:
    pixels = pixels[..., list(order)]
  return pixels / np.float32(divisor) + np.asarray(offset, np.float32)


def _table(preprocessing: str) -> np.ndarray:
  """[256] (or [256, 3] with per-channel offsets, in the model's channel order)."""
  values = np.arange(256, dtype=np.float32)
  divisor, offset = formula(preprocessing)
  return (values[:, None] if np.ndim(offset) else values) / np.float32(divisor) + np.asarray(
      offset, np.float32)


# The model input for every uint8 value, rounded as IEEE division (numpy, TF and Keras's
# preprocess_input): XLA turns a division by a constant into a multiplication by its
# reciprocal, which is 1 ulp off for about half of the values, so the device looks them up.
_TABLES = {name: _table(name) for name in FORMULAS}


def normalize_images(images: jax.Array, preprocessing: str = 'inception',
                     dtype: Any = jnp.float32) -> jax.Array:
  """Maps uint8 images to the model's input range on the device; floats pass through.

  Sending uint8 moves a quarter of the bytes from host to device. The result is
  bit-identical to normalising in float32 on the host.

  Args:
    images: uint8 [..., H, W, C] in [0, 255], or floats already normalised.
    preprocessing: one of NAMES (config.data.preprocessing).
    dtype: the float dtype to return.

  Returns:
    Float images.
  """
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images.astype(dtype)
  if images.dtype != jnp.uint8:
    raise ValueError(f'images must be uint8 or floating point; found {images.dtype}.')
  order = channel_order(preprocessing)
  table = jnp.asarray(_TABLES[preprocessing], dtype)
  index = images.astype(jnp.int32)
  if order is not None:
    index = index[..., list(order)]
  if table.ndim == 2:   # one column per channel
    return table[index, jnp.arange(table.shape[1])]
  return jnp.take(table, index, axis=0)


def denormalize(image: np.ndarray, preprocessing: str = 'inception') -> np.ndarray:
  """The inverse of the normalisation, to [0, 1] for display; uint8 batches are pixels already."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  divisor, offset = formula(preprocessing)
  image = (image.astype(np.float32) - np.asarray(offset, np.float32)) * divisor / 255.0
  order = channel_order(preprocessing)
  if order is not None:
    image = image[..., list(np.argsort(order))]
  return np.clip(image, 0.0, 1.0)
