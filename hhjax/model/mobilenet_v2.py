"""MobileNetV2 in Flax linen, computing what `keras.applications.MobileNetV2(alpha=...)`
computes.

    Keras                                         here
    Conv1 (3x3, stride 2, 'same'), bn_Conv1,      stem/Conv1, stem/bn_Conv1
      Conv1_relu (ReLU(6.))
    expanded_conv_: depthwise -> BN -> ReLU6 ->   expanded_conv_project_BN/expanded_conv_...
      project 1x1 -> BN (no expansion)
    block_1_ ... block_16_: inverted residuals    one module per block, named after its output
      (expand 1x1 -> BN -> ReLU6 -> [pad] ->        (the endpoint): 'block_1_project_BN',
      depthwise 3x3 -> BN -> ReLU6 -> project       'block_2_add', ...; layers inside keep
      1x1 -> BN [-> add])                           Keras's names
    Conv_1 (1x1), Conv_1_bn, out_relu             out_relu/Conv_1, out_relu/Conv_1_bn
    global average pool, predictions              the top: predictions/

The endpoints are every block's output (Keras's `block_<i>_add` for the blocks with a
residual, `<block>_project_BN` for the others: `expanded_conv_project_BN`, `block_1_project_BN`,
`block_2_add`, ...) and 'out_relu'. The width multiplier `alpha` scales every block's channels
as Keras's `_make_divisible` rounds them (a multiple of 8, never 10 % below); the last 1x1
convolution keeps 1280 channels for alpha <= 1 and scales above. A stride-2 depthwise
convolution is Keras's ZeroPadding2D(`correct_pad`) then 'valid'.

Every convolution is without bias; every BatchNorm epsilon 1e-3, momentum 0.999, with gamma and
beta, as Keras's; the activations are ReLU(6.); Keras's initialisers (glorot uniform, zero
biases).
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hhjax.model import efficientnet
from hhjax.model import keras_layers
from hhjax.model.lowering import Lowering

# Keras's minimum input (obtain_input_shape's min_size).
MIN_SIZE = 32
# The alphas of Keras's official ImageNet files.
ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.999
# (filters before alpha, stride, expansion) of Keras's 17 `_inverted_res_block` calls.
_BLOCKS = ((16, 1, 1), (24, 2, 6), (24, 1, 6), (32, 2, 6), (32, 1, 6), (32, 1, 6),
           (64, 2, 6), (64, 1, 6), (64, 1, 6), (64, 1, 6), (96, 1, 6), (96, 1, 6), (96, 1, 6),
           (160, 2, 6), (160, 1, 6), (160, 1, 6), (320, 1, 6))


def make_divisible(v: float, divisor: int = 8) -> int:
  """Keras's `_make_divisible`: v to a multiple of `divisor` (at least it), never 10 % below."""
  new = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new < 0.9 * v:
    new += divisor
  return new


@dataclasses.dataclass(frozen=True)
class Block:
  """One inverted residual block as Keras's `_inverted_res_block` is called for it."""
  block_id: int
  filters_in: int
  filters_out: int
  strides: int
  expansion: int

  @property
  def prefix(self) -> str:
    return f'block_{self.block_id}_' if self.block_id else 'expanded_conv_'

  @property
  def residual(self) -> bool:
    return self.strides == 1 and self.filters_in == self.filters_out

  @property
  def endpoint(self) -> str:
    return f'{self.prefix}add' if self.residual else f'{self.prefix}project_BN'


def first_filters(alpha: float) -> int:
  return make_divisible(32 * alpha, 8)


def last_filters(alpha: float) -> int:
  """Conv_1's channels: 1280, scaled only above alpha 1 (as in the paper and Keras)."""
  return make_divisible(1280 * alpha, 8) if alpha > 1.0 else 1280


@functools.lru_cache(maxsize=None)
def blocks(alpha: float) -> tuple[Block, ...]:
  """The blocks, in order, as Keras's MobileNetV2 builds them at `alpha`."""
  out, filters_in = [], first_filters(alpha)
  for i, (filters, strides, expansion) in enumerate(_BLOCKS):
    filters_out = make_divisible(int(filters * alpha), 8)
    out.append(Block(i, filters_in, filters_out, strides, expansion))
    filters_in = filters_out
  return tuple(out)


def endpoints(alpha: float = 1.0) -> tuple[str, ...]:
  """Every block's output, then 'out_relu'."""
  return tuple(b.endpoint for b in blocks(alpha)) + ('out_relu',)


def _bn(name: str, train: bool, dtype: Any):
  return lambda x: keras_layers.batch_norm(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                           dtype=dtype, name=name)(
                                               x, use_running_average=not train)


def relu6(x: jax.Array) -> jax.Array:
  """Keras's ReLU(6.): min(max(x, 0), 6)."""
  return jnp.minimum(jnp.maximum(x, 0), jnp.asarray(6.0, x.dtype))


class Stem(nn.Module):
  """Conv1 (3x3, stride 2, 'same', no bias) -> bn_Conv1 -> ReLU6."""
  filters: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = keras_layers.conv(self.filters, 3, strides=2, padding='SAME', use_bias=False,
                          dtype=self.dtype, name='Conv1')(x)
    return relu6(_bn('bn_Conv1', train, self.dtype)(x))


class InvertedResidual(nn.Module):
  """Keras's `_inverted_res_block`."""
  block: Block
  dtype: Any = None

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:
    b, p = self.block, self.block.prefix
    x = inputs
    if b.block_id:
      x = keras_layers.conv(b.expansion * b.filters_in, 1, use_bias=False, dtype=self.dtype,
                            name=f'{p}expand')(x)
      x = relu6(_bn(f'{p}expand_BN', train, self.dtype)(x))
    if b.strides == 2:
      x = jnp.pad(x, ((0, 0),) + efficientnet.correct_pad(x.shape[1:3], 3) + ((0, 0),))
    x = keras_layers.DepthwiseConv(3, strides=b.strides,
                                   padding='VALID' if b.strides == 2 else 'SAME',
                                   dtype=self.dtype, name=f'{p}depthwise')(x)
    x = relu6(_bn(f'{p}depthwise_BN', train, self.dtype)(x))
    x = keras_layers.conv(b.filters_out, 1, use_bias=False, dtype=self.dtype,
                          name=f'{p}project')(x)
    x = _bn(f'{p}project_BN', train, self.dtype)(x)
    return x + inputs if b.residual else x


class Top(nn.Module):
  """Conv_1 (1x1, no bias) -> Conv_1_bn -> ReLU6 (Keras's out_relu)."""
  filters: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = keras_layers.conv(self.filters, 1, use_bias=False, dtype=self.dtype, name='Conv_1')(x)
    return relu6(_bn('Conv_1_bn', train, self.dtype)(x))


class MobileNetV2(nn.Module):
  """Keras's MobileNetV2(alpha=alpha), ending at `final_endpoint`.

  Attributes, call arguments and return value as `hhjax.model.inception.InceptionV3`'s, and:
    alpha: Keras's width multiplier.
  `lowering` is accepted for the common interface and applies nothing.
  """
  alpha: float = 1.0
  final_endpoint: str = 'out_relu'
  include_top: bool = False
  num_classes: int = 1000
  lowering: Lowering = Lowering()
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *,
               train_from: str | None = None) -> dict[str, jax.Array]:
    names = endpoints(self.alpha)
    all_blocks = ('stem',) + names
    keras_layers.check_call('MobileNetV2', names, all_blocks, self.final_endpoint,
                            self.include_top, train_from, x, MIN_SIZE)
    block_train = functools.partial(keras_layers.trains, all_blocks, train, train_from)
    x = Stem(first_filters(self.alpha), dtype=self.dtype, name='stem')(x, block_train('stem'))
    out = {}
    last = names.index(self.final_endpoint)
    for i, block in enumerate(blocks(self.alpha)):
      if i > last:
        break
      x = InvertedResidual(block, dtype=self.dtype, name=block.endpoint)(
          x, block_train(block.endpoint))
      out[block.endpoint] = x
    if last == len(names) - 1:
      x = Top(last_filters(self.alpha), dtype=self.dtype, name='out_relu')(
          x, block_train('out_relu'))
      out['out_relu'] = x
    if self.include_top:
      x = jnp.mean(x, axis=(1, 2))
      x = keras_layers.dense(self.num_classes, dtype=self.dtype, name='predictions')(x)
      out['predictions'] = nn.softmax(x.astype(jnp.float32))
    return out
