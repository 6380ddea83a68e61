"""The values a data field may take, beside one another and without TensorFlow.

Each tuple is named after the module that gives the value its meaning, and that module uses
it. hhjax.config_checks reads them from here, so that a config is checked before TensorFlow
loads: this module must not import it.
"""

# config.data.source: the sources of sources.py.
SOURCES = ('tfds', 'folder', 'fake')
# config.data.resize_method and config.data.image_dtype: what decode.py resizes with and emits.
RESIZE_METHODS = ('bilinear', 'nearest')
IMAGE_DTYPES = ('float32', 'uint8')
# config.data.bad_files: bad_files.py's policies for files that are not readable images.
BAD_FILES = ('error', 'skip')
# config.data.augment.fill_mode: the modes of Keras's ImageDataGenerator (augment.py).
FILL_MODES = ('nearest', 'reflect', 'wrap', 'constant')
