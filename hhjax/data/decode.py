"""Image bytes -> model inputs, in TensorFlow ops: decode, resize, normalise.

    image = decode_image(contents)                       # uint8 [H, W, 3]
    image = resize(image, 150, 'bilinear')               # float32 [150, 150, 3] in [0, 255]
    image = to_output(image, 'inception', 'float32')     # what a batch carries

The steps stay separate so that augmentation runs between resizing and normalising, and so that
a batch may carry uint8 pixels that the model normalises on the device. The normalisation
formulas are defined once, in `hhjax.model.preprocessing`.
"""

import re

import numpy as np
import tensorflow as tf

from hhjax import errors
from hhjax.data import augment
from hhjax.data import spec as data_spec
from hhjax.model import preprocessing as preprocessing_lib

# config.data.resize_method and config.data.image_dtype: what `resize` and `to_output` accept.
RESIZE_METHODS = data_spec.RESIZE_METHODS
IMAGE_DTYPES = data_spec.IMAGE_DTYPES

# What `decode_image` reads, and the file extensions that mark it (predict's folder search, the
# bad-file messages): the one list.
IMAGE_FORMATS = {
    'PNG': ('.png',), 'JPEG': ('.jpg', '.jpeg', '.jpe', '.jfif'), 'BMP': ('.bmp',),
    'GIF': ('.gif',), 'WebP': ('.webp',),
}
IMAGE_EXTENSIONS = tuple(ext for exts in IMAGE_FORMATS.values() for ext in exts)


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise errors.ConfigError(f'config.data.{field} must be one of {allowed}, got {value!r}.')


def error_reason(error: Exception) -> str:
  """A TensorFlow error's message as one short line, without graph and op decorations."""
  message = getattr(error, 'message', None) or str(error)
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', message)
  message = re.sub(r'\s*\[Op:\w+\].*', '', message, flags=re.S)
  return message.strip().splitlines()[0] if message.strip() else 'unreadable'


# ----------------------------------------------------------------------------- decoding


def _bmp_header(contents: tf.Tensor) -> tf.Tensor:
  """The first 54 bytes of `contents`, zero-padded so fixed offsets can always be read."""
  return tf.strings.substr(contents, 0, 54) + tf.constant(b'\0' * 54)


def _le_int(header: tf.Tensor, offset: int, size: int) -> tf.Tensor:
  dtype = {2: tf.uint16, 4: tf.int32}[size]
  value = tf.io.decode_raw(tf.strings.substr(header, offset, size), dtype, little_endian=True)[0]
  return tf.cast(value, tf.int32)


def _is_palette_bmp(contents: tf.Tensor) -> tf.Tensor:
  header = _bmp_header(contents)
  return tf.logical_and(tf.equal(tf.strings.substr(header, 0, 2), b'BM'),
                        tf.equal(_le_int(header, 28, 2), 8))


def _decode_palette_bmp(contents: tf.Tensor) -> tf.Tensor:
  """8-bit BMPs: TensorFlow returns palette indices, so look the colours up here."""
  header = _bmp_header(contents)
  dib_size = _le_int(header, 14, 4)
  colors_used = _le_int(header, 46, 4)
  num_colors = tf.where(colors_used > 0, colors_used, 256)
  entry = tf.where(dib_size == 12, 3, 4)  # OS/2 headers store BGR, later ones BGRA.
  table = tf.io.decode_raw(tf.strings.substr(contents, 14 + dib_size, num_colors * entry), tf.uint8)
  palette = tf.reverse(tf.reshape(table, [-1, entry])[:, :3], axis=[1])  # BGR -> RGB
  indices = tf.io.decode_bmp(contents, channels=0)[..., 0]
  tf.debugging.assert_less(tf.cast(indices, tf.int32), tf.shape(palette)[0],
                           message='BMP pixel refers past the end of its colour table')
  return tf.gather(palette, tf.cast(indices, tf.int32))


def decode_image(contents: tf.Tensor) -> tf.Tensor:
  """Encoded PNG, JPEG, BMP, GIF or WebP bytes -> RGB uint8 [H, W, 3].

  Alpha is dropped (not composited), as PIL's convert('RGB') does; grayscale is repeated over
  three channels; palette images are looked up; 16-bit PNGs keep their high byte (within one
  level of v / 257); animated GIFs give their first frame. JPEGs decode exactly as PIL decodes
  them.
  """
  contents = tf.convert_to_tensor(contents, tf.string)
  image = tf.case(
      [(_is_palette_bmp(contents), lambda: _decode_palette_bmp(contents)),
       # The accurate IDCT decodes exactly as PIL, hence as Keras's load_img; the fast default
       # is off by up to ~15 levels.
       (tf.io.is_jpeg(contents),
        lambda: tf.io.decode_jpeg(contents, channels=3, dct_method='INTEGER_ACCURATE'))],
      default=lambda: tf.io.decode_image(contents, channels=3, dtype=tf.uint8,
                                         expand_animations=False),
      exclusive=True)
  return tf.ensure_shape(image, [None, None, 3])


# ----------------------------------------------------------------------------- to model inputs


def resize(image: tf.Tensor, size: int, method: str = 'bilinear') -> tf.Tensor:
  """Resizes to size x size; float32 out, values still in [0, 255].

  'nearest' picks the same pixels as PIL's NEAREST, which Keras's flow_from_directory uses.
  """
  _check_choice('resize_method', method, RESIZE_METHODS)
  image = tf.image.resize(image, [size, size], method=method)
  return tf.cast(image, tf.float32)


def normalize(image: tf.Tensor, preprocessing: str = 'inception') -> tf.Tensor:
  """[0, 255] pixels -> model inputs: `pixel / divisor + offset` of `preprocessing`.

  Kept apart from the rest so that a pipeline may ship uint8 and normalise on the device. The
  division is IEEE float32, as numpy's and Keras's, so the device's lookup table agrees.
  """
  divisor, offset = preprocessing_lib.formula(preprocessing)
  image = tf.cast(image, tf.float32)
  order = preprocessing_lib.channel_order(preprocessing)
  if order is not None:
    image = tf.gather(image, list(order), axis=-1)
  return image / divisor + offset


def to_output(image: tf.Tensor, preprocessing: str, image_dtype: str = 'float32') -> tf.Tensor:
  """[0, 255] pixels -> what a batch carries (config.data.image_dtype).

  'float32' normalises here; 'uint8' rounds to whole grey levels and leaves the normalisation to
  the device. Without augmentation and with 'nearest' resizing the pixels are whole numbers
  already, so 'uint8' changes nothing; otherwise each value moves by at most half a grey level.
  """
  _check_choice('image_dtype', image_dtype, IMAGE_DTYPES)
  if image_dtype == 'float32':
    return normalize(image, preprocessing)
  return tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0), tf.uint8)


def preprocess_image(contents: tf.Tensor, image_size: int, resize_method: str,
                     preprocessing: str, eval_fraction: float | None = None) -> tf.Tensor:
  """Encoded image bytes -> the float32 [S, S, 3] model input of evaluation (no augmentation).

  The arguments are config.data's fields of the same names (eval_fraction: config.data.crop's,
  the centre crop evaluation sees).
  """
  image = resize(decode_image(contents), image_size, resize_method)
  if eval_fraction is not None:
    image = augment.centre_crop(image, eval_fraction)
  return normalize(image, preprocessing)


def load_image(path: str, image_size: int, resize_method: str, preprocessing: str,
               eval_fraction: float | None = None) -> np.ndarray:
  """One image file -> its float32 [S, S, 3] model input, as the eval split would give it.

  A missing file raises DataNotFoundError and an unreadable one DataError, each naming the path
  with TensorFlow's reason in one line.
  """
  try:
    return preprocess_image(tf.io.read_file(path), image_size, resize_method,
                            preprocessing, eval_fraction).numpy()
  except tf.errors.NotFoundError as e:
    raise errors.DataNotFoundError(f'{path}: no such file ({error_reason(e)}).') from None
  except tf.errors.OpError as e:
    raise errors.DataError(f'{path}: not a readable image ({error_reason(e)}).') from None
