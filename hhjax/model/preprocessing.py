"""How pixels become model inputs: the one definition of config.data.preprocessing.

    'inception'  x / 127.5 - 1   what Keras's ImageNet InceptionV3 weights expect
    'rescale'    x / 255         what the seed notebook did (ImageDataGenerator(rescale=1/255))

Each is `x / divisor + offset` on float32 pixels in [0, 255]. The input pipeline applies it in
TensorFlow (`hhjax.data.decode.normalize`), the model applies it on the device to uint8 batches
(`normalize_images`), and the preview undoes it for display (`denormalize`): all three read
`FORMULAS` below, and the test suite checks that they agree bit for bit.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hhjax import errors

# name -> (divisor, offset): input = pixel / divisor + offset.
FORMULAS = {'inception': (127.5, -1.0), 'rescale': (255.0, 0.0)}
NAMES = tuple(FORMULAS)


def formula(preprocessing: str) -> tuple[float, float]:
  """(divisor, offset) of `preprocessing`; a ConfigError names the allowed values."""
  if preprocessing not in FORMULAS:
    raise errors.ConfigError(
        f'config.data.preprocessing must be one of {NAMES}, got {preprocessing!r}.')
  return FORMULAS[preprocessing]


def normalize_np(pixels: np.ndarray, preprocessing: str = 'inception') -> np.ndarray:
  """float32 pixels in [0, 255] -> model inputs, in numpy (IEEE division, as TF's)."""
  divisor, offset = formula(preprocessing)
  return np.asarray(pixels, np.float32) / np.float32(divisor) + np.float32(offset)


# The model input for every uint8 value, rounded as IEEE division (numpy, TF and Keras's
# preprocess_input): XLA turns a division by a constant into a multiplication by its
# reciprocal, which is 1 ulp off for about half of the values, so the device looks them up.
_TABLES = {name: normalize_np(np.arange(256, dtype=np.float32), name) for name in FORMULAS}


def normalize_images(images: jax.Array, preprocessing: str = 'inception',
                     dtype: Any = jnp.float32) -> jax.Array:
  """Maps uint8 images to the model's input range on the device; floats pass through.

  Sending uint8 moves a quarter of the bytes from host to device. The result is
  bit-identical to normalising in float32 on the host.

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
  formula(preprocessing)
  table = jnp.asarray(_TABLES[preprocessing], dtype)
  return jnp.take(table, images.astype(jnp.int32), axis=0)


def denormalize(image: np.ndarray, preprocessing: str = 'inception') -> np.ndarray:
  """The inverse of the normalisation, to [0, 1] for display; uint8 batches are pixels already."""
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  divisor, offset = formula(preprocessing)
  return np.clip((image.astype(np.float32) - offset) * divisor / 255.0, 0.0, 1.0)
