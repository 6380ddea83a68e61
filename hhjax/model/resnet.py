"""ResNet50, ResNet101 and ResNet152 (v1) in Flax linen, computing what
`keras.applications.ResNet50` / `ResNet101` / `ResNet152` compute.

    Keras                                     here
    conv1_pad, conv1_conv, conv1_bn, pool1    stem/conv1_conv, stem/conv1_bn (+ pads, pool)
    conv2_block1_0_conv ... conv2_block1_out  conv2_block1_out/conv2_block1_0_conv, ...
    ...                                       one module per residual block, named after its
    conv5_block3_out                          output (the endpoint): conv5_block3_out/...
    avg_pool, predictions                     the top: predictions/

A residual block is Keras's v1 bottleneck: 1x1 (with the stage's stride) -> 3x3 -> 1x1 (4x
wider), each Conv2D with a bias and a BatchNormalization with epsilon 1.001e-5, added to the
shortcut (a strided 1x1 conv + BN in each stage's first block, the input otherwise) and a ReLU.
Layers keep Keras's names, so parameter paths look like
`conv4_block2_out/conv4_block2_2_conv/kernel`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hhjax.model import keras_layers
from hhjax.model.lowering import Lowering

BN_EPSILON = 1.001e-5
# Blocks per stage conv2 ... conv5.
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
_FILTERS = (64, 128, 256, 512)
# Keras's minimum: five stride-2 reductions leave 1x1 cells.
MIN_SIZE = 32


def endpoints(depth: int) -> tuple[str, ...]:
  """'conv2_block1_out' ... 'conv5_block3_out': every residual block's output, in order."""
  return tuple(f'conv{stage + 2}_block{b}_out' for stage, n in enumerate(DEPTHS[depth])
               for b in range(1, n + 1))


def stage_ends(depth: int) -> tuple[str, ...]:
  """The last block of each stage: 'conv2_block3_out', ..., 'conv5_block3_out'."""
  return tuple(f'conv{stage + 2}_block{n}_out' for stage, n in enumerate(DEPTHS[depth]))


class Stem(nn.Module):
  """conv1: ZeroPadding(3) -> Conv2D(64, 7, stride 2) -> BN -> ReLU -> ZeroPadding(1) ->
  MaxPooling2D(3, stride 2)."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = keras_layers.zero_pad(x, 3)
    x = keras_layers.conv(64, 7, strides=2, padding='VALID', dtype=self.dtype,
                          name='conv1_conv')(x)
    x = keras_layers.batch_norm(epsilon=BN_EPSILON, dtype=self.dtype, name='conv1_bn')(
        x, use_running_average=not train)
    x = keras_layers.zero_pad(nn.relu(x), 1)
    return keras_layers.max_pool(x, 3, 2)


class Bottleneck(nn.Module):
  """Keras's `residual_block_v1`; `prefix` is Keras's block name, e.g. 'conv3_block1'."""
  prefix: str
  filters: int
  strides: int = 1
  conv_shortcut: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(keras_layers.conv, dtype=self.dtype)

    def bn(y, suffix):
      return keras_layers.batch_norm(epsilon=BN_EPSILON, dtype=self.dtype,
                                     name=f'{self.prefix}_{suffix}')(
          y, use_running_average=not train)

    if self.conv_shortcut:
      shortcut = conv(4 * self.filters, 1, strides=self.strides, padding='VALID',
                      name=f'{self.prefix}_0_conv')(x)
      shortcut = bn(shortcut, '0_bn')
    else:
      shortcut = x
    y = conv(self.filters, 1, strides=self.strides, padding='VALID',
             name=f'{self.prefix}_1_conv')(x)
    y = nn.relu(bn(y, '1_bn'))
    y = conv(self.filters, 3, name=f'{self.prefix}_2_conv')(y)
    y = nn.relu(bn(y, '2_bn'))
    y = conv(4 * self.filters, 1, padding='VALID', name=f'{self.prefix}_3_conv')(y)
    y = bn(y, '3_bn')
    return nn.relu(shortcut + y)


class ResNet(nn.Module):
  """Keras's ResNet50 / ResNet101 / ResNet152 (`depth`), ending at `final_endpoint`.

  Attributes, call arguments and return value as `hhjax.model.inception.InceptionV3`'s (the
  blocks for `train_from` are 'stem' and the endpoints); `lowering` is accepted for the common
  interface and applies nothing.
  """
  depth: int = 50
  final_endpoint: str = 'conv5_block3_out'
  include_top: bool = False
  num_classes: int = 1000
  lowering: Lowering = Lowering()
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *,
               train_from: str | None = None) -> dict[str, jax.Array]:
    names = endpoints(self.depth)
    blocks = ('stem',) + names
    keras_layers.check_call(f'ResNet{self.depth}', names, blocks, self.final_endpoint,
                            self.include_top, train_from, x, MIN_SIZE)
    block_train = functools.partial(keras_layers.trains, blocks, train, train_from)
    x = Stem(dtype=self.dtype, name='stem')(x, block_train('stem'))
    out = {}
    last = names.index(self.final_endpoint)
    for stage, count in enumerate(DEPTHS[self.depth]):
      for b in range(1, count + 1):
        name = f'conv{stage + 2}_block{b}_out'
        if names.index(name) > last:
          break
        first = b == 1
        x = Bottleneck(name[:-len('_out')], _FILTERS[stage],
                       strides=(1 if stage == 0 else 2) if first else 1, conv_shortcut=first,
                       dtype=self.dtype, name=name)(x, block_train(name))
        out[name] = x
    if self.include_top:
      x = jnp.mean(x, axis=(1, 2))
      x = keras_layers.dense(self.num_classes, dtype=self.dtype, name='predictions')(x)
      out['predictions'] = nn.softmax(x.astype(jnp.float32))
    return out
