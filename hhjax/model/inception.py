"""InceptionV3 in Flax linen, computing exactly what `keras.applications.InceptionV3` computes.

The network reads like Keras's `inception_v3.py`: one conv-BN helper (`ConvBN`, Keras's
`conv2d_bn`) used everywhere, one small module per block kind, and the endpoints named as Keras
names them (`mixed0` ... `mixed10`, `predictions`).

    Keras                      here
    conv2d_bn stem layers      stem/conv_1a_3x3 ... stem/conv_4a_3x3
    mixed0, mixed1, mixed2     InceptionA (35x35 at 299 px)
    mixed3                     InceptionB (grid reduction)
    mixed4 ... mixed7          InceptionC (factorized 7x7)
    mixed8                     InceptionD (grid reduction)
    mixed9, mixed10            InceptionE (expanded filter banks)
    predictions                GAP -> Dense(num_classes, softmax)

Inside a block, conv-BN units are named after the variables of Keras's source, numbered along
each branch (`branch5x5_1` is the 1x1 that feeds `branch5x5_2`); parameter paths look like
`mixed6/branch7x7_1/conv/kernel` and `mixed6/branch7x7_1/bn/bias`, with BatchNorm statistics at
`batch_stats/mixed6/branch7x7_1/bn/{mean,var}`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from hhjax.model import fast_convs
from hhjax.model import fast_pools
from hhjax.model.lowering import Lowering

# Keras's endpoint names, in network order.
ENDPOINTS = tuple(f'mixed{i}' for i in range(11))
# Where `train_from` may start: the stem, then each mixed block.
BLOCKS = ('stem',) + ENDPOINTS
# Keras refuses smaller inputs: the last grid reduction needs at least 3x3 cells.
MIN_SIZE = 75

# Keras BatchNormalization defaults, which differ from Flax's (epsilon 1e-5).
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99

# Keras's default initializer for Conv2D and Dense kernels (Flax defaults to lecun_normal).
_KERNEL_INIT = nn.initializers.glorot_uniform()

_NO_REWRITES = Lowering()


class ConvBN(nn.Module):
  """Keras's `conv2d_bn`: Conv2D (no bias) -> BatchNormalization (no scale) -> ReLU.

  The single place where a convolution, its BatchNorm and the ReLU are applied, so that
  alternative lowerings of the same arithmetic can be switched on here for the whole network
  (`lowering`, see `hhjax.model.lowering`); the parameters are the same whichever is on.

  Attributes:
    features: output channels (Keras `filters`).
    kernel_size: (rows, cols), as Keras's `num_row, num_col`.
    strides: convolution strides.
    padding: 'SAME' or 'VALID', as Keras's 'same'/'valid'.
    lowering: faster lowerings of the same arithmetic (default: none).
    dtype: computation dtype (bfloat16 for mixed precision); parameters stay float32.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = 'SAME'
  lowering: Lowering = _NO_REWRITES
  dtype: Any = None

  def setup(self):
    self.conv = nn.Conv(
        self.features, self.kernel_size, strides=self.strides, padding=self.padding,
        use_bias=False, kernel_init=_KERNEL_INIT, dtype=self.dtype,
        conv_general_dilated=fast_convs.conv_general_dilated if self.lowering.fast_convs else None)
    # use_fast_variance=False: E[(x - mean)^2] as Keras does, not E[x^2] - mean^2, which loses
    # digits on activations with a large mean.
    self.bn = nn.BatchNorm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, use_scale=False,
                           use_fast_variance=False, dtype=self.dtype)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.folds(train):
      kernel, bias = self.folded()
      y = self.convolve(x, kernel)
      return nn.relu(y + bias.astype(y.dtype))
    return self.bn_relu(self.conv(x), train)

  # The pieces below let a block run several units' convolutions as one (`_merged_1x1`).

  def folds(self, train: bool) -> bool:
    """Whether this call folds the BatchNorm (inference mode, variables exist)."""
    return self.lowering.fold_bn and not train and not self.is_initializing()

  def bn_relu(self, y: jax.Array, train: bool) -> jax.Array:
    """BatchNorm (batch statistics when `train`) and ReLU of this unit's conv output."""
    return nn.relu(self.bn(y, use_running_average=not train))

  def kernel(self) -> jax.Array:
    return self.variables['params']['conv']['kernel']

  def folded(self) -> tuple[jax.Array, jax.Array]:
    """(kernel, bias) of the conv with the inference-mode BatchNorm folded in."""
    stats = self.variables['batch_stats']['bn']
    return fast_convs.fold_bn(self.kernel(), self.variables['params']['bn']['bias'],
                            stats['mean'], stats['var'], BN_EPSILON)

  def convolve(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """This unit's convolution with another kernel of the same height and width."""
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    conv = fast_convs.conv_general_dilated if self.lowering.fast_convs else lax.conv_general_dilated
    return conv(x, kernel, self.strides, self.padding,
                dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _merged_1x1(units: list[ConvBN], x: jax.Array, train: bool) -> list[jax.Array] | None:
  """The units' outputs from one convolution of `x`, or None when merging is off.

  The units are 1x1 ConvBNs that read the same `x`; their kernels are concatenated on the
  output axis, the result split back, and each piece goes through its own BatchNorm (or the
  folded biases), so every parameter and statistic stays where the plain path has it. At
  init the plain path runs (it creates the variables).
  """
  first = units[0]
  if not first.lowering.merge_1x1 or first.is_initializing():
    return None
  if first.folds(train):
    kernels, biases = zip(*(u.folded() for u in units))
    pieces = fast_convs.merged_conv(x, kernels, biases, conv=first.convolve)
    return [nn.relu(y) for y in pieces]
  pieces = fast_convs.merged_conv(x, [u.kernel() for u in units], conv=first.convolve)
  return [u.bn_relu(y, train) for u, y in zip(units, pieces)]


def avg_pool_same(x: jax.Array, fast: bool = False) -> jax.Array:
  """Keras's AveragePooling2D((3, 3), strides=(1, 1), padding='same').

  Padded cells are left out of the average (each border cell is the mean of the cells that
  exist), which Flax's `avg_pool` does only with `count_include_pad=False`. `fast`: the same
  pool computed from shifted slices (`fast_pools.avg_pool_3x3_same`).
  """
  if fast:
    return fast_pools.avg_pool_3x3_same(x)
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False)


def max_pool_reduce(x: jax.Array, fast: bool = False) -> jax.Array:
  """Keras's MaxPooling2D((3, 3), strides=(2, 2)) with its default 'valid' padding.

  `fast`: the same pool computed from strided slices (`fast_pools.max_pool_3x3_s2`).
  """
  if fast:
    return fast_pools.max_pool_3x3_s2(x)
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class Stem(nn.Module):
  """The layers before mixed0: five conv-BN units and two max pools."""
  lowering: Lowering = _NO_REWRITES
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvBN, lowering=self.lowering, dtype=self.dtype)
    x = unit(32, (3, 3), strides=(2, 2), padding='VALID', name='conv_1a_3x3')(x, train)
    x = unit(32, (3, 3), padding='VALID', name='conv_2a_3x3')(x, train)
    x = unit(64, (3, 3), name='conv_2b_3x3')(x, train)
    x = max_pool_reduce(x, self.lowering.fast_pools)
    x = unit(80, (1, 1), padding='VALID', name='conv_3b_1x1')(x, train)
    x = unit(192, (3, 3), padding='VALID', name='conv_4a_3x3')(x, train)
    return max_pool_reduce(x, self.lowering.fast_pools)


class InceptionA(nn.Module):
  """mixed0-mixed2: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avgpool -> 1x1."""
  pool_features: int
  lowering: Lowering = _NO_REWRITES
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvBN, lowering=self.lowering, dtype=self.dtype)
    reads_x = [unit(64, (1, 1), name='branch1x1'), unit(48, (1, 1), name='branch5x5_1'),
               unit(64, (1, 1), name='branch3x3dbl_1')]
    merged = _merged_1x1(reads_x, x, train)
    branch1x1 = merged[0] if merged else reads_x[0](x, train)

    branch5x5 = merged[1] if merged else reads_x[1](x, train)
    branch5x5 = unit(64, (5, 5), name='branch5x5_2')(branch5x5, train)

    branch3x3dbl = merged[2] if merged else reads_x[2](x, train)
    branch3x3dbl = unit(96, (3, 3), name='branch3x3dbl_2')(branch3x3dbl, train)
    branch3x3dbl = unit(96, (3, 3), name='branch3x3dbl_3')(branch3x3dbl, train)

    pooled = avg_pool_same(x, self.lowering.fast_pools)
    branch_pool = unit(self.pool_features, (1, 1), name='branch_pool')(pooled, train)
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """mixed3, a grid reduction: 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool/2."""
  lowering: Lowering = _NO_REWRITES
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvBN, lowering=self.lowering, dtype=self.dtype)
    branch3x3 = unit(384, (3, 3), strides=(2, 2), padding='VALID', name='branch3x3')(x, train)

    branch3x3dbl = unit(64, (1, 1), name='branch3x3dbl_1')(x, train)
    branch3x3dbl = unit(96, (3, 3), name='branch3x3dbl_2')(branch3x3dbl, train)
    branch3x3dbl = unit(96, (3, 3), strides=(2, 2), padding='VALID',
                          name='branch3x3dbl_3')(branch3x3dbl, train)

    branch_pool = max_pool_reduce(x, self.lowering.fast_pools)
    return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
  """mixed4-mixed7: 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avgpool -> 1x1."""
  channels_7x7: int
  lowering: Lowering = _NO_REWRITES
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvBN, lowering=self.lowering, dtype=self.dtype)
    c = self.channels_7x7
    reads_x = [unit(192, (1, 1), name='branch1x1'), unit(c, (1, 1), name='branch7x7_1'),
               unit(c, (1, 1), name='branch7x7dbl_1')]
    merged = _merged_1x1(reads_x, x, train)
    branch1x1 = merged[0] if merged else reads_x[0](x, train)

    branch7x7 = merged[1] if merged else reads_x[1](x, train)
    branch7x7 = unit(c, (1, 7), name='branch7x7_2')(branch7x7, train)
    branch7x7 = unit(192, (7, 1), name='branch7x7_3')(branch7x7, train)

    branch7x7dbl = merged[2] if merged else reads_x[2](x, train)
    branch7x7dbl = unit(c, (7, 1), name='branch7x7dbl_2')(branch7x7dbl, train)
    branch7x7dbl = unit(c, (1, 7), name='branch7x7dbl_3')(branch7x7dbl, train)
    branch7x7dbl = unit(c, (7, 1), name='branch7x7dbl_4')(branch7x7dbl, train)
    branch7x7dbl = unit(192, (1, 7), name='branch7x7dbl_5')(branch7x7dbl, train)

    pooled = avg_pool_same(x, self.lowering.fast_pools)
    branch_pool = unit(192, (1, 1), name='branch_pool')(pooled, train)
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """mixed8, a grid reduction: 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | maxpool/2."""
  lowering: Lowering = _NO_REWRITES
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvBN, lowering=self.lowering, dtype=self.dtype)
    reads_x = [unit(192, (1, 1), name='branch3x3_1'), unit(192, (1, 1), name='branch7x7x3_1')]
    merged = _merged_1x1(reads_x, x, train)
    branch3x3 = merged[0] if merged else reads_x[0](x, train)
    branch3x3 = unit(320, (3, 3), strides=(2, 2), padding='VALID',
                     name='branch3x3_2')(branch3x3, train)

    branch7x7x3 = merged[1] if merged else reads_x[1](x, train)
    branch7x7x3 = unit(192, (1, 7), name='branch7x7x3_2')(branch7x7x3, train)
    branch7x7x3 = unit(192, (7, 1), name='branch7x7x3_3')(branch7x7x3, train)
    branch7x7x3 = unit(192, (3, 3), strides=(2, 2), padding='VALID',
                         name='branch7x7x3_4')(branch7x7x3, train)

    branch_pool = max_pool_reduce(x, self.lowering.fast_pools)
    return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
  """mixed9, mixed10: 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | avgpool -> 1x1."""
  lowering: Lowering = _NO_REWRITES
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvBN, lowering=self.lowering, dtype=self.dtype)
    reads_x = [unit(320, (1, 1), name='branch1x1'), unit(384, (1, 1), name='branch3x3_1'),
               unit(448, (1, 1), name='branch3x3dbl_1')]
    merged = _merged_1x1(reads_x, x, train)
    branch1x1 = merged[0] if merged else reads_x[0](x, train)

    branch3x3 = merged[1] if merged else reads_x[1](x, train)
    branch3x3_a = unit(384, (1, 3), name='branch3x3_2a')(branch3x3, train)
    branch3x3_b = unit(384, (3, 1), name='branch3x3_2b')(branch3x3, train)

    branch3x3dbl = merged[2] if merged else reads_x[2](x, train)
    branch3x3dbl = unit(384, (3, 3), name='branch3x3dbl_2')(branch3x3dbl, train)
    branch3x3dbl_a = unit(384, (1, 3), name='branch3x3dbl_3a')(branch3x3dbl, train)
    branch3x3dbl_b = unit(384, (3, 1), name='branch3x3dbl_3b')(branch3x3dbl, train)

    pooled = avg_pool_same(x, self.lowering.fast_pools)
    branch_pool = unit(192, (1, 1), name='branch_pool')(pooled, train)
    # Keras concatenates the split pairs first (mixed9_0, ...); on channels that is the same as
    # one flat concatenation in this order.
    return jnp.concatenate([branch1x1, branch3x3_a, branch3x3_b, branch3x3dbl_a, branch3x3dbl_b,
                            branch_pool], axis=-1)


def _make_block(name: str, **kwargs) -> nn.Module:
  """The block module that computes Keras's endpoint `name` (kwargs: lowering, dtype)."""
  i = ENDPOINTS.index(name)
  if i <= 2:
    return InceptionA(pool_features=(32, 64, 64)[i], name=name, **kwargs)
  if i == 3:
    return InceptionB(name=name, **kwargs)
  if i <= 7:
    return InceptionC(channels_7x7=(128, 160, 160, 192)[i - 4], name=name, **kwargs)
  if i == 8:
    return InceptionD(name=name, **kwargs)
  return InceptionE(name=name, **kwargs)


class InceptionV3(nn.Module):
  """Keras's InceptionV3, ending at `final_endpoint`; layers past it are not created.

  Attributes:
    final_endpoint: the last block built, 'mixed0' ... 'mixed10'.
    include_top: add global average pooling and Dense(num_classes, softmax) named
      'predictions' (needs final_endpoint='mixed10').
    num_classes: outputs of the top.
    lowering: faster lowerings of the same arithmetic (`hhjax.Lowering`; default
      none); the variables are the same whichever is on.
    dtype: computation dtype, e.g. jnp.bfloat16 for mixed precision (None: float32);
      parameters and BatchNorm statistics stay float32.
  """
  final_endpoint: str = 'mixed10'
  include_top: bool = False
  num_classes: int = 1000
  lowering: Lowering = _NO_REWRITES
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *,
               train_from: str | None = None) -> dict[str, jax.Array]:
    """Runs the network.

    Args:
      x: images, NHWC float32 in [-1, 1] (`x / 127.5 - 1`, Keras's `preprocess_input`), at
        least 75x75.
      train: run BatchNorm on batch statistics and update `batch_stats` (apply with
        `mutable=['batch_stats']`); False uses the moving statistics (inference).
      train_from: with train=True, only the blocks from this one on ('stem', 'mixed0' ...)
        use batch statistics; earlier ones stay in inference mode, like Keras layers with
        `trainable=False`. None means every block.

    Returns:
      A dict from Keras's endpoint names, 'mixed0' ... final_endpoint (plus 'predictions',
      the softmax probabilities, with the top), to arrays.
    """
    if self.final_endpoint not in ENDPOINTS:
      raise ValueError(f'final_endpoint must be one of {ENDPOINTS}, got {self.final_endpoint!r}.')
    if self.include_top and self.final_endpoint != 'mixed10':
      raise ValueError('include_top=True needs the whole network (final_endpoint="mixed10"), '
                       f'got final_endpoint={self.final_endpoint!r}.')
    if train_from is not None and train_from not in BLOCKS:
      raise ValueError(f'train_from must be None or one of {BLOCKS}, got {train_from!r}.')
    if x.ndim != 4 or min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f'InceptionV3 expects NHWC images of at least {MIN_SIZE}x{MIN_SIZE}, '
                       f'got an array of shape {x.shape}.')

    first_trained = BLOCKS.index(train_from) if train_from is not None else 0

    def block_train(name: str) -> bool:
      return train and BLOCKS.index(name) >= first_trained

    options = dict(lowering=self.lowering, dtype=self.dtype)
    x = Stem(name='stem', **options)(x, block_train('stem'))
    endpoints = {}
    for name in ENDPOINTS[:ENDPOINTS.index(self.final_endpoint) + 1]:
      x = _make_block(name, **options)(x, block_train(name))
      endpoints[name] = x
    if self.include_top:
      x = jnp.mean(x, axis=(1, 2))
      x = nn.Dense(self.num_classes, kernel_init=_KERNEL_INIT, name='predictions')(x)
      endpoints['predictions'] = nn.softmax(x)
    return endpoints


def conv_bn_paths(final_endpoint: str = 'mixed10') -> list[str]:
  """The '/'-joined paths of the ConvBN units up to `final_endpoint`, in call order.

  Call order is Keras's source order: the order in which `inception_v3.py` creates its
  conv2d_bn layers, and so the order of the suffixes of `conv2d`, `conv2d_1`, ... in a
  fresh Keras session.
  """
  paths = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, ConvBN) and context.method_name == '__call__':
      paths.append('/'.join(context.module.path))
    return next_fun(*args, **kwargs)

  model = InceptionV3(final_endpoint=final_endpoint)
  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3)))
  return paths


# ------------------------------------------------------------------------------------------
# Keras's file order.
#
# The layers with weights inside each kind of block, in the order Keras's `model.layers` (and
# so every Keras HDF5 file) lists them: sorted by depth in the graph. `conv` is the Conv2D of a
# conv2d_bn unit, `bn` its BatchNormalization. tests/test_parity_keras.py checks this table
# against tf_keras's and Keras 3's models. Keras's InceptionV3 files pair layers by position
# (`hhjax.weights.keras_h5`), in this order.

_STEM_ORDER = (
    'conv_1a_3x3/conv', 'conv_1a_3x3/bn', 'conv_2a_3x3/conv', 'conv_2a_3x3/bn',
    'conv_2b_3x3/conv', 'conv_2b_3x3/bn', 'conv_3b_1x1/conv', 'conv_3b_1x1/bn',
    'conv_4a_3x3/conv', 'conv_4a_3x3/bn')
_A_ORDER = (  # mixed0-mixed2
    'branch3x3dbl_1/conv', 'branch3x3dbl_1/bn', 'branch5x5_1/conv', 'branch3x3dbl_2/conv',
    'branch5x5_1/bn', 'branch3x3dbl_2/bn', 'branch1x1/conv', 'branch5x5_2/conv',
    'branch3x3dbl_3/conv', 'branch_pool/conv', 'branch1x1/bn', 'branch5x5_2/bn',
    'branch3x3dbl_3/bn', 'branch_pool/bn')
_B_ORDER = (  # mixed3
    'branch3x3dbl_1/conv', 'branch3x3dbl_1/bn', 'branch3x3dbl_2/conv', 'branch3x3dbl_2/bn',
    'branch3x3/conv', 'branch3x3dbl_3/conv', 'branch3x3/bn', 'branch3x3dbl_3/bn')
_C_ORDER = (  # mixed4-mixed7
    'branch7x7dbl_1/conv', 'branch7x7dbl_1/bn', 'branch7x7dbl_2/conv', 'branch7x7dbl_2/bn',
    'branch7x7_1/conv', 'branch7x7dbl_3/conv', 'branch7x7_1/bn', 'branch7x7dbl_3/bn',
    'branch7x7_2/conv', 'branch7x7dbl_4/conv', 'branch7x7_2/bn', 'branch7x7dbl_4/bn',
    'branch1x1/conv', 'branch7x7_3/conv', 'branch7x7dbl_5/conv', 'branch_pool/conv',
    'branch1x1/bn', 'branch7x7_3/bn', 'branch7x7dbl_5/bn', 'branch_pool/bn')
_D_ORDER = (  # mixed8
    'branch7x7x3_1/conv', 'branch7x7x3_1/bn', 'branch7x7x3_2/conv', 'branch7x7x3_2/bn',
    'branch3x3_1/conv', 'branch7x7x3_3/conv', 'branch3x3_1/bn', 'branch7x7x3_3/bn',
    'branch3x3_2/conv', 'branch7x7x3_4/conv', 'branch3x3_2/bn', 'branch7x7x3_4/bn')
_E_ORDER = (  # mixed9, mixed10
    'branch3x3dbl_1/conv', 'branch3x3dbl_1/bn', 'branch3x3_1/conv', 'branch3x3dbl_2/conv',
    'branch3x3_1/bn', 'branch3x3dbl_2/bn', 'branch3x3_2a/conv', 'branch3x3_2b/conv',
    'branch3x3dbl_3a/conv', 'branch3x3dbl_3b/conv', 'branch1x1/conv', 'branch3x3_2a/bn',
    'branch3x3_2b/bn', 'branch3x3dbl_3a/bn', 'branch3x3dbl_3b/bn', 'branch_pool/conv',
    'branch1x1/bn', 'branch_pool/bn')
_BLOCK_ORDER = {'stem': _STEM_ORDER, 'mixed0': _A_ORDER, 'mixed1': _A_ORDER, 'mixed2': _A_ORDER,
                'mixed3': _B_ORDER, 'mixed4': _C_ORDER, 'mixed5': _C_ORDER, 'mixed6': _C_ORDER,
                'mixed7': _C_ORDER, 'mixed8': _D_ORDER, 'mixed9': _E_ORDER, 'mixed10': _E_ORDER}


def keras_layer_order(final_endpoint: str = 'mixed10', include_top: bool = False) -> list[str]:
  """Module paths of our layers with weights, in Keras's file order.

  E.g. ['stem/conv_1a_3x3/conv', 'stem/conv_1a_3x3/bn', ..., 'mixed10/branch_pool/bn',
  'predictions']: entry k receives the k-th layer with weights of a Keras file. A network cut
  at an endpoint (a Keras model built up to `mixed7`, say) has a prefix of the full order.
  """
  if final_endpoint not in ENDPOINTS:
    raise ValueError(f'final_endpoint must be one of {ENDPOINTS}, got {final_endpoint!r}.')
  blocks = ('stem',) + ENDPOINTS[:ENDPOINTS.index(final_endpoint) + 1]
  order = [f'{block}/{layer}' for block in blocks for layer in _BLOCK_ORDER[block]]
  if include_top:
    order.append('predictions')
  return order
