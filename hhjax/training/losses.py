"""The training loss: cross-entropy with Keras's label smoothing and `fit(class_weight=...)`.

    spec = LossSpec(label_smoothing=0.1, class_weights=(1.0, 2.5))
    per_example_loss(logits, labels, spec.label_smoothing)   # [b]
    batch_loss(logits, labels, spec)                          # the scalar the step minimises

The head has one sigmoid logit for two classes, else one softmax logit per class:

  * `label_smoothing` is Keras's for each head: `BinaryCrossentropy(label_smoothing=s)` pulls
    the 0/1 target to `y (1 - s) + s / 2`, `CategoricalCrossentropy(label_smoothing=s)` the
    one-hot target to `y (1 - s) + s / k` (k classes).
  * class weights are Keras's `fit(class_weight=...)`: every example's loss is multiplied by its
    class's weight, and the batch loss is the SUM of the weighted losses over the batch size
    (Keras's default reduction 'sum_over_batch_size'), not over the sum of the weights. A batch
    of weight-2 examples thus has twice the loss (and gradient) of the unweighted batch.
  * The evaluation loss (val_loss) is the compiled loss without class weights, smoothing
    included, as Keras's `fit` reports `val_loss` (its validation pass gets no class weights).
  * Targets may also be probabilities [b, k] (mixup and CutMix, hhjax.training.mix): the
    cross-entropy takes them as Keras's losses take soft y_true, smoothing included, and a
    class-weighted example weighs sum_c target_c * weight_c (for a one-hot target, weight[label];
    our rule: Keras's fit weighs a soft target by its argmax class alone).

`balanced_weights` gives config.loss.class_weight='balanced': n / (k * count) per class, from the
training split's class counts (scikit-learn's `compute_class_weight('balanced')`).
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hhjax import errors

BALANCED = 'balanced'


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """config.loss, resolved: the smoothing and one weight per class index (None: unweighted)."""
  label_smoothing: float = 0.0
  class_weights: tuple[float, ...] | None = None


def per_example_loss(logits: jax.Array, labels: jax.Array,
                     label_smoothing: float = 0.0) -> jax.Array:
  """Binary cross-entropy on one sigmoid logit, or softmax cross-entropy over the classes.

  `labels` are class indices [b], or target probabilities [b, k] over the k classes (the soft
  targets of mixup and CutMix, hhjax.training.mix; k = 2 for the sigmoid head, whose target is
  then the second class's probability). With `label_smoothing` > 0 the targets are smoothed
  as Keras smooths them (see the module docstring), soft ones too, as Keras smooths any y_true.
  For class indices without smoothing this is the unsmoothed loss as it always was, the same
  operations.
  """
  s = float(label_smoothing)
  soft = labels.ndim == 2
  if logits.shape[-1] == 1:
    logit = logits[:, 0]
    targets = (labels[:, 1] if soft else labels).astype(logits.dtype)
    if s:
      targets = targets * (1.0 - s) + 0.5 * s
    return optax.sigmoid_binary_cross_entropy(logit, targets)
  if not s and not soft:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  num_classes = logits.shape[-1]
  targets = (labels.astype(logits.dtype) if soft
             else jax.nn.one_hot(labels, num_classes, dtype=logits.dtype))
  if s:
    targets = targets * (1.0 - s) + s / num_classes
  return optax.softmax_cross_entropy(logits, targets)


def batch_loss(logits: jax.Array, labels: jax.Array, spec: LossSpec = LossSpec()) -> jax.Array:
  """The loss a train step minimises: the mean over the batch of the (weighted) losses.

  With class weights, `sum(weight[label] * loss) / batch size`, as Keras's fit with
  `class_weight` and its 'sum_over_batch_size' reduction. With soft targets [b, k] an example
  weighs the sum over the classes of its (unsmoothed) target probability times the class's
  weight: lam w[y] + (1 - lam) w[y'] for a mixed pair, w[y] again for a one-hot target.
  """
  losses = per_example_loss(logits, labels, spec.label_smoothing)
  if spec.class_weights is None:
    return jnp.mean(losses)
  class_weights = jnp.asarray(spec.class_weights, losses.dtype)
  if labels.ndim == 2:
    weights = labels.astype(losses.dtype) @ class_weights
  else:
    weights = class_weights[labels]
  return jnp.sum(losses * weights) / losses.shape[0]


def balanced_weights(counts: Sequence[int]) -> tuple[float, ...]:
  """n / (k * count) for each of the k classes (n examples in all).

  Raises:
    DataError: a class has no training example (no weight can balance it).
  """
  counts = np.asarray(counts, np.int64)
  if (counts <= 0).any():
    raise errors.DataError(
        f'config.loss.class_weight={BALANCED!r}: class index(es) '
        f'{np.flatnonzero(counts <= 0).tolist()} have no training example; every class needs '
        'one to be weighted. Give the weights as a mapping instead.')
  n, k = int(counts.sum()), len(counts)
  return tuple(float(n / (k * c)) for c in counts)


def resolve_class_weights(value: Any, class_names: Sequence[str],
                          counts: Sequence[int] | None = None) -> tuple[float, ...] | None:
  """config.loss.class_weight as one weight per class index.

  Args:
    value: None or '' (unweighted), 'balanced', a mapping {class name or index: weight} (classes
      it leaves out weigh 1.0, as in Keras's `class_weight.get(label, 1.0)`), or the command
      line's 'name=weight,name=weight'.
    class_names: the classes, in label order.
    counts: the training split's examples per class, for 'balanced' (read only then).

  Raises:
    ConfigError: a key names no class, or a weight is not a positive number.
  """
  if value is None or value == '':
    return None
  if value == BALANCED:
    if counts is None:
      raise ValueError("class_weight='balanced' needs the training split's class counts.")
    return balanced_weights(counts)
  mapping = parse_mapping(value)
  names = [str(n) for n in class_names]
  weights = [1.0] * len(names)
  for key, weight in mapping.items():
    index = _class_index(key, names)
    if index is None:
      raise errors.ConfigError(
          f'config.loss.class_weight: {key!r} is neither a class name nor a class index; the '
          f'classes are {names} (indices 0 to {len(names) - 1}).')
    weights[index] = float(weight)
  return tuple(weights)


def parse_mapping(value: Any) -> dict[Any, float]:
  """A mapping, or 'name=weight,...', as {key: weight}; ValueError says what is wrong."""
  if isinstance(value, str):
    pairs = [p for p in value.split(',') if p.strip()]
    out = {}
    for pair in pairs:
      key, sep, weight = pair.partition('=')
      if not sep or not key.strip():
        raise ValueError(f"{pair!r} is not 'class=weight'")
      try:
        out[key.strip()] = float(weight)
      except ValueError:
        raise ValueError(f'{pair!r}: the weight is not a number') from None
    value = out
  elif hasattr(value, 'items') and not isinstance(value, Mapping):
    value = dict(value.items())   # a ConfigDict (a config.json's mapping, loaded)
  if not isinstance(value, Mapping) or not value:
    raise ValueError('not a mapping of classes to weights')
  for key, weight in value.items():
    if (isinstance(weight, bool) or not isinstance(weight, (int, float))
        or not math.isfinite(weight) or weight < 0):
      raise ValueError(f'the weight of {key!r} is {weight!r}, not a number >= 0')
  return dict(value)


def _class_index(key: Any, names: list[str]) -> int | None:
  if isinstance(key, str) and key in names:
    return names.index(key)
  if isinstance(key, bool):
    return None
  if isinstance(key, int) or (isinstance(key, str) and key.strip().isdigit()):
    index = int(key)
    return index if 0 <= index < len(names) else None
  return None


def describe(weights: Sequence[float], class_names: Sequence[str]) -> str:
  """'horses 1.0136, humans 0.98672' for the log."""
  return ', '.join(f'{n} {w:.5g}' for n, w in zip(class_names, weights))
