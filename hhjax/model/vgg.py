"""VGG16 and VGG19 in Flax linen, computing what `keras.applications.VGG16` / `VGG19` compute.

    Keras                                  here
    block1_conv1 ... block1_pool           block1_pool/block1_conv1, block1_pool/block1_conv2
    ...                                    ...
    block5_conv1 ... block5_pool           block5_pool/block5_conv1 ... (3 convs, 4 in VGG19)
    flatten, fc1, fc2, predictions         the top: fc1/, fc2/, predictions/

Every convolution is Keras's Conv2D(3x3, 'same', relu) with a bias; each block ends with
MaxPooling2D(2, 2). The block modules are named after the endpoint that ends them (the pool),
so parameter paths look like `block4_pool/block4_conv2/kernel`; the layers inside keep Keras's
names. VGG has no BatchNorm, so `train` and `train_from` change nothing.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hhjax.model import keras_layers
from hhjax.model.lowering import Lowering

ENDPOINTS = tuple(f'block{i}_pool' for i in range(1, 6))
BLOCKS = ENDPOINTS
# Five 2x2 pools: 32 px leaves 1x1 cells at block5_pool (Keras's own minimum).
MIN_SIZE = 32
_WIDTHS = (64, 128, 256, 512, 512)
# Convolutions per block.
DEPTHS = {16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


class VGGBlock(nn.Module):
  """`convs` Conv2D(3x3, relu) layers and a 2x2 max pool, Keras's block<index>."""
  index: int
  features: int
  convs: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(1, self.convs + 1):
      x = nn.relu(keras_layers.conv(self.features, 3, dtype=self.dtype,
                                    name=f'block{self.index}_conv{j}')(x))
    return keras_layers.max_pool(x, 2, 2)


class VGG(nn.Module):
  """Keras's VGG16 (depth=16) or VGG19 (depth=19), ending at `final_endpoint`.

  Attributes, call arguments and return value as `hhjax.model.inception.InceptionV3`'s;
  `lowering` is accepted for the common interface and applies nothing.
  """
  depth: int = 16
  final_endpoint: str = 'block5_pool'
  include_top: bool = False
  num_classes: int = 1000
  lowering: Lowering = Lowering()
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *,
               train_from: str | None = None) -> dict[str, jax.Array]:
    del train   # No BatchNorm and no dropout in the backbone.
    keras_layers.check_call(f'VGG{self.depth}', ENDPOINTS, BLOCKS, self.final_endpoint,
                            self.include_top, train_from, x, MIN_SIZE)
    endpoints = {}
    for i, name in enumerate(ENDPOINTS[:ENDPOINTS.index(self.final_endpoint) + 1]):
      x = VGGBlock(i + 1, _WIDTHS[i], DEPTHS[self.depth][i], dtype=self.dtype, name=name)(x)
      endpoints[name] = x
    if self.include_top:
      x = x.reshape((x.shape[0], -1))
      x = nn.relu(keras_layers.dense(4096, dtype=self.dtype, name='fc1')(x))
      x = nn.relu(keras_layers.dense(4096, dtype=self.dtype, name='fc2')(x))
      x = keras_layers.dense(self.num_classes, dtype=self.dtype, name='predictions')(x)
      endpoints['predictions'] = nn.softmax(x.astype(jnp.float32))
    return endpoints
