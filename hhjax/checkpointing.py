"""Checkpoints of the training state: one small wrapper around orbax's CheckpointManager.

A checkpoint holds one item, `state` (a pytree of arrays: step, params, batch_stats, optimizer
state, RNG, running metrics), plus JSON metadata (phase, step, the resolved config) and, at the
end of an epoch, the validation metrics that rank checkpoints. Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a process killed during a save leaves no
checkpoint that `latest_step` would return; the leftover temporary directory is removed when the
next run opens the workdir.

Retention: the last `keep` checkpoints, plus the best one by validation accuracy.
"""

from collections.abc import Mapping
import logging
import os
from typing import Any

from absl import logging as absl_logging
from etils import epath
import orbax.checkpoint as ocp

from hhjax import errors
from hhjax import trees

BEST_METRIC = 'val_accuracy'


def _best_fn(metrics: Mapping[str, float]) -> float:
  return float(metrics[BEST_METRIC])


class _QuietOrbax(logging.Filter):
  """Drops orbax's per-save INFO lines and its warnings about expected situations."""

  _EXPECTED = ('Requested `tracked_metric`', 'CheckpointManagerOptions.read_only=True',
               'Given directory is read only')

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return False
    return not str(record.msg).startswith(self._EXPECTED)


def quiet_orbax() -> None:
  """Keeps the training log readable: orbax logs a dozen lines per checkpoint."""
  for target in (absl_logging.get_absl_handler(), logging.getLogger('absl')):
    if not any(isinstance(f, _QuietOrbax) for f in target.filters):
      target.addFilter(_QuietOrbax())


class Checkpoints:
  """Saves and restores the training state in `directory` (usually WORKDIR/checkpoints)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False,
               async_save: bool = True):
    self.directory = os.fspath(directory)
    if read_only and not epath.Path(self.directory).is_dir():
      raise errors.DataNotFoundError(f'No checkpoints at {self.directory}: train first '
                              '(python main.py --config=... --workdir=...).')
    policy = None
    if not read_only:
      policy = ocp.checkpoint_managers.AnyPreservationPolicy([
          ocp.checkpoint_managers.LatestN(n=max(1, keep)),
          ocp.checkpoint_managers.BestN(get_metric_fn=_best_fn, reverse=False, n=1,
                                        keep_checkpoints_without_metrics=False),
      ])
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_fn, best_mode='max', preservation_policy=policy,
        # Unfinished saves of a killed run: remove them, never restore them.
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        create=not read_only)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best validation accuracy (the latest when none has metrics)."""
    return self._manager.best_step()

  def save(self, step: int, state: Any, info: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Saves `state` at `step` with JSON `info`; `metrics` (with 'val_accuracy') rank it."""
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
        metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
        custom_metadata=dict(info), force=True)

  def info(self, step: int) -> dict[str, Any]:
    """The JSON metadata saved with `step`."""
    return dict(self._manager.metadata(step).custom_metadata or {})

  def check_fits(self, step: int, abstract_state: Any, hint: str = '') -> None:
    """Raises CheckpointMismatchError unless the saved arrays match `abstract_state` exactly."""
    metadata = self._manager.item_metadata(step)['state']
    if metadata is None:
      raise errors.CheckpointMismatchError(
          f'The checkpoint at {self.directory}/{step} has no readable array metadata; it was '
          'not written by this program or is damaged.')
    saved = trees.leaf_specs(metadata.tree if hasattr(metadata, 'tree') else metadata, '.',
                             dtypes=True)
    problem = trees.describe_differences(
        saved, trees.leaf_specs(abstract_state, '.', dtypes=True),
        got_name='the checkpoint', want_name='the config')
    if problem:
      raise errors.CheckpointMismatchError(
          f'The checkpoint at {self.directory}/{step} does not fit the current config.\n'
          f'{hint}{problem}\n'
          'Use the config the checkpoint was written with, or another --workdir.')

  def restore(self, step: int, abstract_state: Any, hint: str = '') -> Any:
    """Restores the state saved at `step` into the structure, shapes and shardings given.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` (with shardings). The whole tree must
    match; anything else is an error, never a partial restore.
    """
    self.check_fits(step, abstract_state, hint)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored['state']

  def restore_arrays(self, step: int) -> Any:
    """The arrays saved at `step` as saved (dicts and lists), without a target structure."""
    return self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
