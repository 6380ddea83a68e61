"""Checkpoints of the training state: one small wrapper around orbax's CheckpointManager.

A checkpoint holds one item, `state` (a pytree of arrays: step, params, batch_stats, optimizer
state, RNG, running metrics), plus JSON metadata (phase, step, the resolved config) and, at the
end of an epoch, the validation metrics that rank checkpoints. Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a process killed during a save leaves no
checkpoint that `latest_step` would return; the leftover temporary directory is removed when the
next run opens the workdir.

Retention: the last `keep` checkpoints, plus the best one by validation accuracy, plus the one
step `keep_also` names (the best epoch of a phase whose early stopping restores best weights).

Faults: a checkpoint that cannot be read whole (a file missing or truncated) raises
CheckpointDamagedError, and `newest_intact` falls back to the one before; nothing is deleted,
except a damaged checkpoint whose step a resumed run computes again. A save that fails (a full
disk, a read-only folder) raises CheckpointSaveError at the next `check_saved`, `save` or
`wait`, with the step, the path and the OS error.

What this takes from orbax's and TensorStore's insides (their log lines, their error texts, the
manager's preemption calls) is in hhjax.compat.
"""

from collections.abc import Callable, Mapping
import contextlib
import dataclasses
import json
import os
import threading
from typing import Any, TypeVar

from absl import logging as absl_logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from hhjax import compat
from hhjax import errors
from hhjax import trees

BEST_METRIC = 'val_accuracy'
# Orbax's name for the JSON metadata of a step (phase, progress, config): read only as JSON.
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'

T = TypeVar('T')


def _best_fn(metrics: Mapping[str, float]) -> float:
  return float(metrics[BEST_METRIC])


@dataclasses.dataclass
class _KeptSteps:
  """An orbax preservation policy: keeps the steps in `steps`, a set its owner changes."""
  steps: set[int] = dataclasses.field(default_factory=set)

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [info.step in self.steps for info in checkpoints]


# With several processes, a process whose background write failed says so under this key of the
# coordination service's key-value store (see `Checkpoints._wait_for_save`).
_FAILED_SAVE_KEY = 'hhjax/checkpoint_failed/'


class Checkpoints:
  """Saves and restores the training state in `directory` (usually WORKDIR/checkpoints)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, read_only: bool = False,
               async_save: bool = True):
    self.directory = os.fspath(directory)
    if read_only and not epath.Path(self.directory).is_dir():
      raise errors.DataNotFoundError(f'No checkpoints at {self.directory}: train first '
                              '(python main.py --config=... --workdir=...).')
    policy = None
    self._kept = _KeptSteps()
    if not read_only:
      policy = ocp.checkpoint_managers.AnyPreservationPolicy([
          ocp.checkpoint_managers.LatestN(n=max(1, keep)),
          ocp.checkpoint_managers.BestN(get_metric_fn=_best_fn, reverse=False, n=1,
                                        keep_checkpoints_without_metrics=False),
          self._kept,
      ])
    options = ocp.CheckpointManagerOptions(
        best_fn=_best_fn, best_mode='max', preservation_policy=policy,
        # Unfinished saves of a killed run: remove them, never restore them.
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
        # The step's directory is made before `save` returns, so that a folder that cannot be
        # written fails there; made in the background, the failure left orbax's other save
        # threads waiting for it until their timeout, and the process could not exit.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=not read_only)
    # Without orbax's calls to the preemption sync point: hhjax.preemption makes them.
    self._manager = compat.checkpoint_manager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler()})
    self._damaged: dict[int, str] = {}   # step -> what is wrong, as found by this process
    self._pending: int | None = None      # the step of a save that may still be running

  def all_steps(self) -> list[int]:
    """Every finished checkpoint in the folder, damaged ones included."""
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest checkpoint not found damaged."""
    steps = [s for s in self._manager.all_steps() if s not in self._damaged]
    return max(steps) if steps else None

  def best_step(self) -> int | None:
    """The step with the best validation accuracy (the latest when none has metrics)."""
    return self._manager.best_step()

  def keep_also(self, step: int | None) -> None:
    """Keeps `step`'s checkpoint from deletion from the next save on (None: no extra one)."""
    self._kept.steps.clear()
    if step is not None:
      self._kept.steps.add(int(step))

  def save(self, step: int, state: Any, info: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Saves `state` at `step` with JSON `info`; `metrics` (with 'val_accuracy') rank it.

    The arrays are written in the background. Raises CheckpointSaveError if the previous save
    failed or this one cannot start.
    """
    self._finish_pending()   # orbax waits for it anyway; here its error names its own step
    if step in self._damaged and step in self._manager.all_steps():
      self._remove_damaged(step)
    try:
      self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
          metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()},
          custom_metadata=dict(info), force=True)
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._raise_save_error(step, e)
      raise
    self._pending = step

  def check_saved(self) -> None:
    """Raises CheckpointSaveError if the last save has failed; never waits for a running one.

    Cheap enough for every step: a failed save then stops training one step later.
    """
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish_pending()

  def _finish_pending(self) -> None:
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self._wait_for_save(step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      self._raise_save_error(step, e)
      raise

  def _wait_for_save(self, step: int) -> None:
    """orbax's wait_until_finished; with several processes, bounded by a failure on any one.

    A process whose write failed says so in the coordination service's key-value store; every
    process waits for the save or for such a word, whichever comes first, and raises
    CheckpointSaveError naming the process and its OS error. Without it the processes waited
    forever in two different barriers of orbax, all alive, so hhjax.peers saw nothing wrong.
    """
    from hhjax import peers  # pylint: disable=g-import-not-at-top
    store = peers.key_value_store() if jax.process_count() > 1 else None
    if store is None:
      self._manager.wait_until_finished()
      return
    outcome = []
    def wait():
      try:
        self._manager.wait_until_finished()
        outcome.append(None)
      except Exception as e:  # pylint: disable=broad-exception-caught
        outcome.append(e)
    waiter = threading.Thread(target=wait, name='checkpoint-wait', daemon=True)
    waiter.start()
    told = False
    while True:
      waiter.join(0.1)
      if outcome:
        if outcome[0] is not None:
          raise outcome[0]
        return
      failures = compat.background_save_failures()
      if failures and not told:
        with contextlib.suppress(Exception):   # the store may be gone: report it here anyway
          store.key_value_set(f'{_FAILED_SAVE_KEY}{step}/{jax.process_index()}',
                              failures[0], allow_overwrite=True)
        told = True
      try:
        failed = sorted(store.key_value_dir_get(f'{_FAILED_SAVE_KEY}{step}/'))
      except Exception:  # pylint: disable=broad-exception-caught  # hhjax.peers reports it
        failed = []
      if failed:
        key, cause = failed[0]
        process = key.rsplit('/', 1)[-1]
        raise self._save_error(step, f'{cause}, on process {process} of {jax.process_count()}')

  def _save_error(self, step: int, cause: str) -> errors.CheckpointSaveError:
    """The one message of a checkpoint write the storage refused (`cause`)."""
    kept = self.latest_step()
    kept = (f'the checkpoints before it are intact (latest: step {kept})' if kept is not None
            and kept != step else 'no earlier checkpoint was written')
    return errors.CheckpointSaveError(
        f'Saving the checkpoint of step {step} in {self.directory} failed: {cause}. Training '
        f'stopped; {kept}. Free space or make the folder writable, then run the same command '
        'again to resume.')

  def _raise_save_error(self, step: int, error: Exception) -> None:
    """CheckpointSaveError when the storage refused the write; a bug keeps its own error."""
    cause = compat.storage_error(error)
    if cause is None:
      return
    raise self._save_error(step, cause) from error

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(step)

  def _remove_damaged(self, step: int) -> None:
    """Makes room for `step` computed again, in place of its damaged checkpoint."""
    absl_logging.warning('Overwriting the damaged checkpoint of step %d in %s (%s) with the '
                         'same step computed again.', step, self.directory, self._damaged[step])
    if jax.process_index() == 0:
      self._step_dir(step).rmtree()   # epath: local folders and gs:// alike
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'hhjax_overwrite_damaged_{step}')
    self._manager.reload()
    del self._damaged[step]

  def _damage(self, step: int, what: str) -> errors.CheckpointDamagedError:
    self._damaged[step] = what
    return errors.CheckpointDamagedError(
        f'The checkpoint of step {step} in {self.directory} cannot be read: {what}.')

  def info(self, step: int) -> dict[str, Any]:
    """The JSON metadata saved with `step`; CheckpointDamagedError if it cannot be read."""
    path = self._step_dir(step) / STEP_METADATA_FILE
    try:
      custom = json.loads(path.read_text()).get('custom_metadata')
    except FileNotFoundError:
      raise self._damage(step, f'its metadata file {STEP_METADATA_FILE} is missing') from None
    except (OSError, ValueError, AttributeError) as e:
      raise self._damage(step, f'its metadata file {STEP_METADATA_FILE} is not readable '
                         f'JSON ({e})') from None
    if not isinstance(custom, dict):
      raise self._damage(step, f'its metadata file {STEP_METADATA_FILE} holds no metadata')
    # Read here rather than through orbax's step metadata, which opens the arrays too.
    return custom

  def newest_intact(self, restore_one: Callable[[int], T]) -> tuple[int, T]:
    """(step, restore_one(step)) for the newest checkpoint that restores whole.

    A damaged one (CheckpointDamagedError from `restore_one`) is reported in one warning and
    skipped, and left in place; any other error (a config that does not fit) is raised.
    """
    damaged = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return step, restore_one(step)
      except errors.CheckpointDamagedError as e:
        absl_logging.warning('%s It is left in place; trying the checkpoint before it.', e)
        damaged.append(step)
    if not damaged:
      raise errors.DataNotFoundError(f'No finished checkpoint in {self.directory}.')
    raise errors.CheckpointDamagedError(
        f'No checkpoint in {self.directory} can be read whole (steps {damaged} are damaged, '
        'see the warnings above); nothing was deleted. Put back intact copies, or move the '
        'folder away to start afresh.')

  def check_fits(self, step: int, abstract_state: Any, hint: str = '') -> None:
    """Raises CheckpointMismatchError unless the saved arrays match `abstract_state` exactly.

    CheckpointDamagedError if the checkpoint's description of its arrays cannot be read.
    """
    try:
      metadata = self._manager.item_metadata(step)['state']
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._damage(step, f'its array metadata cannot be read ({compat.one_line(e)})') from e
    if metadata is None:
      raise self._damage(step, 'its array metadata (state/_METADATA) is missing')
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
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    # Missing or truncated array files surface as orbax's bare Exception around TensorStore's
    # ValueError (or as FileNotFoundError, KeyError): any error of this one call means the
    # files, since check_fits has matched the structure already.
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._damage(step, compat.one_line(e)) from e
    return restored['state']

  def restore_arrays(self, step: int) -> Any:
    """The arrays saved at `step` as saved (dicts and lists), without a target structure."""
    return self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']

  def wait(self) -> None:
    """Blocks until pending saves are on disk; CheckpointSaveError if one failed."""
    self._finish_pending()

  def close(self) -> None:
    self._finish_pending()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
