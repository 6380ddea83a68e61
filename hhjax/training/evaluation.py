"""One pass of evaluation: loss, accuracy, the confusion matrix and per-example probabilities.

The same `Evaluator` runs at the end of every training epoch (hhjax.train), in
`--mode=eval` (hhjax.evaluate) and over cached features (hhjax.training.feature_cache);
`report` logs a result and writes WORKDIR/eval.json (the validation split at the end of training),
WORKDIR/test.json (the test split, then) or, for --mode=eval, WORKDIR/eval/<split>-step_N.json.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from hhjax import compilation
from hhjax import errors
from hhjax import metrics as metrics_lib
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
  """

  def __init__(self, model, num_classes: int, mesh: jax.sharding.Mesh, batches: Batches,
               label_smoothing: float = 0.0):
    self._mesh = mesh
    self._batches = batches
    repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    self._step = compilation.first_call_logged(
        jax.jit(steps.make_eval_step(model, num_classes, label_smoothing),
                in_shardings=(repl, repl, data), out_shardings=repl), 'the evaluation step')

  def __call__(self, params: PyTree, batch_stats: PyTree,
               batches: Batches | None = None) -> dict[str, Any]:
    """One pass of the evaluator's batches, or of `batches` (another split, same step)."""
    totals, probabilities = None, []
    for batch in (batches or self._batches)():
      out = self._step(params, batch_stats, sharding.to_global(batch, self._mesh))
      probabilities.append(out.pop('probabilities'))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
      raise errors.DataError('The evaluation split yielded no batches: it holds no images.')
    totals = jax.device_get(totals)
    count = float(totals['count'])
    return {'loss': float(totals['loss_sum']) / count,
            'accuracy': float(totals['correct']) / count,
            'count': int(count),
            'confusion': np.asarray(totals['confusion']).round().astype(int),
            # Per example in table order: the pass is in order and pads only at its end.
            'probabilities': np.concatenate(jax.device_get(probabilities))[:int(count)]}


def report(result: Mapping[str, Any], class_names: Sequence[str], step: int, workdir: str,
           is_main: bool, *, split: str | None = None,
           path: str | None = None) -> dict[str, Any]:
  """Logs an evaluation with its confusion matrix; process 0 writes WORKDIR/eval.json.

  `split` names the evaluated split in the log and the file; `path` is where the file goes
  (default WORKDIR/eval.json: the training run's own evaluation of its validation split).
  """
  out = {'step': step, 'loss': result['loss'], 'accuracy': result['accuracy'],
         'count': result['count'], 'class_names': list(class_names),
         'confusion': np.asarray(result['confusion']).tolist()}
  if split is not None:
    out['split'] = split
  logging.info('Evaluation at step %d%s on %d images: loss %.4f, accuracy %.4f\n'
               'Confusion matrix (rows: true class, columns: predicted):\n%s', step,
               f' of {split}' if split else '', result['count'], result['loss'],
               result['accuracy'],
               metrics_lib.format_confusion(result['confusion'], class_names))
  if is_main:
    try:
      workdir_lib.write_eval(workdir, out, path)
    except Exception as e:  # pylint: disable=broad-except  # OSError here, other types on gs://
      # The results are printed above; a read-only workdir should not turn them into a failure.
      logging.warning('Could not write %s (%s: %s); the results above are not saved.',
                      path or f'{workdir}/{workdir_lib.EVAL_FILE}', type(e).__name__, e)
  return out
