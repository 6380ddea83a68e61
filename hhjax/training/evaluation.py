"""One pass of evaluation: loss, accuracy, the confusion matrix, per-example probabilities and
labels, and the metrics of hhjax.eval_metrics computed from them.

The same `Evaluator` runs at the end of every training epoch (hhjax.train), in
`--mode=eval` (hhjax.evaluate) and over cached features (hhjax.training.feature_cache);
`report` logs a result with its metrics and writes WORKDIR/eval.json (the validation split at
the end of training), WORKDIR/test.json (the test split, then) or, for --mode=eval,
WORKDIR/eval/<split>-step_N.json, and the reliability diagram among that evaluation's pictures.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from hhjax import compilation
from hhjax import errors
from hhjax import eval_metrics
from hhjax import files
from hhjax import metrics as metrics_lib
from hhjax import pictures
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax.data import pipeline
from hhjax.data import spec as data_spec
from hhjax.training import steps

PyTree = Any
Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


def eval_batches(data: data_spec.DataSpec, split: str | None = None) -> Batches:
  """One pass of `split` (default: the validation split) per call, in table order; the
  dataset is built once, on first use."""
  dataset = None
  split = data.validation if split is None else split

  def batches():
    nonlocal dataset
    if dataset is None:
      dataset = pipeline.create_dataset(data, split, training=False)
    return dataset.as_numpy_iterator()

  return batches


class Evaluator:
  """Runs the jitted eval step over one pass of batches (the eval split, or cached features).

  Args:
    model: anything with `apply(variables, images, train=False)`.
    num_classes: for the confusion matrix.
    mesh: the device mesh.
    batches: returns a fresh iterable of padded batches with 'mask' per call.
    label_smoothing: config.loss.label_smoothing: the loss is Keras's val_loss, the compiled
      loss with its smoothing (and never class weights).
    metrics: what hhjax.eval_metrics computes beyond its fixed metrics (config.eval).
  """

  def __init__(self, model, num_classes: int, mesh: jax.sharding.Mesh, batches: Batches,
               label_smoothing: float = 0.0, metrics: eval_metrics.Spec = eval_metrics.Spec()):
    self._mesh = mesh
    self._batches = batches
    self._metrics = metrics
    eval_step = steps.make_eval_step(model, num_classes, label_smoothing)

    def step(params, batch_stats, batch):
      # The labels come back with the probabilities, gathered from every process's share.
      return dict(eval_step(params, batch_stats, batch), labels=batch['label'])

    repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    self._step = compilation.first_call_logged(
        jax.jit(step, in_shardings=(repl, repl, data), out_shardings=repl),
        'the evaluation step')

  def __call__(self, params: PyTree, batch_stats: PyTree,
               batches: Batches | None = None) -> dict[str, Any]:
    """One pass of the evaluator's batches, or of `batches` (another split, same step)."""
    totals, probabilities, labels = None, [], []
    for batch in (batches or self._batches)():
      out = self._step(params, batch_stats, sharding.to_global(batch, self._mesh))
      probabilities.append(out.pop('probabilities'))
      labels.append(out.pop('labels'))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
      raise errors.DataError('The evaluation split yielded no batches: it holds no images.')
    totals = jax.device_get(totals)
    count = int(round(float(totals['count'])))
    # Per example in table order: the pass is in order and pads only at its end.
    probabilities = np.concatenate(jax.device_get(probabilities))[:count]
    labels = np.concatenate(jax.device_get(labels))[:count].astype(int)
    return {'loss': float(totals['loss_sum']) / count,
            'accuracy': float(totals['correct']) / count,
            'count': count,
            'confusion': np.asarray(totals['confusion']).round().astype(int),
            'probabilities': probabilities,
            'labels': labels,
            'metrics': eval_metrics.compute(probabilities, labels, self._metrics)}


def eval_json(result: Mapping[str, Any], class_names: Sequence[str], step: int,
              split: str | None = None) -> dict[str, Any]:
  """What eval.json holds: step, loss, accuracy, count, class names, confusion matrix, and the
  metrics of hhjax.eval_metrics (per-class ones as {class: value})."""
  out = {'step': step, 'loss': result['loss'], 'accuracy': result['accuracy'],
         'count': result['count'], 'class_names': list(class_names),
         'confusion': np.asarray(result['confusion']).tolist()}
  if split is not None:
    out['split'] = split
  metrics = result.get('metrics')
  if metrics is not None:
    out.update(named_metrics(metrics, class_names))
  return out


def named_metrics(metrics: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
  """`eval_metrics.compute`'s result with its per-class lists keyed by class name."""
  names = [str(c) for c in class_names]
  out = dict(metrics)
  out['per_class'] = {name: {k: values[c] for k, values in metrics['per_class'].items()}
                      for c, name in enumerate(names)}
  if 'threshold' in out:
    out['threshold'] = dict(out['threshold'], positive_class=names[1])
  out['undefined'] = eval_metrics.reasons(metrics, names)
  return out


def format_metrics(out: Mapping[str, Any]) -> str:
  """The metrics of an eval.json dict as text: per class, then the means and the others."""
  per_class = out.get('per_class')
  if not per_class:
    return ''
  names = list(per_class)
  first = max([len(n) for n in names] + [len('weighted mean')]) + 2
  lines = [''.ljust(first) + ''.join(h.rjust(11) for h in
                                     ('precision', 'recall', 'F1', 'support', 'predicted'))]
  for name in names:
    row = per_class[name]
    lines.append(name.ljust(first) + ''.join(f'{row[k]:11.4f}' for k in
                                             ('precision', 'recall', 'f1'))
                 + f'{row["support"]:11d}{row["predicted"]:11d}')
  for average in ('macro', 'weighted'):
    lines.append(f'{average} mean'.ljust(first) + ''.join(
        f'{out[f"{k}_{average}"]:11.4f}' for k in ('precision', 'recall', 'f1')))
  others = [f'{k} {_number(out[k])}' for k in eval_metrics.scalar_names(out)
            if not k.startswith(('precision_', 'recall_', 'f1_'))]
  lines.append(', '.join(others) + f' (ECE: {out["calibration"]["bins"]} '
               f'{out["calibration"]["binning"]})')
  threshold = out.get('threshold')
  if threshold and threshold['value'] is not None:
    at, half = threshold['at_value'], threshold['at_0.5']
    lines.append(f'Decision threshold on p({threshold["positive_class"]}) maximising '
                 f'{_RULE_WORDS[threshold["rule"]]}: {threshold["value"]:.4f} (F1 {at["f1"]:.4f}, '
                 f'accuracy {at["accuracy"]:.4f}; at 0.5: F1 {half["f1"]:.4f}, accuracy '
                 f'{half["accuracy"]:.4f})')
  applied = out.get('threshold_from_validation')
  if applied:
    lines.append(f'At the threshold chosen on validation, {applied["threshold"]:.4f}: F1 '
                 f'{applied["f1"]:.4f}, accuracy {applied["accuracy"]:.4f}, balanced accuracy '
                 f'{applied["balanced_accuracy"]:.4f}')
  for name, reason in out.get('undefined', {}).items():
    lines.append(f'{name}: {reason}')
  return '\n'.join(lines)


_RULE_WORDS = {'f1': 'F1', 'youden': "Youden's J"}


def _number(value: float | None) -> str:
  return 'undefined' if value is None else f'{value:.4f}'


def report(result: Mapping[str, Any], class_names: Sequence[str], step: int, workdir: str,
           is_main: bool, *, split: str | None = None, path: str | None = None,
           pictures_dir: str | None = None) -> dict[str, Any]:
  """Logs an evaluation with its confusion matrix and metrics; process 0 writes the result file
  and the reliability diagram (calibration.png).

  Args:
    split: the evaluated split's name, recorded in the file and the titles when given.
    path: where the result goes (default WORKDIR/eval.json: the training run's own evaluation
      of its validation split).
    pictures_dir: the folder of this evaluation's pictures (default WORKDIR).
  """
  out = eval_json(result, class_names, step, split)
  logging.info('Evaluation at step %d on %d images%s: loss %.4f, accuracy %.4f\n'
               'Confusion matrix (rows: true class, columns: predicted):\n%s\n%s', step,
               result['count'], f' of {split}' if split else '', result['loss'],
               result['accuracy'],
               metrics_lib.format_confusion(result['confusion'], class_names),
               format_metrics(out))
  if is_main:
    try:
      workdir_lib.write_eval(workdir, out, path)
      if 'calibration' in out:
        folder = pictures_dir or workdir
        epath.Path(folder).mkdir(parents=True, exist_ok=True)
        logging.info('Wrote %s', write_calibration(out, folder, step, split))
    except Exception as e:  # pylint: disable=broad-except  # OSError here, other types on gs://
      # The results are printed above; a read-only workdir should not turn them into a failure.
      logging.warning('Could not write %s (%s: %s); the results above are not saved.',
                      path or f'{workdir}/{workdir_lib.EVAL_FILE}', type(e).__name__, e)
  return out


def write_calibration(out: Mapping[str, Any], folder: str, step: int,
                      split: str | None = None) -> str:
  """Writes the reliability diagram of an eval.json dict: FOLDER/calibration.png."""
  name = pictures.CALIBRATION_FILE
  where = f' on {split}' if split else ''
  fig = pictures.plot_calibration(out['calibration'],
                                  f'Reliability diagram{where} at step {step}, '
                                  f'{out["count"]} images')
  return str(files.write_png(epath.Path(folder) / name, fig))
