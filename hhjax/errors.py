"""The errors a user can cause, as one family.

Everything a user can fix (a bad config value, a missing or unreadable file, a checkpoint that
does not fit, weights that cannot be downloaded, a loss that became NaN) raises a subclass of
`UserError`. `main.py` prints such an error as its message alone and exits with status 2;
anything else is a bug and keeps its traceback.

Each subclass also derives from the built-in exception a caller would expect (`ValueError`,
`FileNotFoundError`, ...), so library code can catch either.
"""

# The exit statuses of `main.py` besides 0 (done) and 1 (a bug: a traceback). A launcher that
# relaunches after a preemption (tools/cloud_tpu.sh, a SLURM script) tells them apart.
# A UserError: fix what the message says, then run again.
EXIT_USER_ERROR = 2
# Training stopped on SIGTERM (a preemption notice) at a step boundary, after saving a checkpoint
# there: the same command resumes with no step lost.
EXIT_PREEMPTED = 3
# Another process of a multi-process run was lost (killed, crashed, its host gone): this one
# stopped rather than wait in a collective. The same command on every host resumes from the last
# checkpoint.
EXIT_PEER_LOST = 4


class UserError(Exception):
  """Something the user can fix; the message says what was expected, found, and what to do."""


class ConfigError(UserError, ValueError):
  """A config field has a value outside its allowed set or range."""


class DataError(UserError, ValueError):
  """The data cannot be used as given: a bad layout, unreadable images, an empty split."""


class DataNotFoundError(UserError, FileNotFoundError):
  """A file or folder the run needs does not exist."""


class OutputExistsError(UserError, FileExistsError):
  """A file or folder a command would create exists already; it is never overwritten."""


class StorageUnreachableError(UserError, OSError):
  """A remote workdir (gs://...) cannot be reached: no network, no credentials, no bucket."""


class OutputNotWritableError(UserError, OSError):
  """A folder a command writes into cannot be created or written (read-only, not a folder)."""


class CheckpointMismatchError(UserError, ValueError):
  """A checkpoint does not fit the state the current config builds."""


class CheckpointDamagedError(UserError, OSError):
  """A checkpoint cannot be read whole: a file is missing, truncated or corrupt."""


class CheckpointSaveError(UserError, OSError):
  """A checkpoint could not be written (a full disk, a read-only folder, ...)."""


class KerasWeightsError(UserError, ValueError):
  """A file that does not hold Keras weights of the expected backbone, or cannot be read."""


class WeightsDownloadError(UserError, RuntimeError):
  """The official weights could not be downloaded or did not verify."""


class DatasetDownloadError(UserError, RuntimeError):
  """A TFDS dataset could not be downloaded or prepared."""


class NonFiniteLossError(UserError, RuntimeError):
  """The training loss became NaN or infinite."""


class WorkdirBusyError(UserError, RuntimeError):
  """Another training run holds the workdir (hhjax.workdir_lock)."""


class MissingPackageError(UserError, ImportError):
  """An optional package a command needs is not installed."""


class Preempted(Exception):
  """Training stopped on SIGTERM after checkpointing its current step (not a failure).

  main.py prints the message and exits with EXIT_PREEMPTED.
  """

  def __init__(self, step: int):
    self.step = step
    super().__init__(f'preempted at step {step}; checkpoint saved; run the same command to '
                     'resume')
