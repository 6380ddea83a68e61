"""Evaluation: loss, accuracy and the confusion matrix over one pass of the eval split.

    python main.py --workdir=W --mode=eval [--checkpoint=best]

The same `Evaluator` runs at the end of every training epoch and in `--mode=eval`.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hhjax import checkpointing
from hhjax import config_checks
from hhjax import errors
from hhjax import metrics as metrics_lib
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax.data import pipeline
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
      dataset = pipeline.create_dataset(config, config.data.eval_split)
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
    totals = None
    for batch in self._batches():
      out = self._step(params, batch_stats, sharding.to_global(batch, self._mesh))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
      raise errors.DataError('The evaluation split yielded no batches: it holds no images.')
    totals = jax.device_get(totals)
    count = float(totals['count'])
    return {'loss': float(totals['loss_sum']) / count,
            'accuracy': float(totals['correct']) / count,
            'count': int(count),
            'confusion': np.asarray(totals['confusion']).round().astype(int)}


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
    workdir_lib.write_eval(workdir, out)
  return out


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          which: str = 'latest'):
  """(mesh, model, state, class names, step) of the latest or best checkpoint in `workdir`."""
  checkpointing.quiet_orbax()
  mesh = sharding.make_mesh()
  with checkpointing.Checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True) as ckpts:
    step = ckpts.best_step() if which == 'best' else ckpts.latest_step()
    if step is None:
      raise errors.DataNotFoundError(
          f'No finished checkpoint in {ckpts.directory}: train first.')
    class_names = ckpts.info(step).get('class_names')
    model = classifier.create_model(config, len(class_names))
    if step == 0:   # weights only (an import): any config's phases fit them
      state = state_lib.restore_variables(ckpts, step, model, config, mesh)
    else:
      phase = state_lib.saved_phase(ckpts, step, phases_lib.make_phases(config))
      setup = phases_lib.setup(config, phase,
                               state_lib.abstract_variables(model, config)['params'])
      state, _ = state_lib.restore(ckpts, step, model, config, setup, mesh)
  return mesh, model, state, class_names, step


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint: str = 'latest') -> dict[str, Any]:
  """Evaluates the latest (or 'best') checkpoint in `workdir` on config.data.eval_split.

  Prints loss, accuracy and the confusion matrix; writes WORKDIR/eval.json.
  """
  config_checks.validate(config)
  sharding.check_batch_size(eval_batch_size(config), 'config.eval_batch_size')
  mesh, model, state, class_names, step = restore_for_inference(config, workdir, checkpoint)
  evaluator = Evaluator(model, len(class_names), mesh, eval_batches(config))
  result = evaluator(state['params'], state['batch_stats'])
  return report(result, class_names, step, workdir_lib.absolute(workdir),
                jax.process_index() == 0)

