"""Checkpoints of the training state: one small wrapper around orbax's CheckpointManager.

A checkpoint holds one item, `state` (a pytree of arrays: step, params, batch_stats, optimizer
state, RNG, running metrics), plus JSON metadata (phase, step, the resolved config) and, at the
end of an epoch, the validation metrics that rank checkpoints. Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a process killed during a save leaves no
checkpoint that `latest_step` would return; the leftover temporary directory is removed when the
next run opens the workdir.

Retention: the last `keep` checkpoints, plus the best one by validation accuracy.

Faults: a checkpoint that cannot be read whole (a file missing or truncated) raises
CheckpointDamagedError, and `newest_intact` falls back to the one before; nothing is deleted,
except a damaged checkpoint whose step a resumed run computes again. A save that fails (a full
disk, a read-only folder) raises CheckpointSaveError at the next `check_saved`, `save` or
`wait`, with the step, the path and the OS error.
"""

from collections.abc import Callable, Iterator, Mapping
import contextlib
import json
import logging
import os
import re
import sys
import threading
import traceback
from typing import Any, TypeVar

from absl import logging as absl_logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from hhjax import errors
from hhjax import trees

BEST_METRIC = 'val_accuracy'
# Orbax's name for the JSON metadata of a step (phase, progress, config): read only as JSON.
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'

T = TypeVar('T')


def _best_fn(metrics: Mapping[str, float]) -> float:
  return float(metrics[BEST_METRIC])


# The storage errors of this process's background saves, as orbax logs them: with several
# processes the failing process's save thread logs its error and moves on to a barrier that the
# others, waiting in another barrier for its part, never reach.
_background_failures: list[str] = []
_FAILED_SAVE_KEY = 'hhjax/checkpoint_failed/'


def _note_background_failure(cause: str) -> None:
  if cause not in _background_failures:
    _background_failures.append(cause)


class _QuietOrbax(logging.Filter):
  """Drops orbax's routine lines and the tracebacks of failures `Checkpoints` reports itself.

  Routine: the per-save INFO lines and the warnings about expected situations. Failures: a
  read or write that failed, which `Checkpoints` turns into one line.
  """

  _EXPECTED = ('Requested `tracked_metric`', 'CheckpointManagerOptions.read_only=True',
               'Given directory is read only',
               # A damaged checkpoint: reported in one line by `Checkpoints` when it is used.
               'Metadata file does not exist', 'Failed to json parse Metadata file',
               'Item "state" was found in the checkpoint, but could not be restored')

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name == 'asyncio' and record.exc_info and _from_orbax(record.exc_info[1]):
      # 'Task (or Future) exception was never retrieved': the other arrays of a read or write
      # that failed (the failure itself is reported once, by `Checkpoints`).
      return False
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return False
    if record.exc_info and _os_error(record.exc_info[1]) is not None:
      # A failed write: `Checkpoints` reports it, in one line, as it stops the run. With several
      # processes, orbax's background thread only logs it (see `_wait_for_save`).
      _note_background_failure(_os_error(record.exc_info[1]))
      return False
    return not str(record.msg).startswith(self._EXPECTED)


def _causes(error: BaseException) -> Iterator[BaseException]:
  """`error`, then what caused it, down to the root."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _from_orbax(error: BaseException | None) -> bool:
  """Whether `error` was raised in orbax's code or by TensorStore under it."""
  for cause in _causes(error):
    if any('/orbax/' in f.filename for f in traceback.extract_tb(cause.__traceback__)):
      return True
    if re.search(r"\[(?:tensorstore_spec|source locations|os_error_code)=", str(cause)):
      return True   # TensorStore's errors carry no Python frames, only these suffixes
  return False


def _one_line(error: BaseException) -> str:
  """The root cause of an orbax or TensorStore error as one short line.

  Orbax wraps TensorStore's message (which names the array and the file) in its own, whose
  text is a repr of a spec over many lines.
  """
  root = list(_causes(error))[-1]
  text = (str(root).strip().splitlines() or [type(root).__name__])[0]
  text = re.split(r' \[(?:tensorstore_spec|source locations)=', text)[0]
  return text if len(text) <= 400 else text[:400] + '...'


# TensorStore's status codes of a write that the storage refused, as opposed to a bug.
_STORAGE_STATUS = re.compile(
    r'^(RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS):')


def _os_error(error: BaseException) -> str | None:
  """'No space left on device (errno 28): PATH' when `error` comes from the storage, else None."""
  for cause in _causes(error):
    if isinstance(cause, OSError) and cause.errno:
      where = f': {cause.filename}' if cause.filename else ''
      return f'{cause.strerror} (errno {cause.errno}){where}'
    text = str(cause)
    code = re.search(r"os_error_code='(\d+)'", text)
    if code:
      path = re.search(r'local file "([^"]+)"', text)
      where = f': {path.group(1)}' if path else ''
      return f'{os.strerror(int(code.group(1)))} (errno {code.group(1)}){where}'
    if _STORAGE_STATUS.match(text):
      return _one_line(cause)
  return None


class _QuietClosedLoops:
  """Drops the unraisable tracebacks that the other arrays of a failed save or restore leave.

  When one array of a save or restore fails, orbax stops waiting and closes its event loop;
  the other arrays' reads or writes finish later, and Python prints each late callback as an
  unraisable 'Event loop is closed' traceback. The reads left suspended are closed when they are
  collected, and orbax's read coroutine turns that close into an exception of its own, which
  Python prints too. The failure itself is reported once, by `Checkpoints`.
  """

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    error = unraisable.exc_value
    frames = traceback.extract_tb(unraisable.exc_traceback)
    if (isinstance(error, RuntimeError) and str(error) == 'Event loop is closed' and
        any(f.name == 'call_soon_threadsafe' for f in frames)):
      return
    code = getattr(unraisable.object, 'cr_code', None)   # a coroutine being collected
    if code is not None and '/orbax/' in code.co_filename:
      return
    self.previous(unraisable)


def quiet_orbax() -> None:
  """Keeps the training log readable: orbax logs a dozen lines per checkpoint."""
  # The asyncio logger itself too: a task of a failed read collected at exit, after the
  # handlers are gone, is printed by logging's last-resort handler, which no handler filter sees.
  for target in (absl_logging.get_absl_handler(), logging.getLogger('absl'),
                 logging.getLogger('asyncio')):
    if not any(isinstance(f, _QuietOrbax) for f in target.filters):
      target.addFilter(_QuietOrbax())
  if not isinstance(sys.unraisablehook, _QuietClosedLoops):
    sys.unraisablehook = _QuietClosedLoops(sys.unraisablehook)


class _Manager(ocp.CheckpointManager):
  """Orbax's CheckpointManager without its calls to JAX's preemption sync point.

  The training loop makes those calls itself, one per step (hhjax.preemption); orbax would add
  its own with each saved step, some from its background thread, and JAX's count would go back.
  """

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


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
        # The step's directory is made before `save` returns, so that a folder that cannot be
        # written fails there; made in the background, the failure left orbax's other save
        # threads waiting for it until their timeout, and the process could not exit.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        create=not read_only)
    self._manager = _Manager(
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
      if _background_failures and not told:
        with contextlib.suppress(Exception):   # the store may be gone: report it here anyway
          store.key_value_set(f'{_FAILED_SAVE_KEY}{step}/{jax.process_index()}',
                              _background_failures[0], allow_overwrite=True)
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
    kept = self.latest_step()
    kept = (f'the checkpoints before it are intact (latest: step {kept})' if kept is not None
            and kept != step else 'no earlier checkpoint was written')
    return errors.CheckpointSaveError(
        f'Saving the checkpoint of step {step} in {self.directory} failed: {cause}. Training '
        f'stopped; {kept}. Free space or make the folder writable, then run the same command '
        'again to resume.')

  def _raise_save_error(self, step: int, error: Exception) -> None:
    """CheckpointSaveError when the storage refused the write; a bug keeps its own error."""
    cause = _os_error(error)
    if cause is None:
      return
    kept = self.latest_step()
    kept = (f'the checkpoints before it are intact (latest: step {kept})' if kept is not None
            and kept != step else 'no earlier checkpoint was written')
    raise errors.CheckpointSaveError(
        f'Saving the checkpoint of step {step} in {self.directory} failed: {cause}. Training '
        f'stopped; {kept}. Free space or make the folder writable, then run the same command '
        'again to resume.') from error

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
      raise self._damage(step, f'its array metadata cannot be read ({_one_line(e)})') from e
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
      raise self._damage(step, _one_line(e)) from e
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
