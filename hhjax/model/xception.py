"""Xception in Flax linen, computing what `keras.applications.Xception` computes.

    Keras                                         here
    block1_conv1(_bn, _act), block1_conv2(...)    stem/block1_conv1, stem/block1_conv1_bn, ...
    block2 ... block4: strided 1x1 conv + BN      block2_add/residual_conv, .../residual_bn,
      beside relu -> sepconv -> BN -> relu ->     block2_add/block2_sepconv1, ..._bn, ...
      sepconv -> BN -> max pool, then add
    block5 ... block12: three relu -> sepconv ->  block5_add/block5_sepconv1, ... (identity
      BN, added to the block's input              shortcut)
    block13: as block2 ... block4                 block13_add/...
    block14: sepconv -> BN -> relu, twice         block14_sepconv2_act/block14_sepconv1, ...
    avg_pool, predictions                         the top: predictions/

The endpoints are the residual additions ('block2_add' ... 'block13_add': Keras's unnamed
`add`, `add_1`, ... `add_11` layers, in that order) and 'block14_sepconv2_act', the network's
last activation. Named layers keep Keras's names; the four shortcut convolutions and their
BatchNorms, which Keras leaves unnamed (`conv2d`, `batch_normalization`, ...), are
`residual_conv` and `residual_bn` of their block. Every convolution is without bias and every
BatchNorm Keras's default (epsilon 1e-3, with gamma and beta).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hhjax.model import keras_layers
from hhjax.model.lowering import Lowering

# (block number, output channels of the shortcut and last sepconv, first sepconv's channels).
_REDUCTIONS = {2: (128, 128), 3: (256, 256), 4: (728, 728), 13: (1024, 728)}
_MIDDLE = tuple(range(5, 13))
ENDPOINTS = tuple(f'block{i}_add' for i in range(2, 14)) + ('block14_sepconv2_act',)
BLOCKS = ('stem',) + ENDPOINTS
# Keras's minimum: the stem's two 'valid' 3x3 convolutions and four stride-2 reductions.
MIN_SIZE = 71


class _Units:
  """Keras's layers of one block, named `block<i>_...` as Keras names them."""

  def __init__(self, block: int, train: bool, dtype: Any):
    self.block, self.train, self.dtype = block, train, dtype

  def sepconv_bn(self, x: jax.Array, features: int, j: int) -> jax.Array:
    name = f'block{self.block}_sepconv{j}'
    x = keras_layers.SeparableConv(features, dtype=self.dtype, name=name)(x)
    return keras_layers.batch_norm(dtype=self.dtype, name=f'{name}_bn')(
        x, use_running_average=not self.train)

  def shortcut(self, x: jax.Array, features: int) -> jax.Array:
    x = keras_layers.conv(features, 1, strides=2, use_bias=False, dtype=self.dtype,
                          name='residual_conv')(x)
    return keras_layers.batch_norm(dtype=self.dtype, name='residual_bn')(
        x, use_running_average=not self.train)


class Stem(nn.Module):
  """block1: Conv2D(32, 3x3, stride 2, 'valid') -> BN -> ReLU -> Conv2D(64, 3x3, 'valid') ->
  BN -> ReLU."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for features, strides, name in ((32, 2, 'block1_conv1'), (64, 1, 'block1_conv2')):
      x = keras_layers.conv(features, 3, strides=strides, padding='VALID', use_bias=False,
                            dtype=self.dtype, name=name)(x)
      x = keras_layers.batch_norm(dtype=self.dtype, name=f'{name}_bn')(
          x, use_running_average=not train)
      x = nn.relu(x)
    return x


class ReductionBlock(nn.Module):
  """block2-block4 and block13: a strided 1x1 shortcut beside two sepconvs and a max pool."""
  block: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out_features, first_features = _REDUCTIONS[self.block]
    units = _Units(self.block, train, self.dtype)
    residual = units.shortcut(x, out_features)
    if self.block != 2:   # block2 reads block1's activation as it is.
      x = nn.relu(x)
    x = nn.relu(units.sepconv_bn(x, first_features, 1))
    x = units.sepconv_bn(x, out_features, 2)
    x = keras_layers.max_pool(x, 3, 2, padding='SAME')
    return x + residual


class MiddleBlock(nn.Module):
  """block5-block12: three relu -> sepconv(728) -> BN, added to the block's input."""
  block: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    units = _Units(self.block, train, self.dtype)
    y = x
    for j in (1, 2, 3):
      y = units.sepconv_bn(nn.relu(y), 728, j)
    return y + x


class ExitBlock(nn.Module):
  """block14: sepconv(1536) -> BN -> ReLU -> sepconv(2048) -> BN -> ReLU."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    units = _Units(14, train, self.dtype)
    x = nn.relu(units.sepconv_bn(x, 1536, 1))
    return nn.relu(units.sepconv_bn(x, 2048, 2))


def _make_block(name: str, dtype: Any) -> nn.Module:
  if name == 'block14_sepconv2_act':
    return ExitBlock(dtype=dtype, name=name)
  block = int(name[len('block'):-len('_add')])
  if block in _REDUCTIONS:
    return ReductionBlock(block, dtype=dtype, name=name)
  return MiddleBlock(block, dtype=dtype, name=name)


class Xception(nn.Module):
  """Keras's Xception, ending at `final_endpoint`.

  Attributes, call arguments and return value as `hhjax.model.inception.InceptionV3`'s;
  `lowering` is accepted for the common interface and applies nothing.
  """
  final_endpoint: str = 'block14_sepconv2_act'
  include_top: bool = False
  num_classes: int = 1000
  lowering: Lowering = Lowering()
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *,
               train_from: str | None = None) -> dict[str, jax.Array]:
    keras_layers.check_call('Xception', ENDPOINTS, BLOCKS, self.final_endpoint,
                            self.include_top, train_from, x, MIN_SIZE)
    block_train = functools.partial(keras_layers.trains, BLOCKS, train, train_from)
    x = Stem(dtype=self.dtype, name='stem')(x, block_train('stem'))
    out = {}
    for name in ENDPOINTS[:ENDPOINTS.index(self.final_endpoint) + 1]:
      x = _make_block(name, self.dtype)(x, block_train(name))
      out[name] = x
    if self.include_top:
      x = jnp.mean(x, axis=(1, 2))
      x = keras_layers.dense(self.num_classes, dtype=self.dtype, name='predictions')(x)
      out['predictions'] = nn.softmax(x.astype(jnp.float32))
    return out
