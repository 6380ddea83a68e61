"""The metrics of a classification evaluation, from its per-example probabilities and labels.

    compute(probabilities, labels, spec)        every metric below, as plain JSON values
    at_threshold(probabilities, labels, t)      a binary head's metrics when "positive" means
                                                p(positive class) >= t
    row_fields(metrics, class_names, 'val')     the scalar ones as metrics.jsonl fields

The evaluation pass (hhjax.training.evaluation) already returns each example's class
probabilities; everything here is computed from them, without a second pass over the images.
The arithmetic is scikit-learn's (`sklearn.metrics`), except the calibration error, which it
lacks for the top class:

- predicted class: the most probable one (a binary head: p > 0.5), as the confusion matrix;
- per class: precision, recall, F1 and support; their macro (unweighted) and weighted (by
  support) means; balanced accuracy (the mean recall);
- ROC AUC and average precision: of the positive class (class 1) for two classes, one-vs-rest
  and macro-averaged over the classes for more; None, with the reason in 'undefined', when a
  class has no example in the split (a split of one class has no ROC curve);
- top-k accuracy for each k of `Spec.top_k` smaller than the number of classes;
- log loss: the mean cross-entropy of the probabilities (the evaluation's own 'loss' is
  computed from the logits with the training's label smoothing, as Keras's val_loss: without
  smoothing the two differ by float32 rounding and clipping only);
- expected calibration error (Guo et al. 2017, "On calibration of modern neural networks",
  eq. 3): the top-class probability of every example in `Spec.calibration_bins` equal-width
  bins ((0, 1/M], (1/M, 2/M], ..., ((M-1)/M, 1]), ECE = sum over bins of
  |bin| / n * |accuracy(bin) - mean confidence(bin)|; the bins are kept for the reliability
  diagram;
- a binary head: the decision threshold that maximises F1 (or Youden's J = TPR - FPR) on this
  split, and the metrics at it beside those at 0.5. It is chosen on the split evaluated here;
  `at_threshold` applies it to another.

A class nobody predicted has precision 0 (scikit-learn's zero_division=0), said in
'undefined' as well. scikit-learn is imported on first use (`_sk`): config checks and reading
results need none of it.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any
import warnings

import numpy as np

THRESHOLD_RULES = ('f1', 'youden')
# Per-class fields in the metrics rows (and TensorBoard) only up to this many classes; eval.json
# and the log always have them.
MAX_CLASSES_IN_ROWS = 20
CALIBRATION_BINNING = 'equal-width bins of the top-class probability'


@dataclasses.dataclass(frozen=True)
class Spec:
  """What `compute` reports beyond the fixed metrics (config.eval).

  top_k: the k of top-k accuracy; each k smaller than the number of classes is reported.
  threshold_rule: how a binary head's decision threshold is chosen: 'f1' or 'youden'.
  calibration_bins: the number of equal-width confidence bins of the calibration error.
  """
  top_k: tuple[int, ...] = (5,)
  threshold_rule: str = 'f1'
  calibration_bins: int = 15


def _sk():
  """sklearn.metrics, imported on first use (see the module docstring)."""
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  return metrics


def _float(value) -> float | None:
  value = float(value)
  return value if math.isfinite(value) else None


def predicted_classes(probabilities: np.ndarray) -> np.ndarray:
  """The most probable class of each example (the first of equals)."""
  return np.argmax(probabilities, axis=-1)


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int) -> dict[str, Any]:
  """The top-class confidence in `bins` equal-width bins, and the expected calibration error.

  Bin m (from 0) holds the confidences c with m/bins < c <= (m+1)/bins (Guo et al. 2017);
  an empty bin has accuracy and confidence None and adds nothing to the error.
  """
  probabilities = np.asarray(probabilities, np.float64)
  labels = np.asarray(labels)
  predicted = predicted_classes(probabilities)
  confidence = probabilities[np.arange(len(labels)), predicted]
  correct = (predicted == labels).astype(np.float64)
  edges = np.linspace(0.0, 1.0, bins + 1)
  # side='left': a confidence equal to an edge falls in the bin that edge closes.
  index = np.searchsorted(edges[1:-1], confidence, side='left')
  count = np.bincount(index, minlength=bins)
  accuracy_sum = np.bincount(index, weights=correct, minlength=bins)
  confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
  filled = count > 0
  accuracy = np.where(filled, accuracy_sum / np.maximum(count, 1), np.nan)
  mean_confidence = np.where(filled, confidence_sum / np.maximum(count, 1), np.nan)
  ece = float(np.sum(count[filled] / len(labels)
                     * np.abs(accuracy[filled] - mean_confidence[filled])))
  return {'ece': ece, 'bins': bins, 'binning': CALIBRATION_BINNING,
          'lower': edges[:-1].tolist(), 'upper': edges[1:].tolist(), 'count': count.tolist(),
          'accuracy': [_float(a) if f else None for a, f in zip(accuracy, filled)],
          'confidence': [_float(c) if f else None for c, f in zip(mean_confidence, filled)]}


def at_threshold(probabilities: np.ndarray, labels: np.ndarray, threshold: float
                 ) -> dict[str, Any]:
  """A binary head's metrics when an example is called positive (class 1) at p >= threshold.

  Returns:
    threshold, accuracy, balanced_accuracy, and the positive class's precision, recall and F1,
    with the confusion matrix [[TN, FP], [FN, TP]].
  """
  sk = _sk()
  labels = np.asarray(labels)
  predicted = (np.asarray(probabilities)[:, 1] >= threshold).astype(int)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')   # a split of one class: balanced accuracy warns
    precision, recall, f1, _ = sk.precision_recall_fscore_support(
        labels, predicted, labels=[0, 1], pos_label=1, average='binary', zero_division=0)
    balanced = sk.balanced_accuracy_score(labels, predicted)
  return {'threshold': float(threshold),
          'accuracy': float(sk.accuracy_score(labels, predicted)),
          'balanced_accuracy': float(balanced), 'precision': float(precision),
          'recall': float(recall), 'f1': float(f1),
          'confusion': sk.confusion_matrix(labels, predicted, labels=[0, 1]).tolist()}


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray, rule: str
                     ) -> tuple[float | None, str | None]:
  """(threshold, None) that maximises F1 ('f1') or Youden's J ('youden') of the positive class
  over this split's own probabilities; (None, reason) when the split has one class only.

  The threshold is one of the probabilities (the lowest of those that reach the maximum), so
  that `at_threshold` at it gives that maximum.
  """
  if rule not in THRESHOLD_RULES:
    raise ValueError(f'threshold rule {rule!r}: expected one of {THRESHOLD_RULES}')
  sk = _sk()
  labels = np.asarray(labels)
  score = np.asarray(probabilities)[:, 1]
  if len(np.unique(labels)) < 2:
    return None, 'the split holds one class only'
  if rule == 'f1':
    precision, recall, thresholds = sk.precision_recall_curve(labels, score, pos_label=1)
    # The last point (recall 0) has no threshold.
    p, r = precision[:-1], recall[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-300), 0.0)
    best = int(np.argmax(f1))
  else:
    fpr, tpr, thresholds = sk.roc_curve(labels, score, pos_label=1, drop_intermediate=False)
    finite = np.isfinite(thresholds)   # the first point, +inf, predicts nothing positive
    j = np.where(finite, tpr - fpr, -np.inf)
    # roc_curve lists thresholds from high to low: the last of the maxima is the lowest.
    best = len(j) - 1 - int(np.argmax(j[::-1]))
  return float(thresholds[best]), None


def _ranking(sk, probabilities: np.ndarray, labels: np.ndarray, num_classes: int,
             present: np.ndarray) -> dict[str, float | None]:
  """ROC AUC and average precision; None where a class has no example."""
  if len(present) < num_classes:
    return {'roc_auc': None, 'average_precision': None}
  if num_classes == 2:
    score = probabilities[:, 1]
    return {'roc_auc': float(sk.roc_auc_score(labels, score)),
            'average_precision': float(sk.average_precision_score(labels, score, pos_label=1))}
  one_hot = np.eye(num_classes, dtype=int)[labels]
  return {'roc_auc': float(sk.roc_auc_score(labels, probabilities, multi_class='ovr',
                                            average='macro', labels=list(range(num_classes)))),
          'average_precision': float(sk.average_precision_score(one_hot, probabilities,
                                                                average='macro'))}


def compute(probabilities: np.ndarray, labels: np.ndarray, spec: Spec = Spec(),
            class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Every metric of the module docstring, as JSON values (per class: lists in class order).

  Args:
    probabilities: [n, num_classes], each row summing to 1.
    labels: [n] true classes, integers in [0, num_classes).
    spec: top-k, threshold rule and calibration bins.
    class_names: for the sentences of 'undefined' (default: the class indexes; `reasons`
      writes them again for other names).
  """
  sk = _sk()
  probabilities = np.asarray(probabilities)
  labels = np.asarray(labels).astype(int)
  num_classes = probabilities.shape[1]
  classes = list(range(num_classes))
  predicted = predicted_classes(probabilities)
  present = np.unique(labels)
  out: dict[str, Any] = {}
  with warnings.catch_warnings():
    # The cases scikit-learn warns about are reported in 'undefined' instead.
    warnings.simplefilter('ignore')
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        labels, predicted, labels=classes, average=None, zero_division=0)
    for average in ('macro', 'weighted'):
      p, r, f, _ = sk.precision_recall_fscore_support(
          labels, predicted, labels=classes, average=average, zero_division=0)
      out.update({f'precision_{average}': float(p), f'recall_{average}': float(r),
                  f'f1_{average}': float(f)})
    out['balanced_accuracy'] = float(sk.balanced_accuracy_score(labels, predicted))
    out.update(_ranking(sk, probabilities, labels, num_classes, present))
    out['log_loss'] = float(sk.log_loss(labels, probabilities, labels=classes))
    # Two classes: scikit-learn takes the positive class's score (top-1 is the accuracy).
    scores = probabilities[:, 1] if num_classes == 2 else probabilities
    for k in sorted(set(spec.top_k)):
      if k < num_classes:
        out[f'top_{k}_accuracy'] = float(sk.top_k_accuracy_score(labels, scores, k=k,
                                                                 labels=classes))
  predictions = np.bincount(predicted, minlength=num_classes)
  out['per_class'] = {'precision': precision.tolist(), 'recall': recall.tolist(),
                      'f1': f1.tolist(), 'support': np.asarray(support, int).tolist(),
                      'predicted': predictions.tolist()}
  out['calibration'] = calibration(probabilities, labels, spec.calibration_bins)
  out['ece'] = out['calibration']['ece']
  if num_classes == 2:
    out['threshold'] = _threshold_block(probabilities, labels, spec.threshold_rule)
  out['undefined'] = reasons(out, class_names if class_names is not None else classes)
  return out


def reasons(metrics: Mapping[str, Any], class_names: Sequence[Any]) -> dict[str, str]:
  """{metric: why it is None or set by convention} of a `compute` result, naming the classes
  `class_names`: ranking metrics of a split missing a class, precision of a class nobody
  predicted, recall of a class with no example, a threshold on a split of one class."""
  names = [str(c) for c in class_names]
  support, predicted = metrics['per_class']['support'], metrics['per_class']['predicted']
  out = {}
  missing = [names[c] for c, n in enumerate(support) if not n]
  if metrics['roc_auc'] is None and missing:
    out['roc_auc'] = out['average_precision'] = (
        f'no example of {", ".join(missing)} in the split: '
        + ('a split of one class has no ROC or precision-recall curve'
           if len(names) - len(missing) < 2 else 'its one-vs-rest curves are undefined'))
  for c, name in enumerate(names):
    if not predicted[c]:
      out[f'precision/{name}'] = (f'no example was predicted as {name}: precision set to 0 '
                                  '(zero_division)')
    if not support[c]:
      out[f'recall/{name}'] = (f'no example of {name} in the split: recall set to 0 '
                               '(zero_division)')
  threshold = metrics.get('threshold')
  if threshold is not None and threshold['value'] is None:
    out['threshold'] = 'no threshold can be chosen: the split holds one class only'
  return out


def _threshold_block(probabilities, labels, rule: str) -> dict[str, Any]:
  chosen, _ = choose_threshold(probabilities, labels, rule)
  return {'rule': rule, 'positive_class': 1, 'value': chosen,
          'at_value': None if chosen is None else at_threshold(probabilities, labels, chosen),
          'at_0.5': at_threshold(probabilities, labels, 0.5)}


# The scalar metrics, in the order the log, the rows and the report list them.
SCALARS = ('balanced_accuracy', 'precision_macro', 'recall_macro', 'f1_macro',
           'precision_weighted', 'recall_weighted', 'f1_weighted', 'roc_auc',
           'average_precision', 'log_loss', 'ece')


def scalar_names(metrics: Mapping[str, Any]) -> list[str]:
  """The scalar metrics `metrics` holds: SCALARS, then top-k accuracies by k."""
  top_k = sorted((k for k in metrics if k.startswith('top_') and k.endswith('_accuracy')),
                 key=lambda k: int(k.split('_')[1]))
  return [k for k in SCALARS if k in metrics] + top_k


def row_fields(metrics: Mapping[str, Any], class_names: Sequence[str], prefix: str
               ) -> dict[str, float]:
  """Metrics rows' fields: '<prefix>_<metric>' for each defined scalar, the chosen threshold,
  and '<prefix>_<precision|recall|f1>/<class>' up to MAX_CLASSES_IN_ROWS classes.

  TensorBoard shows each as '<prefix>/<metric>' (hhjax.metrics).
  """
  out = {f'{prefix}_{k}': metrics[k] for k in scalar_names(metrics) if metrics[k] is not None}
  threshold = metrics.get('threshold') or {}
  if threshold.get('value') is not None:
    out[f'{prefix}_threshold'] = threshold['value']
    out[f'{prefix}_f1_at_threshold'] = threshold['at_value']['f1']
  if len(class_names) <= MAX_CLASSES_IN_ROWS:
    for name in ('precision', 'recall', 'f1'):
      for c, value in zip(class_names, metrics['per_class'][name]):
        out[f'{prefix}_{name}/{c}'] = value
  return out
