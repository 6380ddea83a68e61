"""hhjax command line: train, evaluate, predict and preview data.

    python main.py --config=configs/smoke.py --workdir=/tmp/hhjax/smoke            # train + eval
    python main.py --workdir=/tmp/hhjax/smoke --mode=eval --split=test              # evaluate
    python main.py --workdir=/tmp/hhjax/smoke --mode=predict --images=DIR_OR_GLOB   # classify
    python main.py --workdir=/tmp/hhjax/smoke --mode=explain --images=DIR_OR_GLOB   # Grad-CAM
    python main.py --config=configs/default.py --workdir=W --mode=preview_data      # see inputs
    python main.py --mode=import_keras --keras_model=model.h5 --workdir=W           # from Keras
    python main.py --workdir=W --mode=export --format=keras|saved_model             # to Keras, TF

Running the same train command again resumes from the last checkpoint in --workdir. For eval,
predict, explain and export, --config is optional: the config the run saved in the workdir is
used (an import without it starts from configs/default.py).

Exit status: 0 done; 1 a bug (with its traceback); 2 a mistake to fix (`error: ...`); 3
preempted (SIGTERM): a checkpoint was saved, run the same command to resume; 4 another process
of a multi-process run was lost: run the same command on every host to resume.
"""

import contextlib
import os
import re
import signal
import sys


# The terminal's stderr, kept apart: the start-up can hold file descriptor 2 back for a while
# (hhjax.compat.quiet_native_start_up), and a SIGTERM's line must not be held back with it.
_STDERR_FD = os.dup(2)


def _sigterm_outside_training(signum, frame) -> None:
  """SIGTERM before training's own handler is in place (start-up) or after it (the end).

  Nothing is lost then: no step has run since the last checkpoint. One line and exit status 3,
  which the runbooks relaunch, as after a preemption's checkpoint; without this handler the
  process died of the signal (status 143), which they treat as final.
  """
  del signum, frame
  sys.stderr.flush()
  os.write(_STDERR_FD, b'preempted (SIGTERM) outside the training steps, while starting or '
           b'finishing: no step was lost; run the same command to resume\n')
  os._exit(3)   # errors.EXIT_PREEMPTED; nothing to clean up that the system does not release


if __name__ == '__main__':
  # First, before seconds of imports. glibc reads the malloc settings that spare XLA:CPU a page
  # fault per page of every step's buffers (hhjax/host_malloc.py; HHJAX_MALLOC_TUNING=off to
  # skip) only when a process starts, so main.py re-executes itself with them, before it
  # imports anything the second process would import again. A SIGTERM that comes while it
  # does (host_malloc blocks it across the exec) is delivered here, once unblocked.
  signal.signal(signal.SIGTERM, _sigterm_outside_training)
  from hhjax import host_malloc  # pylint: disable=g-import-not-at-top
  host_malloc.reexec_with_tunables()
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})

# TensorFlow feeds the input pipeline on the host only: keep it off the accelerators.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

# Light modules only: the library loads after the config has been checked.
from hhjax import compat
from hhjax import config_checks
from hhjax import errors
from hhjax import peers
from hhjax import workdir as workdir_lib
from hhjax import workdir_lock
from hhjax.data import spec as data_spec

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'preview_data', 'explain',
                                     'import_keras', 'export'],
                  'What to do.')
flags.DEFINE_multi_string('images', [],
                          'For --mode=predict and --mode=explain: image files, folders or globs.')
flags.DEFINE_string('checkpoint', 'latest',
                    'For eval, predict, explain and export: the latest checkpoint, the best by '
                    'validation accuracy (of equals, the latest), or a step number.')
flags.DEFINE_string('split', 'validation',
                    "For --mode=eval: 'validation' (the split that chose), 'test', 'train', or "
                    'an image folder whose subfolders are the classes. Results go to '
                    'WORKDIR/eval/<split>-step_<step>.json and the folder of that name.')
flags.DEFINE_enum('bad_files', None, list(data_spec.BAD_FILES),
                  'Sets config.data.bad_files (what to do with files that are not readable '
                  "images: 'error' or 'skip'), also where the config comes from the workdir.")
flags.DEFINE_bool('allow_data_change', False,
                  'For --mode=train: resume although the training files changed since the run '
                  'started (WORKDIR/data_listing.json); without it such a resume is refused.')
flags.DEFINE_string('keras_model', None,
                    'For --mode=import_keras: a Keras classifier file (.h5 or .keras).')
flags.DEFINE_enum('format', None, ['keras', 'saved_model'],
                  'For --mode=export: Keras files (.keras and .h5) or a TensorFlow SavedModel.')
flags.DEFINE_string('export_dir', None, 'For --mode=export: where to write (WORKDIR/export).')


_NONE_OVERRIDE = re.compile(r'--config\.([\w.]+)=(?:none|null)', re.IGNORECASE)
NONE_OVERRIDES: list[str] = []   # the field paths set to None on the command line


def split_none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Takes `--config.a.b=None` out of `argv`; returns (the other arguments, ['a.b', ...]).

  The flag parser reads 'None' as the string 'None' for str fields and rejects it for int
  fields, while the configs document None as a value (steps_per_epoch, eval_batch_size,
  data.dir, early_stopping.metric, ...): these overrides are applied after parsing instead.
  """
  rest, paths = [], []
  for arg in argv:
    match = _NONE_OVERRIDE.fullmatch(arg)
    if match:
      paths.append(match.group(1))
    else:
      rest.append(arg)
  return rest, paths


def set_none(config: ml_collections.ConfigDict, paths: list[str]) -> None:
  """Sets each '.'-joined field path of `config` to None; only fields that can be None."""
  for path in paths:
    *parents, name = path.split('.')
    node = config
    try:
      for key in parents:
        node = node[key]
      fields = dict(node.items(preserve_field_references=True))
    except (KeyError, AttributeError):
      fields = {}
    if name not in fields:
      raise app.UsageError(f'--config.{path}=None: the config has no field {path!r}.')
    value = fields[name]
    if value is not None and not isinstance(value, ml_collections.FieldReference):
      raise app.UsageError(f'--config.{path}=None: this field needs a value (it is '
                           f'{value!r} in the config file); None is only for optional fields.')
    node[name] = None


def _run(mode: str, config: ml_collections.ConfigDict) -> None:
  """Runs `mode` once the config has been checked."""
  # The libraries' start-up lines that are not about this run are left out, unless
  # --verbosity=1 or more asks for everything.
  quiet = FLAGS.verbosity < 1
  if quiet:
    compat.quiet_libraries()
  with compat.quiet_native_start_up() if quiet else contextlib.nullcontext():
    # TensorFlow feeds the input pipeline on the host only: hidden from the accelerators
    # before anything uses it. Without the Keras its import would load (seconds).
    with compat.without_keras_preload():
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')
  # Before anything compiles: executables an earlier run compiled are read from disk.
  from hhjax import compilation  # pylint: disable=g-import-not-at-top
  compilation.use_persistent_cache()
  # The library loads only now (seconds of JAX and TensorFlow imports), so that mistakes in the
  # command line and the config are reported at once.
  _initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() > 0:
    # Progress and results once, from process 0; the others say only what goes wrong.
    logging.set_verbosity(logging.WARNING)
  ok = False
  try:
    from hhjax import agreement  # pylint: disable=g-import-not-at-top
    agreement.check_processes_agree(mode, config, {'checkpoint': FLAGS.checkpoint,
                                                   'images': FLAGS.images,
                                                   'split': FLAGS.split})
    _run_mode(mode, config)
    ok = True
  except errors.Preempted:
    ok = True   # every process stops at the same step
    raise
  except Exception as e:  # pylint: disable=broad-except
    if peers.is_peer_failure(e):
      peers.exit_peer_failure(e)   # one line and exit status 4, without waiting for the others
    if mode == 'train':   # an image that changed in place since its check: name it
      from hhjax import entry  # pylint: disable=g-import-not-at-top
      from hhjax.data import sources  # pylint: disable=g-import-not-at-top
      changed = sources.changed_file_error(entry.data(config), e)
      if changed is not None:
        raise changed from None
    raise
  finally:
    peers.finish(ok)


def _initialize_distributed() -> None:
  """jax.distributed when this process is one of several; then JAX's SIGTERM handler alone.

  JAX's preemption service installs its own handler, in C++; a Python handler left in place
  (`_sigterm_outside_training`) would be reset to the default action by Python as it shuts
  down, over JAX's, and a repeated SIGTERM would then kill the process (status 143) after its
  checkpoint. SIGTERM is held blocked meanwhile, so that one sent in between reaches JAX's.
  """
  from hhjax import sharding  # pylint: disable=g-import-not-at-top
  blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
  try:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sharding.maybe_initialize_distributed()
  finally:
    import jax  # pylint: disable=g-import-not-at-top
    if not jax.distributed.is_initialized():
      signal.signal(signal.SIGTERM, _sigterm_outside_training)
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _run_mode(mode: str, config: ml_collections.ConfigDict) -> None:
  if mode == 'train':
    from hhjax import data_listing  # pylint: disable=g-import-not-at-top
    from hhjax import train  # pylint: disable=g-import-not-at-top
    data_listing.check_training_data(config, FLAGS.workdir, FLAGS.allow_data_change)
    train.train_and_evaluate(config, FLAGS.workdir)
  elif mode == 'eval':
    from hhjax import evaluate  # pylint: disable=g-import-not-at-top
    evaluate.evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint, split=FLAGS.split)
  elif mode == 'predict':
    from hhjax import predict  # pylint: disable=g-import-not-at-top
    predict.predict(config, FLAGS.workdir, FLAGS.images, checkpoint=FLAGS.checkpoint)
  elif mode == 'explain':
    from hhjax import explain  # pylint: disable=g-import-not-at-top
    explain.explain(config, FLAGS.workdir, FLAGS.images, checkpoint=FLAGS.checkpoint)
  elif mode == 'preview_data':
    from hhjax import preview  # pylint: disable=g-import-not-at-top
    path = preview.preview_data(config, FLAGS.workdir)
    logging.info('Wrote %s', path)
    print(path)
  elif mode == 'import_keras':
    from hhjax import import_keras  # pylint: disable=g-import-not-at-top
    import_keras.import_keras(FLAGS.keras_model, FLAGS.workdir, config,
                              data_class_names=FLAGS.config is not None)
  elif mode == 'export':
    from hhjax import export  # pylint: disable=g-import-not-at-top
    for path in export.export(config, FLAGS.workdir, FLAGS.format, FLAGS.export_dir,
                              checkpoint=FLAGS.checkpoint):
      print(path)


def _config_without_flag(mode: str) -> ml_collections.ConfigDict:
  """Without --config: the config the workdir saved; an import starts from the default one."""
  if mode == 'import_keras':
    from configs import default  # pylint: disable=g-import-not-at-top
    return default.get_config()
  return workdir_lib.load_config(FLAGS.workdir)


def _preempted(error: errors.Preempted) -> None:
  """Ends the program after a preemption's checkpoint: one line, exit status 3."""
  logging.flush()
  print(error, file=sys.stderr, flush=True)
  sys.exit(errors.EXIT_PREEMPTED)


def _exit_without_teardown(code) -> None:
  """Ends the process as Python would (`code` as sys.exit takes it), less its final teardown.

  Non-daemon threads are joined and the atexit callbacks run (JAX's among them: the
  distributed shutdown barrier), the streams are flushed; then the process ends, without the
  interpreter's final collection and module teardown, which takes seconds once TensorFlow and
  JAX are loaded (5-6 s on a busy 2-core machine; process 0 of several, which ends last, made
  the others' end look late by as much). Everything the run writes is closed by then.
  """
  import atexit  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  if code is None:
    status = 0
  elif isinstance(code, int):
    status = code
  else:   # sys.exit('message'): printed, status 1
    print(code, file=sys.stderr)
    status = 1
  threading._shutdown()   # pylint: disable=protected-access  # what Python's exit does first
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  logging.flush()
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(status)   # pylint: disable=protected-access


def _fail(message) -> None:
  """Ends the program for a mistake the user can fix: the message alone, exit status 2."""
  logging.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
  peers.end_failed(errors.EXIT_USER_ERROR)   # several processes: no wait for the others
  sys.exit(errors.EXIT_USER_ERROR)


def _innermost_text(error: BaseException) -> str:
  """The message inside config_flags's wrapping (an AttributeError around a KeyError)."""
  text = error
  while isinstance(text, BaseException) and text.args:
    text = text.args[0]
  return str(text)


def unknown_field_message(error: BaseException, argv: list[str]) -> str:
  """One line for an override of a field the config lacks: the flag, the field, the hint.

  config_flags reports `--config.batch_siz=4` as an AttributeError around a KeyError whose text
  is `'batch_siz'` and, on the next line, ml_collections's `Did you mean "batch_size" ...?`.
  """
  name, *hints = _innermost_text(error).splitlines()
  name = name.strip().strip('\'"')
  flag = next((arg.split('=', 1)[0] for arg in argv
               if arg.startswith('--config.') and name in arg.split('=', 1)[0].split('.')),
              f'--config.{name}')
  hint = ' '.join(h.strip() for h in hints if h.strip())
  return (f'{flag}: the config has no field {name!r}.{" " + hint if hint else ""} The fields '
          'are those of the --config file.')


def _config_given(argv: list[str]) -> bool:
  return any(arg == '--config' or arg.startswith('--config=') for arg in argv[1:])


def flag_error_message(error: flags.Error, argv: list[str]) -> str:
  """One line for absl's flag errors; an override without --config says what it needs."""
  match = re.search(r"Unknown command line flag '(config\.[\w.]+)'", str(error))
  if match and not _config_given(argv):
    return (f'--{match.group(1)}: a --config.FIELD=VALUE override needs --config=FILE.py '
            'before it, the config it changes (e.g. --config=configs/default.py, what '
            '--mode=import_keras starts from without one).')
  return f"{str(error).rstrip('.')}. Run with --helpfull to list the flags."


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors reported as one line and exit status 2."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(flag_error_message(e, argv))
  except (AttributeError, KeyError) as e:   # config_flags: a field the config lacks (a
    _fail(unknown_field_message(e, argv))     # section's name: a KeyError)


def _check_command_line(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None and FLAGS.mode in ('train', 'preview_data'):
    raise app.UsageError(f'--mode={FLAGS.mode} needs --config=configs/....py')
  if FLAGS.mode in ('predict', 'explain') and not FLAGS.images:
    raise app.UsageError(f'--mode={FLAGS.mode} needs --images=FILE_FOLDER_OR_GLOB (repeatable).')
  if FLAGS.mode == 'import_keras' and not FLAGS.keras_model:
    raise app.UsageError('--mode=import_keras needs --keras_model=FILE (.h5 or .keras).')
  if FLAGS.mode == 'export' and not FLAGS.format:
    raise app.UsageError('--mode=export needs --format=keras or --format=saved_model.')
  if NONE_OVERRIDES and FLAGS.config is None:
    raise app.UsageError(f'--config.{NONE_OVERRIDES[0]}=None needs --config=configs/....py')
  if FLAGS.checkpoint not in ('latest', 'best') and not FLAGS.checkpoint.isdigit():
    raise app.UsageError(f'--checkpoint={FLAGS.checkpoint!r}: must be latest, best or a step '
                         'number (e.g. 160).')
  workdir_lib.check_workdir_flag(FLAGS.workdir)


def main(argv):
  logging.info('GLIBC_TUNABLES=%s', os.environ.get('GLIBC_TUNABLES', '(unset)'))
  try:
    _check_command_line(argv)
    if FLAGS.config is not None:
      set_none(FLAGS.config, NONE_OVERRIDES)
    workdir_lib.check_reachable(FLAGS.workdir)
    config = FLAGS.config if FLAGS.config is not None else _config_without_flag(FLAGS.mode)
    if FLAGS.bad_files is not None:
      config.data.bad_files = FLAGS.bad_files
    config_checks.validate(config)
    if FLAGS.mode == 'train':   # refuse a busy workdir before seconds of imports
      workdir_lock.check_free(workdir_lib.absolute(FLAGS.workdir))
    _run(FLAGS.mode, config)
  except errors.Preempted as e:
    _preempted(e)
  except (errors.UserError, app.UsageError) as e:
    # Something the user can fix: the message alone says what and how; no traceback.
    _fail(e)


if __name__ == '__main__':
  sys.argv, NONE_OVERRIDES = split_none_overrides(sys.argv)
  flags.mark_flags_as_required(['workdir'])
  try:
    app.run(main, flags_parser=_parse_flags)
  except SystemExit as e:   # every end but a bug's traceback
    _exit_without_teardown(e.code)
