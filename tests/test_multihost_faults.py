"""Faults that every process of a multi-process run meets alike end every process alike.

main.py as 2 processes over a loopback coordinator (as tests/test_multihost.py starts them), on
the smoke config's synthetic data: processes started with different configs refuse before any
work, a NaN loss met 2 s later by process 1 and a full disk on process 1 end both processes
with the same one-line error and exit status 2, in bounded time. Apart from test_multihost.py,
so that pytest-xdist runs the two files side by side.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

from hhjax import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEER_TIMEOUT_S = 10


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# Runs `setup`, then main.py in the same process (so that what `setup` changed stays).
_RUN_MAIN_AFTER = '''
import runpy, sys
sys.path.insert(0, {root!r})
{{setup}}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''.format(root=str(ROOT))

# A slower host: its error comes 2 s after process 0's.
_SLOW_ERROR = '''
import time
from hhjax import train
_check_finite = train._check_finite
def slow(*args):
  try:
    _check_finite(*args)
  except Exception:
    time.sleep(2)
    raise
train._check_finite = slow
'''


def _pair(tmp_path, name, args, extra=((), ()), setup=(None, None), timeout=240,
          cwd=(ROOT, ROOT)):
  """main.py as 2 processes on the smoke config's synthetic data; `extra[i]`: process i's own
  arguments, `setup[i]`: Python code run in process i before main.py (a fault to inject),
  `cwd[i]`: its working directory (a host of its own). Returns (exit statuses, logs, seconds
  until both ended)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', HHJAX_MALLOC_TUNING='off',
             HHJAX_PEER_TIMEOUT_S=str(PEER_TIMEOUT_S), JAX_NUM_PROCESSES='2',
             JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'cache'))
  env.pop('XLA_FLAGS', None)
  logs = [tmp_path / f'{name}.{i}.err' for i in range(2)]
  procs = []
  start = time.monotonic()
  for i in range(2):
    with open(logs[i], 'w') as err:
      wrapper = [] if setup[i] is None else ['-c', _RUN_MAIN_AFTER.format(setup=setup[i])]
      procs.append(subprocess.Popen(
          [sys.executable, *wrapper, str(ROOT / 'main.py'), f'--workdir={tmp_path / name}',
           f'--config={ROOT / "configs" / "smoke.py"}', *args, *extra[i]],
          env=dict(env, JAX_PROCESS_ID=str(i)), cwd=cwd[i], stdout=subprocess.DEVNULL,
          stderr=err))
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs], [l.read_text() for l in logs], time.monotonic() - start


def _one_line_error(log):
  assert 'Traceback' not in log and len(re.findall('^error: ', log, re.MULTILINE)) == 1, log[-3000:]
  message = log[log.rindex('error: '):].strip()
  assert '\n' not in message, message
  return message


def test_processes_started_with_different_configs_refuse_alike_before_any_work(tmp_path):
  codes, logs, seconds = _pair(tmp_path, 'differ', ['--config.warmup.epochs=1'],
                               extra=((), ('--config.finetune.learning_rate=0.01',
                                           '--config.data.fake.num_train_examples=40')))
  assert codes == [errors.EXIT_USER_ERROR] * 2, [log[-2000:] for log in logs]
  messages = [_one_line_error(log) for log in logs]
  assert messages[0] == messages[1]
  assert messages[0].startswith('error: The 2 processes of this run were not started alike: ')
  assert 'config.finetune.learning_rate: 0.001 on process 0, 0.01 on process 1' in messages[0]
  assert 'config.data.fake.num_train_examples: 32 on process 0, 40 on process 1' in messages[0]
  assert 'training images' not in logs[0]   # before the data is read
  assert not (tmp_path / 'differ' / 'checkpoints').exists()
  print(f'both processes refused in {seconds:.1f} s')


def _image_folder(root: pathlib.Path, per_class: int) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for split in ('train', 'test'):
    for c, name in enumerate(('horses', 'humans')):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(per_class):
        Image.new('RGB', (24, 24), (40 + 150 * c, 60 + i, 90)).save(folder / f'{i}.png')


def test_hosts_whose_copies_of_the_data_folder_differ_refuse_alike(tmp_path):
  # The same command on two hosts, each reading its own copy of data/ (a relative data.dir
  # from its own working directory): the config agrees, one copy holds an extra image.
  hosts = [tmp_path / 'host0', tmp_path / 'host1']
  _image_folder(hosts[0] / 'data', 4)
  _image_folder(hosts[1] / 'data', 4)
  (hosts[1] / 'data' / 'train' / 'horses' / '3.png').rename(
      hosts[1] / 'data' / 'train' / 'horses' / 'extra.png')
  codes, logs, _ = _pair(tmp_path, 'data', ['--config.data.source=folder',
                                            '--config.data.dir=data',
                                            '--config.data.validation_split=test',
                                            '--config.data.test_split=None'], cwd=hosts)
  assert codes == [errors.EXIT_USER_ERROR] * 2, [log[-2000:] for log in logs]
  messages = [_one_line_error(log) for log in logs]
  assert messages[0] == messages[1]
  # The renamed file keeps the count and the bytes: only the names tell the copies apart.
  assert messages[0].startswith(
      'error: The 2 processes of this run list other files in data/train: process 1 lists 8 '
      'files of '), messages[0]
  assert '(other names or sizes). Give every host the same copy of the data' in messages[0]
  assert not (tmp_path / 'data' / 'checkpoints').exists()


def test_a_nan_loss_in_fine_tuning_ends_every_process_with_exit_2(tmp_path):
  # Process 0 runs the coordination service: it used to end first, and process 1, slower to
  # meet the same NaN, then died in JAX of a C++ check failure (SIGABRT) or ended with 4.
  codes, logs, _ = _pair(tmp_path, 'nan', [
      '--config.warmup.epochs=0', '--config.finetune.learning_rate=1e38',
      '--config.steps_per_epoch=3', '--config.checkpoint_every_steps=1',
      '--config.log_every_steps=1'], setup=(None, _SLOW_ERROR))
  assert codes == [errors.EXIT_USER_ERROR] * 2, [log[-2000:] for log in logs]
  for log in logs:
    message = _one_line_error(log)
    assert 'The training loss became NaN or infinite at step' in message
    assert '(phase finetune)' in message and 'config.finetune.learning_rate' in message


# Process 1's disk refuses the checkpoints' array files (>500 KB): RLIMIT_FSIZE fails writes as
# a full disk does (test_checkpoint_faults.py), here in one process of two.
_FULL_DISK = '''
import resource
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
'''


def test_a_full_disk_on_one_process_of_two_stops_both_with_exit_2(tmp_path):
  # The processes used to wait forever in two different barriers of orbax, all alive.
  codes, logs, seconds = _pair(tmp_path, 'full', [
      '--config.checkpoint_every_steps=2', '--config.log_every_steps=1'],
      setup=(None, _FULL_DISK), timeout=180)
  assert codes == [errors.EXIT_USER_ERROR] * 2, [log[-2000:] for log in logs]
  messages = [_one_line_error(log) for log in logs]
  assert messages[0] == messages[1]
  assert messages[0].startswith(f'error: Saving the checkpoint of step 2 in '
                                f'{tmp_path}/full/checkpoints failed: File too large (errno 27)')
  assert 'on process 1 of 2. Training stopped' in messages[0]
  print(f'both processes stopped in {seconds:.1f} s')
