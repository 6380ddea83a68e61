"""The evaluation metrics (hhjax.eval_metrics) against small cases worked out by hand, against
scikit-learn called on the same raw arrays, and the calibration error against its published
formula (Guo et al. 2017, eq. 3) written out here on its own."""

import math
import warnings
import zlib

import numpy as np
import pytest
from sklearn import metrics as sk

from hhjax import eval_metrics
from hhjax.training import evaluation

# ----------------------------------------------------------------------- worked out by hand

# Two classes, p(class 1) per example. Predicted (p > 0.5): 0 1 0 1 1.
BINARY_Y = np.array([0, 0, 1, 1, 1])
BINARY_P1 = np.array([0.1, 0.6, 0.4, 0.8, 0.9])


def _binary(p1):
  p1 = np.asarray(p1, np.float64)
  return np.stack([1 - p1, p1], axis=1)


def test_two_classes_by_hand():
  m = eval_metrics.compute(_binary(BINARY_P1), BINARY_Y)
  # Class 1: TP 2, FP 1, FN 1; class 0: TP 1, FP 1, FN 1.
  assert m['per_class']['precision'] == pytest.approx([1 / 2, 2 / 3])
  assert m['per_class']['recall'] == pytest.approx([1 / 2, 2 / 3])
  assert m['per_class']['support'] == [2, 3] and m['per_class']['predicted'] == [2, 3]
  assert m['f1_macro'] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert m['f1_weighted'] == pytest.approx((2 * 1 / 2 + 3 * 2 / 3) / 5)
  assert m['balanced_accuracy'] == pytest.approx((1 / 2 + 2 / 3) / 2)
  # Of the 6 (positive, negative) pairs, 5 rank the positive higher: AUC of class 1 (of
  # class 0's column it would be 1/6).
  assert m['roc_auc'] == pytest.approx(5 / 6)
  # Ranked: + + - + -: precision 1 at recall 1/3 and 2/3, 3/4 at recall 1.
  assert m['average_precision'] == pytest.approx((1 + 1 + 3 / 4) / 3)
  assert m['log_loss'] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.4, 0.8, 0.9])))
  # Confidences 0.9 0.6 0.6 0.8 0.9, right / wrong / wrong / right / right.
  assert m['ece'] == pytest.approx(2 / 5 * 0.6 + 1 / 5 * 0.2 + 2 / 5 * 0.1)
  assert 'top_5_accuracy' not in m   # 5 is not fewer than 2 classes


@pytest.mark.parametrize('rule, threshold, f1', [
    # p >= 0.4 calls 4 positive, 3 of them right: F1 = 2 * 3/4 * 1 / (3/4 + 1) = 6/7.
    ('f1', 0.4, 6 / 7),
    # p >= 0.8: TPR 2/3, FPR 0, J = 2/3 (at 0.4: 1 - 1/2), F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8.
    ('youden', 0.8, 0.8)])
def test_the_binary_threshold_by_hand(rule, threshold, f1):
  m = eval_metrics.compute(_binary(BINARY_P1), BINARY_Y, eval_metrics.Spec(threshold_rule=rule))
  chosen = m['threshold']
  assert chosen['rule'] == rule and chosen['value'] == pytest.approx(threshold)
  assert chosen['at_value']['f1'] == pytest.approx(f1)
  assert chosen['at_0.5']['f1'] == pytest.approx(2 / 3)   # the default decision's F1
  assert chosen['at_0.5']['confusion'] == [[1, 1], [1, 2]]


def test_three_classes_by_hand():
  y = np.array([0, 1, 2, 2])
  p = np.array([[0.7, 0.2, 0.1], [0.3, 0.4, 0.3], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
  m = eval_metrics.compute(p, y, eval_metrics.Spec(top_k=(1, 2, 5)))
  # Predicted 0 1 1 2.
  assert m['per_class']['precision'] == pytest.approx([1, 1 / 2, 1])
  assert m['per_class']['recall'] == pytest.approx([1, 1, 1 / 2])
  assert m['f1_macro'] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
  assert m['f1_weighted'] == pytest.approx((1 + 2 / 3 + 2 * 2 / 3) / 4)
  # One-vs-rest: class 0 ranks first (1), class 1 beats 2 of 3 (2/3), class 2 wins 3 pairs of
  # 4 with one tie (3.5 / 4); their plain mean.
  assert m['roc_auc'] == pytest.approx((1 + 2 / 3 + 3.5 / 4) / 3)
  assert m['top_1_accuracy'] == pytest.approx(3 / 4)
  assert m['top_2_accuracy'] == pytest.approx(1.0)
  assert 'top_5_accuracy' not in m and 'threshold' not in m


# ------------------------------------------------------------- against scikit-learn, raw arrays

def _softmax(z):
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _case(name):
  """(probabilities float32 as the eval step returns them, labels)."""
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  if name == 'binary':
    y = rng.integers(0, 2, 60)
    p1 = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.5, 60))))
    return _binary(p1).astype(np.float32), y
  if name == 'three classes':
    y = rng.integers(0, 3, 90)
    return _softmax(rng.normal(0, 1, (90, 3)) + 1.5 * np.eye(3)[y]), y
  if name == 'imbalanced 90/10':
    y = (rng.random(200) < 0.1).astype(int)
    p1 = 1 / (1 + np.exp(-(3 * y - 2 + rng.normal(0, 1, 200))))
    return _binary(p1).astype(np.float32), y
  if name == 'a class nobody predicts':
    y = rng.integers(0, 3, 60)
    z = rng.normal(0, 1, (60, 3)) + 1.5 * np.eye(3)[y]
    z[:, 2] -= 10   # never the most probable
    return _softmax(z), y
  if name == 'seven classes':
    y = rng.integers(0, 7, 140)
    return _softmax(rng.normal(0, 1, (140, 7)) + 2 * np.eye(7)[y]), y
  raise ValueError(name)


CASES = ['binary', 'three classes', 'imbalanced 90/10', 'a class nobody predicts',
         'seven classes']


@pytest.mark.parametrize('name', CASES)
def test_every_metric_equals_scikit_learn_on_the_same_arrays(name):
  p, y = _case(name)
  n = p.shape[1]
  m = eval_metrics.compute(p, y, eval_metrics.Spec(top_k=(1, 3, 5)))
  predicted = p.argmax(axis=1)
  labels = list(range(n))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')   # a class nobody predicts: precision is ill-defined
    precision, recall, f1, support = sk.precision_recall_fscore_support(y, predicted,
                                                                        labels=labels)
  np.testing.assert_allclose(m['per_class']['precision'], precision)
  np.testing.assert_allclose(m['per_class']['recall'], recall)
  np.testing.assert_allclose(m['per_class']['f1'], f1)
  assert m['per_class']['support'] == support.tolist()
  for average in ('macro', 'weighted'):
    assert m[f'precision_{average}'] == pytest.approx(
        sk.precision_score(y, predicted, average=average, zero_division=0))
    assert m[f'recall_{average}'] == pytest.approx(
        sk.recall_score(y, predicted, average=average, zero_division=0))
    assert m[f'f1_{average}'] == pytest.approx(
        sk.f1_score(y, predicted, average=average, zero_division=0))
  assert m['balanced_accuracy'] == pytest.approx(sk.balanced_accuracy_score(y, predicted))
  if n == 2:   # the positive class: the second column
    assert m['roc_auc'] == pytest.approx(sk.roc_auc_score(y, p[:, 1]))
    assert m['average_precision'] == pytest.approx(sk.average_precision_score(y, p[:, 1]))
  else:        # one-vs-rest, the plain mean over classes
    assert m['roc_auc'] == pytest.approx(sk.roc_auc_score(y, p, multi_class='ovr'))
    assert m['roc_auc'] == pytest.approx(np.mean(
        [sk.roc_auc_score(y == c, p[:, c]) for c in range(n)]))
    assert m['average_precision'] == pytest.approx(np.mean(
        [sk.average_precision_score(y == c, p[:, c]) for c in range(n)]))
  assert m['log_loss'] == pytest.approx(sk.log_loss(y, p), rel=1e-6)
  for k in (1, 3, 5):
    if k < n:
      # Ranked by hand: the true class among the k most probable.
      top = np.argsort(-p, axis=1, kind='stable')[:, :k]
      assert m[f'top_{k}_accuracy'] == pytest.approx(np.mean([y[i] in top[i]
                                                               for i in range(len(y))]))
      if n > 2:
        assert m[f'top_{k}_accuracy'] == pytest.approx(sk.top_k_accuracy_score(y, p, k=k))
    else:
      assert f'top_{k}_accuracy' not in m
  assert m['ece'] == pytest.approx(_guo_ece(p, y, 15))


@pytest.mark.parametrize('name', ['binary', 'imbalanced 90/10'])
@pytest.mark.parametrize('rule', eval_metrics.THRESHOLD_RULES)
def test_the_chosen_threshold_reaches_the_best_score_of_every_threshold(name, rule):
  p, y = _case(name)
  m = eval_metrics.compute(p, y, eval_metrics.Spec(threshold_rule=rule))
  at = m['threshold']['at_value']

  def score(t):
    predicted = (p[:, 1] >= t).astype(int)
    if rule == 'f1':
      return sk.f1_score(y, predicted)
    tn, fp, fn, tp = sk.confusion_matrix(y, predicted).ravel()
    return tp / (tp + fn) - fp / (fp + tn)

  best = max(score(t) for t in np.unique(p[:, 1]))
  assert score(m['threshold']['value']) == pytest.approx(best)
  predicted = (p[:, 1] >= m['threshold']['value']).astype(int)
  assert at['f1'] == pytest.approx(sk.f1_score(y, predicted))
  assert at['precision'] == pytest.approx(sk.precision_score(y, predicted))
  assert at['recall'] == pytest.approx(sk.recall_score(y, predicted))
  assert at['accuracy'] == pytest.approx(sk.accuracy_score(y, predicted))
  # The model's own decision, beside it.
  half = (p[:, 1] >= 0.5).astype(int)
  assert m['threshold']['at_0.5']['f1'] == pytest.approx(sk.f1_score(y, half))


def test_a_threshold_chosen_on_one_split_applies_to_another():
  p, y = _case('binary')
  chosen = eval_metrics.compute(p[:30], y[:30])['threshold']['value']
  applied = eval_metrics.at_threshold(p[30:], y[30:], chosen)
  predicted = (p[30:, 1] >= chosen).astype(int)
  assert applied['threshold'] == chosen
  assert applied['f1'] == pytest.approx(sk.f1_score(y[30:], predicted))
  assert applied['balanced_accuracy'] == pytest.approx(
      sk.balanced_accuracy_score(y[30:], predicted))
  assert applied['confusion'] == sk.confusion_matrix(y[30:], predicted).tolist()


# -------------------------------------------------------------------- the calibration error

def _guo_ece(p, y, bins):
  """Guo et al. 2017, eq. 3: sum over the bins I_m = ((m-1)/M, m/M] of the top-class
  confidence, |B_m| / n * |acc(B_m) - conf(B_m)|."""
  p = np.asarray(p, np.float64)
  confidence, predicted = p.max(axis=1), p.argmax(axis=1)
  total = 0.0
  for m in range(1, bins + 1):
    low, high = (m - 1) / bins, m / bins
    members = [i for i in range(len(y)) if low < confidence[i] <= high]
    if members:
      accuracy = sum(predicted[i] == y[i] for i in members) / len(members)
      mean_confidence = sum(confidence[i] for i in members) / len(members)
      total += len(members) / len(y) * abs(accuracy - mean_confidence)
  return total


@pytest.mark.parametrize('bins', [1, 10, 15])
@pytest.mark.parametrize('name', ['three classes', 'imbalanced 90/10'])
def test_the_calibration_error_follows_its_published_formula(name, bins):
  p, y = _case(name)
  calibration = eval_metrics.calibration(p, y, bins)
  assert calibration['ece'] == pytest.approx(_guo_ece(p, y, bins), abs=1e-12)
  assert sum(calibration['count']) == len(y) and len(calibration['count']) == bins


def test_a_confidence_on_a_bin_edge_falls_in_the_bin_it_closes():
  # Confidences 0.5 and 1.0 exactly: (0.4, 0.5] and (0.9, 1.0] of 10 bins.
  calibration = eval_metrics.calibration(np.array([[0.5, 0.5], [0.0, 1.0]]), np.array([0, 0]),
                                         10)
  assert calibration['count'] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1]
  assert calibration['accuracy'][4] == 1.0 and calibration['accuracy'][9] == 0.0
  assert calibration['ece'] == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)


def test_a_perfectly_confident_and_right_model_has_no_calibration_error():
  y = np.array([0, 1, 2, 1])
  assert eval_metrics.calibration(np.eye(3)[y], y, 15)['ece'] == 0.0


# ------------------------------------------------------------------------ degenerate splits

def test_a_split_of_one_class_reports_undefined_ranking_metrics_with_the_reason():
  y = np.zeros(6, int)
  p = _binary([0.1, 0.2, 0.7, 0.3, 0.4, 0.2])
  m = eval_metrics.compute(p, y, class_names=['cat', 'dog'])
  assert m['roc_auc'] is None and m['average_precision'] is None
  assert 'no example of dog' in m['undefined']['roc_auc']
  assert m['threshold']['value'] is None and m['threshold']['at_value'] is None
  assert 'one class' in m['undefined']['threshold']
  assert m['per_class']['recall'] == [pytest.approx(5 / 6), 0.0]
  assert 'recall/dog' in m['undefined'] and 'zero_division' in m['undefined']['recall/dog']
  assert m['log_loss'] == pytest.approx(sk.log_loss(y, p, labels=[0, 1]))


def test_a_class_nobody_predicts_has_precision_zero_said_in_undefined():
  p, y = _case('a class nobody predicts')
  m = eval_metrics.compute(p, y, class_names=['a', 'b', 'c'])
  assert m['per_class']['predicted'][2] == 0 and m['per_class']['precision'][2] == 0.0
  assert 'no example was predicted as c' in m['undefined']['precision/c']
  assert m['roc_auc'] is not None   # every class has examples: its ranking is defined


def test_a_class_absent_from_a_multiclass_split_leaves_auc_undefined():
  y = np.array([0, 1, 0, 1])
  p = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
  m = eval_metrics.compute(p, y, class_names=['a', 'b', 'c'])
  assert m['roc_auc'] is None and 'no example of c' in m['undefined']['roc_auc']
  assert m['f1_macro'] == pytest.approx(sk.f1_score(y, p.argmax(1), labels=[0, 1, 2],
                                                    average='macro', zero_division=0))


# ---------------------------------------------------------------- where the numbers go

def test_rows_get_the_defined_scalars_and_per_class_fields_by_class_name():
  p, y = _case('binary')
  m = eval_metrics.compute(p, y)
  row = eval_metrics.row_fields(m, ['cat', 'dog'], 'val')
  assert row['val_f1_macro'] == m['f1_macro'] and row['val_ece'] == m['ece']
  assert row['val_roc_auc'] == m['roc_auc']
  assert row['val_f1/dog'] == m['per_class']['f1'][1]
  assert row['val_threshold'] == m['threshold']['value']
  assert all(isinstance(v, float) for v in row.values())
  undefined = eval_metrics.compute(_binary([0.2, 0.6]), np.array([0, 0]))
  assert 'val_roc_auc' not in eval_metrics.row_fields(undefined, ['cat', 'dog'], 'val')
  many = [f'c{i}' for i in range(eval_metrics.MAX_CLASSES_IN_ROWS + 1)]
  wide = eval_metrics.compute(np.eye(len(many))[np.arange(len(many))], np.arange(len(many)))
  assert not [k for k in eval_metrics.row_fields(wide, many, 'val') if '/' in k]


def test_eval_json_names_each_class_and_the_positive_one():
  p, y = _case('binary')
  result = {'loss': 0.5, 'accuracy': 0.75, 'count': len(y), 'confusion': np.eye(2),
            'metrics': eval_metrics.compute(p, y)}
  out = evaluation.eval_json(result, ['cat', 'dog'], 7, split='test')
  assert out['split'] == 'test' and out['step'] == 7
  assert out['per_class']['dog']['f1'] == result['metrics']['per_class']['f1'][1]
  assert out['threshold']['positive_class'] == 'dog'
  assert not math.isnan(out['ece'])
  text = evaluation.format_metrics(out)
  assert 'macro mean' in text and 'roc_auc' in text and 'maximising F1' in text


def test_eval_json_says_what_is_undefined_with_the_class_names():
  # The evaluation pass knows class indexes only; eval.json names the classes.
  y = np.zeros(4, int)
  metrics = eval_metrics.compute(_binary([0.1, 0.2, 0.3, 0.4]), y)
  assert 'recall/1' in metrics['undefined']
  result = {'loss': 0.3, 'accuracy': 1.0, 'count': 4, 'confusion': [[4, 0], [0, 0]],
            'metrics': metrics}
  undefined = evaluation.eval_json(result, ['cat', 'dog'], 1)['undefined']
  assert set(undefined) == {'roc_auc', 'average_precision', 'precision/dog', 'recall/dog',
                            'threshold'}
  assert 'no example of dog' in undefined['roc_auc']
