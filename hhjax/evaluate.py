"""Evaluation: loss, accuracy and the confusion matrix over one pass of the eval split.

    python main.py --workdir=W --mode=eval [--checkpoint=best]

The same `Evaluator` runs at the end of every training epoch and in `--mode=eval`.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hhjax import checkpointing
from hhjax import config_checks
from hhjax import errors
from hhjax import metrics as metrics_lib
from hhjax import pictures
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax.data import pipeline
from hhjax.data import spec as data_spec
from hhjax.model import classifier
from hhjax.training import phases as phases_lib
from hhjax.training import state as state_lib
from hhjax.training import steps

PyTree = Any
Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  return int(config.get('eval_batch_size') or config.batch_size)


def eval_batches(config: ml_collections.ConfigDict) -> Batches:
  """One pass of config.data.eval_split per call; the dataset is built once, on first use."""
  dataset = None

  def batches():
    nonlocal dataset
    if dataset is None:
      dataset = pipeline.create_dataset(data_spec.DataSpec.from_config(config),
                                        config.data.eval_split)
    return dataset.as_numpy_iterator()

  return batches


class Evaluator:
  """Runs the jitted eval step over one pass of batches (the eval split, or cached features).

  Args:
    model: anything with `apply(variables, images, train=False)`.
    num_classes: for the confusion matrix.
    mesh: the device mesh.
    batches: returns a fresh iterable of padded batches with 'mask' per call.
  """

  def __init__(self, model, num_classes: int, mesh: jax.sharding.Mesh, batches: Batches):
    self._mesh = mesh
    self._batches = batches
    repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    self._step = jax.jit(steps.make_eval_step(model, num_classes),
                         in_shardings=(repl, repl, data), out_shardings=repl)

  def __call__(self, params: PyTree, batch_stats: PyTree) -> dict[str, Any]:
    totals, probabilities = None, []
    for batch in self._batches():
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
           is_main: bool) -> dict[str, Any]:
  """Logs an evaluation with its confusion matrix; process 0 writes WORKDIR/eval.json."""
  out = {'step': step, 'loss': result['loss'], 'accuracy': result['accuracy'],
         'count': result['count'], 'class_names': list(class_names),
         'confusion': np.asarray(result['confusion']).tolist()}
  logging.info('Evaluation at step %d on %d images: loss %.4f, accuracy %.4f\n'
               'Confusion matrix (rows: true class, columns: predicted):\n%s', step,
               result['count'], result['loss'], result['accuracy'],
               metrics_lib.format_confusion(result['confusion'], class_names))
  if is_main:
    try:
      workdir_lib.write_eval(workdir, out)
    except Exception as e:  # pylint: disable=broad-except  # OSError here, other types on gs://
      # The results are printed above; a read-only workdir should not turn them into a failure.
      logging.warning('Could not write %s/%s (%s: %s); the results above are not saved.',
                      workdir, workdir_lib.EVAL_FILE, type(e).__name__, e)
  return out


# Eval and predict may run beside a training run, which deletes older checkpoints as it writes
# new ones: a checkpoint deleted while it is read is read again as the newest, a few times.
_READ_ATTEMPTS = 3


def _finished_steps(workdir: str) -> set[int]:
  path = epath.Path(workdir_lib.checkpoint_dir(workdir))
  return {int(p.name) for p in path.iterdir() if p.name.isdigit()} if path.is_dir() else set()


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          which: str = 'latest'):
  """(mesh, model, state, class names, step) of the latest or best checkpoint in `workdir`.

  'latest' is the newest checkpoint that reads whole (damaged ones are skipped with a warning);
  a damaged 'best' is an error. A checkpoint that a training run beside this one deletes
  while it is read (its retention) is read again.
  """
  for _ in range(_READ_ATTEMPTS - 1):
    before = _finished_steps(workdir)
    try:
      return _restore_for_inference(config, workdir, which)
    except errors.DataNotFoundError:
      raise             # no checkpoint at all
    except Exception:  # pylint: disable=broad-except  # a vanished file fails in many ways
      time.sleep(0.5)   # a deletion under way
      gone = sorted(before - _finished_steps(workdir))
      if not gone:
        raise           # no checkpoint went away: the error is the checkpoint's own
      logging.warning('A training run deleted checkpoint(s) %s while they were read; reading '
                      'the %s one again.', gone, which)
  return _restore_for_inference(config, workdir, which)


def _restore_for_inference(config: ml_collections.ConfigDict, workdir: str, which: str):
  checkpointing.quiet_orbax()
  mesh = sharding.make_mesh()
  phases = phases_lib.make_phases(config)

  def restore(ckpts, step):
    class_names = ckpts.info(step).get('class_names')
    model = classifier.create_model(config, len(class_names))
    if step == 0:   # weights only (an import): any config's phases fit them
      state = state_lib.restore_variables(ckpts, step, model, config, mesh)
    else:
      phase = state_lib.saved_phase(ckpts, step, phases)
      setup = phases_lib.setup(config, phase,
                               state_lib.abstract_variables(model, config)['params'])
      state, _ = state_lib.restore(ckpts, step, model, config, setup, mesh)
    return model, state, class_names

  with checkpointing.Checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True) as ckpts:
    steps = ckpts.all_steps()
    if not steps:
      raise errors.DataNotFoundError(
          f'No finished checkpoint in {ckpts.directory}: train first.')
    if which == 'best':
      step = ckpts.best_step()
      try:
        model, state, class_names = restore(ckpts, step)
      except errors.CheckpointDamagedError as e:
        raise errors.CheckpointDamagedError(
            f'{e} It is the best one (--checkpoint=best); --checkpoint=latest uses the newest '
            'checkpoint that can be read.') from None
    else:
      step, (model, state, class_names) = ckpts.newest_intact(lambda s: restore(ckpts, s))
    if step == max(steps) or which == 'best':
      logging.info('Using the checkpoint of step %d (%s) in %s.', step, which, ckpts.directory)
    else:
      logging.warning('Using the checkpoint of step %d in %s, the newest that can be read (the '
                      'latest, step %d, is damaged).', step, ckpts.directory, max(steps))
  return mesh, model, state, class_names, step


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint: str = 'latest') -> dict[str, Any]:
  """Evaluates the latest (or 'best') checkpoint in `workdir` on config.data.eval_split.

  Prints loss, accuracy and the confusion matrix; writes WORKDIR/eval.json and, beside it, the
  pictures of hhjax.pictures (confusion matrix, misclassified images).
  """
  config_checks.validate(config)
  workdir_lib.check_inference_config(config, workdir)
  sharding.check_batch_size(eval_batch_size(config), 'config.eval_batch_size')
  mesh, model, state, class_names, step = restore_for_inference(config, workdir, checkpoint)
  evaluator = Evaluator(model, len(class_names), mesh, eval_batches(config))
  result = evaluator(state['params'], state['batch_stats'])
  is_main = jax.process_index() == 0
  out = report(result, class_names, step, workdir_lib.absolute(workdir), is_main)
  pictures.write_eval_pictures(config, result, class_names, step, workdir_lib.absolute(workdir),
                               is_main=is_main)
  return out

