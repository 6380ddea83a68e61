"""Faults in and around the checkpoints, injected through files and processes: each run ends
with its cause in one line, fast, and every checkpoint before the fault restores unchanged.

One smoke run (one warm-up phase of 2 epochs x 3 steps, checkpoints at steps 2, 3, 4 and 6) is
shared by the module; each test damages its own copy and runs main.py on it.
"""

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hhjax import checkpointing
from hhjax import entry
from hhjax import errors
from hhjax import predict
from hhjax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ['--config.steps_per_epoch=3', '--config.warmup.epochs=2', '--config.finetune.epochs=0',
         '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=10',
         '--config.log_every_steps=1']
STEPS = [2, 3, 4, 6]   # what the shared run leaves
METADATA = checkpointing.STEP_METADATA_FILE


def _exec_after(setup, *args):
  """A command that runs the Python code `setup`, then becomes `python ARGS` in that process."""
  return [sys.executable, '-c', f'import os, sys\n{setup}\n'
          'os.execv(sys.executable, [sys.executable] + sys.argv[1:])', *args]


def _main(*args, env, cwd=ROOT, setup=None):
  """Runs main.py; `setup` is Python run first in the child's own process (a fault to inject).

  Returns:
    (the finished process, its wall time in seconds, seconds from the 'Resuming' log line to
    the exit or None).
  """
  command = ([sys.executable, str(ROOT / 'main.py'), *args] if setup is None else
             _exec_after(setup, str(ROOT / 'main.py'), *args))
  start, resumed = time.monotonic(), None
  proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    err = []
    for line in proc.stderr:
      err.append(line)
      if resumed is None and 'Resuming from step' in line:
        resumed = time.monotonic()
    out = proc.stdout.read()
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  end = time.monotonic()
  proc.stdout, proc.stderr = out, ''.join(err)
  return proc, end - start, None if resumed is None else end - resumed


def _assert_one_line_error(proc, *needles):
  """Exit status 2 and one line `error: ...` holding every needle; no traceback anywhere."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1 and proc.stderr.rstrip().endswith(lines[0]), proc.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


def _warnings(proc, needle):
  return [line for line in proc.stderr.splitlines() if line.startswith('W') and needle in line]


def _arrays(workdir, step):
  with checkpointing.Checkpoints(workdir / 'checkpoints', read_only=True) as ckpts:
    return jax.tree_util.tree_flatten_with_path(ckpts.restore_arrays(step))[0]


def _assert_same_checkpoints(workdir, reference, steps):
  """Each of `steps` in `workdir` restores bit-identical to the same step of `reference`."""
  for step in steps:
    want, got = _arrays(reference, step), dict(_arrays(workdir, step))
    assert len(want) == len(got) > 0
    for path, value in want:
      np.testing.assert_array_equal(got[path], value,
                                    err_msg=f'step {step} {jax.tree_util.keystr(path)}')


def _assert_same_arrays(directory, step, want):
  with checkpointing.Checkpoints(directory, read_only=True) as ckpts:
    got = ckpts.restore_arrays(step)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value)


def _array_file(workdir, step):
  """The largest array data file of a checkpoint."""
  files = (workdir / 'checkpoints' / str(step) / 'state').rglob('d/*')
  return max((f for f in files if f.is_file()), key=lambda f: f.stat().st_size)


@pytest.fixture(scope='module')
def env(jax_cache_dir):
  # Without main.py's re-execution for glibc's malloc settings (a second per run here; tested
  # in test_host_malloc.py), which the faults do not depend on.
  env = dict(os.environ, JAX_PLATFORMS='cpu', HHJAX_MALLOC_TUNING='off',
             JAX_COMPILATION_CACHE_DIR=str(jax_cache_dir))
  env.pop('XLA_FLAGS', None)
  return env


@pytest.fixture(scope='module')
def trained(tmp_path_factory, env):
  """The shared run's workdir; tests copy it, never change it."""
  workdir = tmp_path_factory.mktemp('trained') / 'run'
  proc, _, _ = _main('--config=configs/smoke.py', f'--workdir={workdir}', *FLAGS, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == STEPS
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  copy = tmp_path / 'run'
  shutil.copytree(trained, copy)
  return copy


def _train(workdir, env, setup=None):
  return _main('--config=configs/smoke.py', f'--workdir={workdir}', *FLAGS, env=env,
               setup=setup)


# ------------------------------------------------------------------------ damaged checkpoints


def test_training_resumes_from_the_newest_intact_checkpoint_past_a_truncated_one(
    workdir, trained, env):
  array_file = _array_file(workdir, 6)
  os.truncate(array_file, 1000)
  proc, seconds, _ = _train(workdir, env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  damaged = _warnings(proc, 'cannot be read')
  assert len(damaged) == 1 and 'step 6 in ' in damaged[0], damaged
  assert len(_warnings(proc, 'Resuming from step 4')) == 1
  # The run reached step 6 again and replaced the damaged checkpoint, saying so.
  assert len(_warnings(proc, 'Overwriting the damaged checkpoint of step 6')) == 1
  assert seconds < 60
  _assert_same_checkpoints(workdir, trained, STEPS)   # step 6 recomputed exactly


def test_eval_skips_checkpoints_with_a_deleted_array_file_metadata_or_manifest(
    workdir, trained, env):
  _array_file(workdir, 6).unlink()
  (workdir / 'checkpoints' / '4' / METADATA).unlink()
  (workdir / 'checkpoints' / '3' / 'state' / 'manifest.ocdbt').unlink()   # the arrays' index
  proc, seconds, _ = _main('--mode=eval', f'--workdir={workdir}', env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  damaged = _warnings(proc, 'cannot be read')
  assert len(damaged) == 3, damaged
  assert 'step 6 in ' in damaged[0]
  assert 'step 4 in ' in damaged[1] and f'{METADATA} is missing' in damaged[1]
  assert 'step 3 in ' in damaged[2] and 'array metadata cannot be read' in damaged[2]
  assert len(_warnings(proc, 'Using the checkpoint of step 2')) == 1
  assert json.loads((workdir / 'eval' / 'validation-step_000002.json').read_text())['step'] == 2
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == STEPS  # all kept
  assert seconds < 60
  _assert_same_checkpoints(workdir, trained, [2])


def test_a_damaged_best_checkpoint_is_an_error_naming_it(workdir):
  with checkpointing.Checkpoints(workdir / 'checkpoints', read_only=True) as ckpts:
    best = ckpts.best_step()
  os.truncate(_array_file(workdir, best), 1000)
  config = workdir_lib.load_config(str(workdir))
  with pytest.raises(errors.CheckpointDamagedError,
                     match=rf'step {best} in .*cannot be read: .*--checkpoint=best') as raised:
    entry.restore_for_inference(config, str(workdir), 'best')
  assert '\n' not in str(raised.value)


def _small_state(width=3):
  return {'step': np.int32(1), 'w': np.ones((width,), np.float32)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_newest_intact_skips_damaged_checkpoints_but_not_one_of_another_config(tmp_path):
  with checkpointing.Checkpoints(tmp_path, async_save=False) as ckpts:
    for step in (1, 2):
      ckpts.save(step, _small_state(), {'step': step})
  (tmp_path / '2' / METADATA).unlink()
  with checkpointing.Checkpoints(tmp_path, read_only=True) as ckpts:
    step, state = ckpts.newest_intact(
        lambda s: (ckpts.info(s), ckpts.restore(s, _abstract(_small_state())))[1])
    assert step == 1 and ckpts.latest_step() == 1
    np.testing.assert_array_equal(state['w'], _small_state()['w'])
    # A checkpoint that does not fit the config is the user's to fix, never skipped.
    with pytest.raises(errors.CheckpointMismatchError):
      ckpts.newest_intact(lambda s: ckpts.restore(s, _abstract(_small_state(width=5))))
  (tmp_path / '1' / METADATA).unlink()
  with checkpointing.Checkpoints(tmp_path, read_only=True) as ckpts:
    with pytest.raises(errors.CheckpointDamagedError,
                       match=r'No checkpoint .* can be read whole \(steps \[2, 1\]'):
      ckpts.newest_intact(ckpts.info)


# ------------------------------------------------------------------------------ failed saves


def _keep_steps_up_to(workdir, last):
  """The workdir as a run killed after saving step `last` leaves it."""
  for step in STEPS:
    if step > last:
      shutil.rmtree(workdir / 'checkpoints' / str(step))


def test_a_save_that_fails_in_the_background_is_found_at_the_next_step_without_waiting(
    tmp_path):
  # Random values: the array file cannot be compressed below the file size limit set below.
  state = {'w': np.random.default_rng(0).random(300_000, dtype=np.float32)}
  with checkpointing.Checkpoints(tmp_path) as ckpts:
    ckpts.save(1, state, {'step': 1})
    ckpts.wait()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))   # see _FULL_DISK below
    try:
      ckpts.save(2, state, {'step': 2})
      longest, deadline = 0.0, time.monotonic() + 30
      with pytest.raises(errors.CheckpointSaveError,
                         match=r'step 2 in .*: File too large \(errno 27\).*latest: step 1'):
        while time.monotonic() < deadline:   # what the training loop does after each step
          start = time.monotonic()
          ckpts.check_saved()
          longest = max(longest, time.monotonic() - start)
          time.sleep(0.005)
    finally:
      resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert longest < 0.1   # never waits for the save
    assert ckpts.latest_step() == 1
  _assert_same_arrays(tmp_path, 1, state)


# As root, write permissions are not checked: the child drops the capabilities that skip the
# check (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) from its bounding set, and so loses them at exec.
_AS_ORDINARY_USER = '''
if os.geteuid() == 0:
  import ctypes
  libc = ctypes.CDLL(None, use_errno=True)
  for cap in (1, 2):
    if libc.prctl(24, cap, 0, 0, 0):   # PR_CAPBSET_DROP
      raise OSError(ctypes.get_errno(), 'prctl(PR_CAPBSET_DROP)')
'''


def test_a_read_only_checkpoints_folder_stops_training_at_once_with_exit_2(
    workdir, trained, env):
  _keep_steps_up_to(workdir, 3)
  ckpt_dir = workdir / 'checkpoints'
  ckpt_dir.chmod(0o555)
  try:
    probe = subprocess.run(   # the same process set-up, then a mkdir that must fail
        _exec_after(_AS_ORDINARY_USER, '-c', 'import os, sys; os.mkdir(sys.argv[1])',
                    str(ckpt_dir / 'probe')), capture_output=True, text=True)
    if probe.returncode == 0 or 'PermissionError' not in probe.stderr:
      pytest.skip(f'cannot make a folder read-only for this process: {probe.stderr[-300:]}')
    proc, seconds, after_resume = _train(workdir, env, setup=_AS_ORDINARY_USER)
  finally:
    ckpt_dir.chmod(0o755)
  _assert_one_line_error(proc, 'step 4', str(ckpt_dir), 'Permission denied (errno 13)')
  assert seconds < 60 and after_resume < 15, (seconds, after_resume)
  _assert_same_checkpoints(workdir, trained, [2, 3])


# The kernel refuses writes past RLIMIT_FSIZE (EFBIG) as a full disk refuses them (ENOSPC),
# without root or a mount: the checkpoints' array files (>500 KB) fail, the logs and the
# metrics (a few KB) do not.
_FULL_DISK = 'import resource; resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))'


def test_a_full_disk_stops_training_with_exit_2_and_keeps_earlier_checkpoints(
    workdir, trained, env):
  _keep_steps_up_to(workdir, 3)
  proc, seconds, after_resume = _train(workdir, env, setup=_FULL_DISK)
  line = _assert_one_line_error(proc, 'step 4', str(workdir / 'checkpoints'),
                                'File too large (errno 27)')
  assert 'latest: step 3' in line
  assert seconds < 60 and after_resume < 15, (seconds, after_resume)
  _assert_same_checkpoints(workdir, trained, [2, 3])


# ------------------------------------------------------------------------- eval and predict


@pytest.fixture
def image(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'bright.png'
  Image.fromarray(np.full((80, 80, 3), 235, np.uint8)).save(path)
  return path


def test_eval_and_predict_work_with_a_relative_workdir(workdir, env, image):
  proc, _, _ = _main('--mode=eval', '--workdir=run', env=env, cwd=workdir.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((workdir / 'eval' / 'validation-step_000006.json').read_text())['step'] == 6
  # A --config that differs only in what does not change the model is accepted.
  proc, _, _ = _main('--mode=predict', '--workdir=run', f'--images={image}',
                     f'--config={ROOT / "configs/smoke.py"}', *FLAGS, '--config.batch_size=2',
                     '--config.data.fake.num_eval_examples=5', env=env, cwd=workdir.parent)
  assert proc.returncode == 0, proc.stderr[-3000:]
  path, label, probability = proc.stdout.strip().split('\t')
  assert path == str(image) and label in ('class_0', 'class_1') and float(probability) >= 0.5


def test_eval_and_predict_refuse_a_config_that_changes_what_the_model_computes(
    workdir, env, image):
  proc, seconds, _ = _main('--mode=eval', f'--workdir={workdir}', '--config=configs/smoke.py',
                           *FLAGS, '--config.data.preprocessing=rescale', env=env)
  _assert_one_line_error(
      proc, "config.data.preprocessing: 'inception' in config.json, 'rescale' given")
  assert seconds < 60
  # predict runs the same check first (through main.py, the same one-line error).
  config = workdir_lib.load_config(str(workdir))
  config.data.image_size, config.model.hidden, config.data.fake.num_classes = 80, 16, 3
  with pytest.raises(errors.ConfigError) as raised:
    predict.predict(config, str(workdir), [str(image)])
  for needle in ('config.data.image_size: 75 in config.json, 80 given',
                 'config.model.hidden: 32 in config.json, 16 given',
                 'config.data.fake.num_classes: 2 in config.json, 3 given'):
    assert needle in str(raised.value)


def test_a_resume_with_another_image_size_is_refused_though_every_array_fits(workdir, env):
  # The smoke head pools globally, so 99 px fits every array of the 75 px checkpoints.
  config_json = (workdir / 'config.json').read_text()
  _keep_steps_up_to(workdir, 4)
  proc, seconds, _ = _main('--config=configs/smoke.py', f'--workdir={workdir}', *FLAGS,
                           '--config.data.image_size=99', env=env)
  _assert_one_line_error(proc, f'The checkpoint in {workdir} was trained with another model',
                         'config.data.image_size: checkpoint 75, now 99')
  assert seconds < 60
  assert (workdir / 'config.json').read_text() == config_json
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()) == [2, 3, 4]
