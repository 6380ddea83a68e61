"""The classifier: a Keras backbone cut at an endpoint, plus the seed's dense head.

    backbone  config.model.backbone (`hhjax.model.backbones`; InceptionV3 by default) up to
              config.model.cut ('mixed7' in the seed)
    head      Flatten (or global average pooling) -> Dense(hidden, relu) -> Dropout
              -> Dense(1) with a sigmoid for two classes, Dense(num_classes) with a softmax
              otherwise

The module returns logits; the sigmoid / softmax live in the loss and in `probabilities`.
Parameters are `{'backbone': ..., 'head': ...}`, so freezing rules read
`^backbone/<block>/...` (e.g. `^backbone/mixed6/...`) and `^head/...`.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hhjax import errors
from hhjax.model import backbones
from hhjax.model import lowering as lowering_lib
from hhjax.model import preprocessing as preprocessing_lib

HEADS = ('flatten', 'gap')

# Keras Dense: glorot_uniform kernel, zero bias (Flax defaults to lecun_normal).
_DENSE_KERNEL_INIT = nn.initializers.glorot_uniform()
_DENSE_BIAS_INIT = nn.initializers.zeros


def num_outputs(num_classes: int) -> int:
  """One sigmoid unit for two classes (as the seed), one softmax unit per class otherwise."""
  if num_classes < 2:
    raise errors.DataError(f'A classifier needs at least 2 classes, got {num_classes}.')
  return 1 if num_classes == 2 else num_classes


class Head(nn.Module):
  """Flatten / GAP -> Dense(hidden, relu) -> Dropout -> Dense(outputs); returns logits.

  Attributes:
    outputs: 1 (binary, sigmoid) or the number of classes (softmax).
    kind: 'flatten' (the seed) or 'gap' (global average pooling, far fewer parameters).
    hidden: width of the hidden Dense layer; 0 leaves it out.
    dropout: dropout rate after the hidden layer.
    dtype: computation dtype (bfloat16 for mixed precision); parameters stay float32 and the
      logits come out float32 for the loss.
  """
  outputs: int
  kind: str = 'flatten'
  hidden: int = 1024
  dropout: float = 0.2
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.kind == 'flatten':
      x = x.reshape((x.shape[0], -1))   # NHWC row-major, as Keras's Flatten.
    elif self.kind == 'gap':
      x = jnp.mean(x, axis=(1, 2))
    else:
      raise errors.ConfigError(f'config.model.head must be one of {HEADS}, got {self.kind!r}.')
    if self.hidden:
      x = nn.Dense(self.hidden, kernel_init=_DENSE_KERNEL_INIT, bias_init=_DENSE_BIAS_INIT,
                   dtype=self.dtype, name='hidden')(x)
      x = nn.relu(x)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.outputs, kernel_init=_DENSE_KERNEL_INIT, bias_init=_DENSE_BIAS_INIT,
                 dtype=self.dtype, name='output')(x)
    return x.astype(jnp.float32)


class Classifier(nn.Module):
  """A backbone cut at `cut` and a dense head.

  Attributes:
    cut: the last backbone block kept, one of its endpoints ('mixed0' ... 'mixed10' for
      InceptionV3).
    num_classes: number of classes (2 gives one sigmoid output).
    head: 'flatten' or 'gap'.
    hidden: hidden Dense width (0: none).
    dropout: dropout rate of the head.
    lowering: faster lowerings of the backbone's arithmetic (`hhjax.model.lowering.Lowering`,
      from config.speed); the variables are the same whichever is on.
    dtype: computation dtype (config.speed.compute_dtype); parameters stay float32.
    preprocessing: how uint8 images are normalised on the device
      (`hhjax.model.preprocessing`), bit-identical to the input pipeline's float32
      normalisation; float images are taken as already normalised.
    backbone: the backbone family member (`hhjax.model.backbones.NAMES`).
    drop_connect_rate: the backbone's drop-connect (stochastic depth) rate, for the families
      that have it (EfficientNet; None: Keras's default, 0.2), on in training steps as in
      Keras's `fit`, in every block up to the cut, frozen or not.
  """
  cut: str = 'mixed7'
  num_classes: int = 2
  head: str = 'flatten'
  hidden: int = 1024
  dropout: float = 0.2
  lowering: lowering_lib.Lowering = lowering_lib.Lowering()
  dtype: Any = None
  preprocessing: str = 'inception'
  backbone: str = backbones.DEFAULT
  drop_connect_rate: float | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, *,
               bn_train_from: str | None = None, from_features: bool = False) -> jax.Array:
    """Logits for images `x` (NHWC).

    Args:
      x: images as the input pipeline produces them: float32 and normalised, or uint8
        pixels that are normalised here, on the device.
      train: dropout on.
      bn_train_from: None keeps every BatchNorm in inference mode (Keras's frozen layers, and
        Keras's fine-tuning default here); a block name ('stem' or an endpoint) runs the
        BatchNorms from that block on with batch statistics and updates their moving
        averages (apply with `mutable=['batch_stats']`).
      from_features: `x` is already the backbone's output at `cut` (cached features,
        `hhjax.training.feature_cache`): only the head runs, with its usual parameters and
        dropout keys.
    """
    if from_features:
      features = x
    else:
      x = preprocessing_lib.normalize_images(x, self.preprocessing)
      stochastic = backbones.get(self.backbone).drop_connect_rate is not None
      features = backbone_module(self, name='backbone')(
          x, train=bn_train_from is not None, train_from=bn_train_from,
          **({'dropout': train} if stochastic else {}))[self.cut]
    return Head(num_outputs(self.num_classes), self.head, self.hidden, self.dropout,
                dtype=self.dtype, name='head')(features, train)


def backbone_module(model: Classifier, name: str | None = None) -> nn.Module:
  """The classifier's backbone up to its cut: inside the classifier as its submodule `name`,
  else on its own (the variables under 'backbone' fit it)."""
  options = {} if name else {'parent': None}
  declared = backbones.get(model.backbone)
  if declared.drop_connect_rate is not None:
    options['drop_connect_rate'] = drop_connect_rate(model)
  return declared.build(model.cut, lowering=model.lowering, dtype=model.dtype, name=name,
                        **options)


def drop_connect_rate(model: Classifier) -> float:
  """The backbone's drop-connect rate in training steps (0: the family has none)."""
  declared = backbones.get(model.backbone)
  if declared.drop_connect_rate is None:
    return 0.0
  return float(declared.drop_connect_rate if model.drop_connect_rate is None
               else model.drop_connect_rate)


def check_cut(cut: str, backbone: str | None = None) -> None:
  backbones.get(backbone).check_endpoint(cut)


def backbone_blocks(cut: str, backbone: str | None = None) -> tuple[str, ...]:
  """The backbone's endpoints (its blocks after the stem), the first ... cut (backbone None:
  InceptionV3)."""
  return backbones.get(backbone).endpoints_to(cut)


def backbone_layers(cut: str, backbone: str | None = None) -> tuple[str, ...]:
  """The backbone's top-level blocks up to `cut`, its 'stem' first when it has one: the layers
  of a layer-wise learning-rate decay."""
  return backbones.get(backbone).blocks_to(cut)


def create_model(model: Mapping[str, Any], num_classes: int, *, preprocessing: str,
                 speed: Mapping[str, Any] | None = None) -> Classifier:
  """The classifier that `model` (config.model: backbone, cut, head, hidden, dropout,
  drop_connect_rate) describes.

  Args:
    model: config.model, or any mapping with its fields.
    num_classes: the number of classes (2: one sigmoid output).
    preprocessing: how the images were normalised (config.data.preprocessing), for uint8
      batches normalised on the device.
    speed: config.speed (optional): the backbone's lowerings ('auto': on for the CPU backend)
      and the compute dtype.
  """
  backbone = model.get('backbone') or backbones.DEFAULT
  check_cut(model['cut'], backbone)
  if model['head'] not in HEADS:
    raise errors.ConfigError(f'config.model.head must be one of {HEADS}, got {model["head"]!r}.')
  num_outputs(num_classes)
  speed = speed or {}
  return Classifier(cut=model['cut'], num_classes=num_classes, head=model['head'],
                    hidden=int(model['hidden']), dropout=float(model['dropout']),
                    lowering=lowering_lib.Lowering.from_config(speed),
                    dtype=lowering_lib.compute_dtype(speed.get('compute_dtype')),
                    preprocessing=preprocessing, backbone=backbone,
                    drop_connect_rate=model.get('drop_connect_rate'))


def probabilities(logits: jax.Array) -> jax.Array:
  """Class probabilities [batch, num_classes] from the head's logits."""
  if logits.shape[-1] == 1:
    p = jax.nn.sigmoid(logits[..., 0])
    return jnp.stack([1.0 - p, p], axis=-1)
  return jax.nn.softmax(logits, axis=-1)
