"""Keras's layers, as the Keras-built backbones (VGG, ResNet, Xception, EfficientNet,
MobileNetV2) use them, in Flax.

Each module here is one Keras layer with weights and keeps that layer's name, so that a Keras
weight file's layer `conv2_block1_1_conv` lands at the module `.../conv2_block1_1_conv`, and
stores its arrays in Keras's shapes:

    Conv             Conv2D             kernel [h, w, in, out] (+ bias)
    BatchNorm        BatchNormalization scale (gamma), bias (beta), mean, var
    SeparableConv    SeparableConv2D    depthwise_kernel [h, w, in, 1], pointwise_kernel
                                        [1, 1, in, out] (+ bias)
    DepthwiseConv    DepthwiseConv2D    depthwise_kernel [h, w, in, 1] (Keras's layout: the
                                        grouped convolution's [h, w, 1, in] is made on the fly)
    Normalization    Normalization      mean [c], variance [c], count [] (in 'batch_stats':
                                        Keras's non-trainable weights, never updated here)
    Dense            Dense              kernel [in, out], bias

Keras's initialisers (glorot_uniform kernels, zero biases) and BatchNormalization defaults
(momentum 0.99, MobileNetV2's 0.999; the epsilon is the caller's: 1e-3 by default, 1.001e-5 in
ResNet) are kept.
"""

from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

KERNEL_INIT = nn.initializers.glorot_uniform()
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


def conv(features: int, kernel_size: int, *, name: str, strides: int = 1, padding: str = 'SAME',
         use_bias: bool = True, dtype: Any = None, kernel_init: Any = KERNEL_INIT) -> nn.Conv:
  """Keras's Conv2D(features, kernel_size, strides, padding) without its activation."""
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=padding, use_bias=use_bias, kernel_init=kernel_init,
                 bias_init=nn.initializers.zeros, dtype=dtype, name=name)


def batch_norm(*, name: str, epsilon: float = BN_EPSILON, momentum: float = BN_MOMENTUM,
               dtype: Any = None) -> nn.BatchNorm:
  """Keras's BatchNormalization (with gamma and beta), running as `train` says when called;
  the moving statistics move as Keras's: new = momentum * old + (1 - momentum) * batch."""
  # use_fast_variance=False: E[(x - mean)^2] as Keras computes it.
  return nn.BatchNorm(momentum=momentum, epsilon=epsilon, use_fast_variance=False,
                      dtype=dtype, name=name)


class SeparableConv(nn.Module):
  """Keras's SeparableConv2D (depth_multiplier 1): a depthwise then a 1x1 pointwise conv."""
  features: int
  kernel_size: int = 3
  padding: str = 'SAME'
  use_bias: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    k = self.kernel_size
    depthwise = self.param('depthwise_kernel', KERNEL_INIT, (k, k, channels, 1))
    pointwise = self.param('pointwise_kernel', KERNEL_INIT, (1, 1, channels, self.features))
    x, depthwise, pointwise = nn.dtypes.promote_dtype(x, depthwise, pointwise, dtype=self.dtype)
    numbers = ('NHWC', 'HWIO', 'NHWC')
    # Keras's [h, w, in, 1] is a grouped convolution's [h, w, 1, in]: one filter per channel.
    y = lax.conv_general_dilated(x, depthwise.reshape(k, k, 1, channels), (1, 1), self.padding,
                                 dimension_numbers=numbers, feature_group_count=channels)
    y = lax.conv_general_dilated(y, pointwise, (1, 1), 'VALID', dimension_numbers=numbers)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,)).astype(y.dtype)
    return y


class DepthwiseConv(nn.Module):
  """Keras's DepthwiseConv2D (depth_multiplier 1): one k x k filter per channel.

  The kernel is stored as Keras stores it, [k, k, in, 1], so that Keras's arrays load and
  export as they are; the grouped convolution reads it as [k, k, 1, in]."""
  kernel_size: int = 3
  strides: int = 1
  padding: Any = 'SAME'
  use_bias: bool = False
  kernel_init: Any = KERNEL_INIT
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    k = self.kernel_size
    kernel = self.param('depthwise_kernel', self.kernel_init, (k, k, channels, 1))
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = lax.conv_general_dilated(x, kernel.reshape(k, k, 1, channels),
                                 (self.strides, self.strides), self.padding,
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                 feature_group_count=channels)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (channels,)).astype(y.dtype)
    return y


class Normalization(nn.Module):
  """Keras's Normalization(axis=-1) as an adapted layer computes it:
  (x - mean) / max(sqrt(variance), 1e-7).

  Its arrays are Keras's non-trainable weights: they sit in 'batch_stats' (no optimizer sees
  them) and nothing here updates them; `count` is kept only for Keras's files."""
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32).value
    variance = self.variable('batch_stats', 'variance', jnp.ones, (channels,),
                             jnp.float32).value
    self.variable('batch_stats', 'count', jnp.zeros, (), jnp.float32)
    x, mean, variance = nn.dtypes.promote_dtype(x, mean, variance, dtype=self.dtype)
    return (x - mean) / jnp.maximum(jnp.sqrt(variance), jnp.asarray(1e-7, x.dtype))


def dense(features: int, *, name: str, dtype: Any = None,
          kernel_init: Any = KERNEL_INIT) -> nn.Dense:
  """Keras's Dense(features) without its activation."""
  return nn.Dense(features, kernel_init=kernel_init, bias_init=nn.initializers.zeros,
                  dtype=dtype, name=name)


def max_pool(x: jax.Array, size: int, strides: int, padding: str = 'VALID') -> jax.Array:
  """Keras's MaxPooling2D(size, strides, padding)."""
  return nn.max_pool(x, (size, size), strides=(strides, strides), padding=padding)


def zero_pad(x: jax.Array, pad: int) -> jax.Array:
  """Keras's ZeroPadding2D(pad) on NHWC images."""
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def check_call(family: str, endpoints: tuple[str, ...], blocks: tuple[str, ...],
               final_endpoint: str, include_top: bool, train_from: str | None,
               x: jax.Array, min_size: int) -> None:
  """The argument checks every backbone makes before it builds anything."""
  if final_endpoint not in endpoints:
    raise ValueError(f'final_endpoint must be one of {endpoints}, got {final_endpoint!r}.')
  if include_top and final_endpoint != endpoints[-1]:
    raise ValueError(f'include_top=True needs the whole network (final_endpoint='
                     f'{endpoints[-1]!r}), got final_endpoint={final_endpoint!r}.')
  if train_from is not None and train_from not in blocks:
    raise ValueError(f'train_from must be None or one of {blocks}, got {train_from!r}.')
  if x.ndim != 4 or min(x.shape[1:3]) < min_size:
    raise ValueError(f'{family} expects NHWC images of at least {min_size}x{min_size}, got an '
                     f'array of shape {x.shape}.')


def trains(blocks: tuple[str, ...], train: bool, train_from: str | None, block: str) -> bool:
  """Whether `block` runs BatchNorm on batch statistics: train, and at or after train_from."""
  if not train:
    return False
  return train_from is None or blocks.index(block) >= blocks.index(train_from)
