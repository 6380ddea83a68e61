"""EfficientNetB0 ... B7 in Flax linen, computing what `keras.applications.EfficientNetB0` ...
`EfficientNetB7` compute.

    Keras                                         here
    rescaling (1/255), normalization              stem/normalization (mean, variance, count:
      (+ rescaling_1 with weights='imagenet')       in 'batch_stats', never trained)
    stem_conv_pad, stem_conv, stem_bn,            stem/stem_conv, stem/stem_bn
      stem_activation
    block1a_... block7?_: MBConv blocks           one module per block, named after its output
      (expand 1x1 -> BN -> swish -> depthwise ->    (the endpoint): 'block1a_project_bn',
      BN -> swish -> squeeze-and-excitation ->      'block2a_project_bn', 'block2b_add', ...
      project 1x1 -> BN [-> drop -> add])           layers inside keep Keras's names
    top_conv, top_bn, top_activation              top_activation/top_conv, .../top_bn
    avg_pool, top_dropout, predictions            the top: predictions/

The endpoints are every block's output (Keras's `<block>_add` for the blocks with a residual,
`<block>_project_bn` for the others) and 'top_activation'. B1 ... B7 are B0 with more and wider
blocks: Keras's `round_filters` (channels x width, to a multiple of 8, never 10 % below) and
`round_repeats` (blocks x depth, rounded up) of B0's seven stages.

The normalisation Keras puts inside the model is here too: the model takes pixels in [0, 255]
(config.data.preprocessing='raw', Keras's `efficientnet.preprocess_input` being the identity),
multiplies them by float32(1/255) as Keras's Rescaling does, then applies the Normalization
layer's mean and variance, which load from (and export to) Keras's files like any weight.
Keras's official ImageNet files store the ImageNet standard deviation as the variance, and
Keras, only when it builds with weights='imagenet', divides once more by sqrt(stddev) (an
extra Rescaling layer, tensorflow/tensorflow#49930); `imagenet_variance` folds that division
into the variance when hhjax loads an official file, so the network has one Normalization
layer whatever the weights, and an exported model (built with weights=None) computes the same.

Training as Keras trains: drop-connect (Keras's `<block>_drop`: Dropout with noise shape
(batch, 1, 1, 1) before each residual addition, the b-th of n blocks at rate
drop_connect_rate * b / n) and the top's dropout are on when the call's `dropout` is; each
BatchNorm runs on batch statistics only in the blocks `train` and `train_from` open. Every
convolution is without bias except the squeeze-and-excitation ones; every BatchNorm Keras's
default (epsilon 1e-3); Keras's initialisers (VarianceScaling 2.0, fan_out, truncated normal
for convolutions; 1/3, fan_out, uniform for the top's Dense).
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hhjax.model import keras_layers
from hhjax.model.lowering import Lowering

CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'truncated_normal')
DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform')
# Keras's minimum input (imagenet_utils.obtain_input_shape's default).
MIN_SIZE = 32
DROP_CONNECT_RATE = 0.2   # Keras's default for every variant
# Keras's IMAGENET_STDDEV_RGB: what the official files hold as the Normalization's variance.
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Variant:
  width: float
  depth: float
  default_size: int
  dropout: float     # the top's dropout before `predictions`


VARIANTS = {'b0': Variant(1.0, 1.0, 224, 0.2), 'b1': Variant(1.0, 1.1, 240, 0.2),
            'b2': Variant(1.1, 1.2, 260, 0.3), 'b3': Variant(1.2, 1.4, 300, 0.3),
            'b4': Variant(1.4, 1.8, 380, 0.4), 'b5': Variant(1.6, 2.2, 456, 0.4),
            'b6': Variant(1.8, 2.6, 528, 0.5), 'b7': Variant(2.0, 3.1, 600, 0.5)}


@dataclasses.dataclass(frozen=True)
class Stage:
  kernel_size: int
  repeats: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  strides: int


# B0's seven stages (every block with squeeze-and-excitation ratio 0.25 and id_skip).
STAGES = (Stage(3, 1, 32, 16, 1, 1), Stage(3, 2, 16, 24, 6, 2), Stage(5, 2, 24, 40, 6, 2),
          Stage(3, 3, 40, 80, 6, 2), Stage(5, 3, 80, 112, 6, 1), Stage(5, 4, 112, 192, 6, 2),
          Stage(3, 1, 192, 320, 6, 1))
SE_RATIO = 0.25


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Keras's `round_filters`: filters x width to a multiple of `divisor`, never 10 % below."""
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class Block:
  """One MBConv block as Keras's `block(...)` is called for it."""
  prefix: str          # 'block2b_'
  kernel_size: int
  filters_in: int
  filters_out: int
  expand_ratio: int
  strides: int
  drop_rate: float     # drop_connect_rate * b / n (b counted from 0)

  @property
  def residual(self) -> bool:
    return self.strides == 1 and self.filters_in == self.filters_out

  @property
  def endpoint(self) -> str:
    return f'{self.prefix}add' if self.residual else f'{self.prefix}project_bn'


@functools.lru_cache(maxsize=None)
def blocks(variant: str, drop_connect_rate: float = DROP_CONNECT_RATE) -> tuple[Block, ...]:
  """The variant's blocks, in order, as Keras's EfficientNet builds them."""
  v = VARIANTS[variant]
  total = float(sum(round_repeats(s.repeats, v.depth) for s in STAGES))
  out, b = [], 0
  for i, stage in enumerate(STAGES):
    filters_in = round_filters(stage.filters_in, v.width)
    filters_out = round_filters(stage.filters_out, v.width)
    for j in range(round_repeats(stage.repeats, v.depth)):
      out.append(Block(f'block{i + 1}{chr(j + 97)}_', stage.kernel_size,
                       filters_in if j == 0 else filters_out, filters_out, stage.expand_ratio,
                       stage.strides if j == 0 else 1, drop_connect_rate * b / total))
      b += 1
  return tuple(out)


def endpoints(variant: str) -> tuple[str, ...]:
  """Every block's output, then 'top_activation'."""
  return tuple(b.endpoint for b in blocks(variant)) + ('top_activation',)


def stage_ends(variant: str) -> tuple[str, ...]:
  """The last block of each of the seven stages, then 'top_activation'."""
  last = {}
  for b in blocks(variant):
    last[b.prefix[len('block')]] = b.endpoint
  return tuple(last.values()) + ('top_activation',)


def correct_pad(size: tuple[int, int], kernel_size: int) -> tuple[tuple[int, int], ...]:
  """Keras's `imagenet_utils.correct_pad`: the zero padding before a stride-2 'valid' conv,
  one less at the top / left of an even side."""
  half = kernel_size // 2
  return tuple((half - (1 - s % 2), half) for s in size)


def imagenet_variance(variables: dict[str, Any]) -> dict[str, Any]:
  """The official files' arrays as Keras computes with them under weights='imagenet': the
  Normalization's variance (the ImageNet stddev there) times the stddev, so that
  (x - mean) / sqrt(variance) is Keras's (x - mean) / sqrt(stddev) / sqrt(stddev)."""
  stats = variables['batch_stats']['stem']['normalization']
  fixed = dict(stats, variance=np.asarray(stats['variance'], np.float32) * np.asarray(
      IMAGENET_STDDEV_RGB, np.float32))
  stem = dict(variables['batch_stats']['stem'], normalization=fixed)
  return dict(variables, batch_stats=dict(variables['batch_stats'], stem=stem))


def _bn(name: str, train: bool, dtype: Any):
  return lambda x: keras_layers.batch_norm(dtype=dtype, name=name)(
      x, use_running_average=not train)


class Stem(nn.Module):
  """Rescaling(1/255) -> Normalization -> ZeroPadding(correct_pad) -> Conv2D(32 x width, 3,
  stride 2, 'valid') -> BN -> swish."""
  filters: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x * jnp.asarray(np.float32(1.0 / 255.0), x.dtype)
    x = keras_layers.Normalization(dtype=self.dtype, name='normalization')(x)
    x = jnp.pad(x, ((0, 0),) + correct_pad(x.shape[1:3], 3) + ((0, 0),))
    x = keras_layers.conv(self.filters, 3, strides=2, padding='VALID', use_bias=False,
                          dtype=self.dtype, kernel_init=CONV_INIT, name='stem_conv')(x)
    return nn.swish(_bn('stem_bn', train, self.dtype)(x))


class MBConv(nn.Module):
  """Keras's EfficientNet `block`: an inverted residual with squeeze-and-excitation."""
  block: Block
  dtype: Any = None

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False,
               dropout: bool = False) -> jax.Array:
    b, p = self.block, self.block.prefix
    conv = functools.partial(keras_layers.conv, dtype=self.dtype, kernel_init=CONV_INIT)
    filters = b.filters_in * b.expand_ratio
    x = inputs
    if b.expand_ratio != 1:
      x = conv(filters, 1, use_bias=False, name=f'{p}expand_conv')(x)
      x = nn.swish(_bn(f'{p}expand_bn', train, self.dtype)(x))
    if b.strides == 2:
      x = jnp.pad(x, ((0, 0),) + correct_pad(x.shape[1:3], b.kernel_size) + ((0, 0),))
    x = keras_layers.DepthwiseConv(b.kernel_size, strides=b.strides,
                                   padding='VALID' if b.strides == 2 else 'SAME',
                                   kernel_init=CONV_INIT, dtype=self.dtype,
                                   name=f'{p}dwconv')(x)
    x = nn.swish(_bn(f'{p}bn', train, self.dtype)(x))
    se = jnp.mean(x, axis=(1, 2), keepdims=True)
    se = nn.swish(conv(max(1, int(b.filters_in * SE_RATIO)), 1, name=f'{p}se_reduce')(se))
    se = nn.sigmoid(conv(filters, 1, name=f'{p}se_expand')(se))
    x = x * se
    x = conv(b.filters_out, 1, use_bias=False, name=f'{p}project_conv')(x)
    x = _bn(f'{p}project_bn', train, self.dtype)(x)
    if b.residual:
      if b.drop_rate > 0:
        x = nn.Dropout(b.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not dropout,
                       name=f'{p}drop')(x)
      x = x + inputs
    return x


class Top(nn.Module):
  """top_conv (1x1, 1280 x width) -> top_bn -> swish."""
  filters: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = keras_layers.conv(self.filters, 1, use_bias=False, dtype=self.dtype,
                          kernel_init=CONV_INIT, name='top_conv')(x)
    return nn.swish(_bn('top_bn', train, self.dtype)(x))


class EfficientNet(nn.Module):
  """Keras's EfficientNet<variant> ('b0' ... 'b7'), ending at `final_endpoint`.

  Attributes, call arguments and return value as `hhjax.model.inception.InceptionV3`'s, and:
    drop_connect_rate: Keras's drop_connect_rate (config.model.drop_connect_rate).
  The call's `dropout` turns drop-connect and the top's dropout on (the classifier's training
  steps; they need a 'dropout' rng). `lowering` is accepted for the common interface and
  applies nothing.
  """
  variant: str = 'b0'
  final_endpoint: str = 'top_activation'
  include_top: bool = False
  num_classes: int = 1000
  lowering: Lowering = Lowering()
  dtype: Any = None
  drop_connect_rate: float = DROP_CONNECT_RATE

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *, train_from: str | None = None,
               dropout: bool = False) -> dict[str, jax.Array]:
    names = endpoints(self.variant)
    all_blocks = ('stem',) + names
    keras_layers.check_call(f'EfficientNet{self.variant.upper()}', names, all_blocks,
                            self.final_endpoint, self.include_top, train_from, x, MIN_SIZE)
    block_train = functools.partial(keras_layers.trains, all_blocks, train, train_from)
    width = VARIANTS[self.variant].width
    x = Stem(round_filters(32, width), dtype=self.dtype, name='stem')(x, block_train('stem'))
    out = {}
    last = names.index(self.final_endpoint)
    for i, block in enumerate(blocks(self.variant, float(self.drop_connect_rate))):
      if i > last:
        break
      x = MBConv(block, dtype=self.dtype, name=block.endpoint)(
          x, block_train(block.endpoint), dropout)
      out[block.endpoint] = x
    if last == len(names) - 1:
      x = Top(round_filters(1280, width), dtype=self.dtype, name='top_activation')(
          x, block_train('top_activation'))
      out['top_activation'] = x
    if self.include_top:
      x = jnp.mean(x, axis=(1, 2))
      rate = VARIANTS[self.variant].dropout
      x = nn.Dropout(rate, deterministic=not dropout, name='top_dropout')(x)
      x = keras_layers.dense(self.num_classes, dtype=self.dtype, kernel_init=DENSE_INIT,
                             name='predictions')(x)
      out['predictions'] = nn.softmax(x.astype(jnp.float32))
    return out
