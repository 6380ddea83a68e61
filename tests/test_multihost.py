"""Several processes train as one; preemption and lost processes cost no work. main.py processes.

Two stories share their runs (module fixtures), on real images (a few per class, copied from the
shared folder so that every launch stays short), one epoch of fine-tuning:

  * One process with 2 (fake CPU) devices, uninterrupted: the reference. The same run SIGTERMed
    mid-epoch, the signal repeated every 20 ms until it exits (its save included), exits with
    status 3 after checkpointing the step it reached; run again, it ends bit-identical to the
    reference.
  * Two processes (jax.distributed over 127.0.0.1, 1 CPU device each), uninterrupted: every array
    equals the one-process reference within 1e-5, and the files a run writes come once, from
    process 0, with the reference's content; eval and predict read its workdir as one process.
    The same run, interrupted three times and run again after each, ends bit-identical to it:
    SIGTERM to both (repeated; exit 3), SIGKILL to both, SIGKILL to process 1 (process 0 stops at
    once, in one line, with exit status 4: its collective fails).

A process that hangs rather than dies (SIGSTOP: its sockets stay open, its heartbeats stop) is
found by hhjax.peers within HHJAX_PEER_TIMEOUT_S; that is checked with processes that only run
collectives, which start in seconds.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from hhjax import errors
from hhjax import evaluate
from hhjax import predict
from hhjax import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH, EPOCHS = 48, 1
LAST_STEP = STEPS_PER_EPOCH * EPOCHS
PEER_TIMEOUT_S = 10
PER_CLASS = {'train': 12, 'validation': 4}
PREEMPTED = re.compile(r'^preempted at step (\d+); checkpoint saved; run the same command to '
                       r'resume$', re.MULTILINE)
PROGRESS = re.compile(rf'finetune epoch \d+/{EPOCHS} step (\d+)/{LAST_STEP} ')


def _flags(data_dir):
  # Fine-tuning only, BatchNorm statistics too: batch statistics over the global batch, whose
  # halves come from different processes. A checkpoint at each epoch's end only.
  return ['--config=configs/smoke.py', '--config.data.source=folder',
          f'--config.data.dir={data_dir}', '--config.data.validation_split=validation',
          '--config.data.test_split=None',
          '--config.data.num_parallel_calls=1', '--config.batch_size=4',
          '--config.eval_batch_size=4', f'--config.steps_per_epoch={STEPS_PER_EPOCH}',
          '--config.warmup.epochs=0', f'--config.finetune.epochs={EPOCHS}',
          '--config.finetune.unfreeze_from=mixed0', '--config.finetune.train_bn=True',
          '--config.finetune.learning_rate=1e-3', '--config.model.hidden=8',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=0',
          '--config.keep_checkpoints=10']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class _Launch:
  """One run of main.py as 1 process (2 devices) or as 2 processes; logs go to files."""

  def __init__(self, ctx, workdir, processes, *args, name):
    self.logs = [ctx.logs / f'{name}.{i}.err' for i in range(processes)]
    port = _free_port()
    self.procs = []
    for i in range(processes):
      env = dict(ctx.env)
      if processes == 1:
        env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
      else:
        env.update(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES=str(processes),
                   JAX_PROCESS_ID=str(i))
      with open(self.logs[i], 'w') as err:
        self.procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / 'main.py'), f'--workdir={workdir}', *args], env=env,
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err))

  def log(self, i=0) -> str:
    return self.logs[i].read_text()

  def last_step(self) -> int:
    steps = PROGRESS.findall(self.log(0))
    return int(steps[-1]) if steps else 0

  def wait_for_step(self, step):
    self.wait_until(lambda: self.last_step() >= step, f'step {step}')

  def wait_until(self, condition, what, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
      if any(p.poll() is not None for p in self.procs):
        raise AssertionError(f'A process ended before {what}:\n{self.log(0)[-3000:]}')
      if time.monotonic() > deadline:
        raise AssertionError(f'Timed out waiting for {what}.')
      time.sleep(0.02)

  def signal_until_exit(self, signum, every=0.02):
    """Sends `signum` to every process, again every `every` s, until all have ended."""
    while any(p.poll() is None for p in self.procs):
      for p in self.procs:
        if p.poll() is None:
          p.send_signal(signum)
      time.sleep(every)

  def finish(self, timeout=300) -> list[int]:
    try:
      for p in self.procs:
        p.wait(timeout=timeout)
    finally:
      self.kill()
    return [p.returncode for p in self.procs]

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()


class _Context:

  def __init__(self, tmp, data_dir):
    self.tmp, self.data_dir = tmp, data_dir
    self.logs = tmp / 'logs'
    self.logs.mkdir()
    self.env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(tmp / 'cache'),
                    HHJAX_MALLOC_TUNING='off', HHJAX_PEER_TIMEOUT_S=str(PEER_TIMEOUT_S))
    for name in ('XLA_FLAGS', 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
      self.env.pop(name, None)
    self.flags = _flags(data_dir)

  def launch(self, workdir, processes, *args, name):
    return _Launch(self, workdir, processes, *(args or self.flags), name=name)

  def run(self, workdir, processes, *args, name):
    launch = self.launch(workdir, processes, *args, name=name)
    codes = launch.finish()
    assert codes == [0] * processes, launch.log(0)[-3000:]
    return launch


@pytest.fixture(scope='module')
def ctx(tmp_path_factory, real_data_dir):
  tmp = tmp_path_factory.mktemp('multihost')
  data = tmp / 'horse-or-human'
  for split, count in PER_CLASS.items():
    for cls in ('horses', 'humans'):
      (data / split / cls).mkdir(parents=True)
      for path in sorted((real_data_dir / split / cls).iterdir())[:count]:
        shutil.copy(path, data / split / cls / path.name)
  return _Context(tmp, data)


@pytest.fixture(scope='module')
def one(ctx):
  """(workdir, launch) of the uninterrupted one-process run with 2 devices."""
  workdir = ctx.tmp / 'one'
  return workdir, ctx.run(workdir, 1, name='one')


@pytest.fixture(scope='module')
def two(ctx, one):   # after `one`: its compilations are not shared, but the machine is
  """(workdir, launch) of the uninterrupted two-process run."""
  workdir = ctx.tmp / 'two'
  return workdir, ctx.run(workdir, 2, name='two')


def _checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _state(workdir, step=LAST_STEP):
  """Every array of a checkpoint, as numpy (whatever the devices it was saved from)."""
  path = workdir / 'checkpoints' / str(step) / 'state'
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata
    tree = getattr(tree, 'tree', tree)
    state = checkpointer.restore(path, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def _rows(workdir):
  return [{k: v for k, v in json.loads(line).items() if k != 'time'}
          for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def _tensorboard(workdir):
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  files = sorted((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  points = []
  for path in files:
    for record in tf.data.TFRecordDataset(str(path)):
      event = event_pb2.Event.FromString(record.numpy())
      points += [(v.tag, event.step, tf.make_ndarray(v.tensor).tolist())
                 for v in event.summary.value]   # a list for the hparams' empty tensor
  return len(files), sorted(points)


def _assert_bit_identical(got, want):
  assert got.keys() == want.keys() and got
  for key, value in want.items():   # params, batch stats, optimizer state, RNG, step, metrics
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def _preempted_step(launch, codes):
  """The step both processes say they stopped at, checked against the log: no step lost."""
  assert codes == [errors.EXIT_PREEMPTED] * len(codes), launch.log(0)[-3000:]
  said = {int(s) for i in range(len(codes)) for s in PREEMPTED.findall(launch.log(i))}
  assert len(said) == 1, [launch.log(i)[-500:] for i in range(len(codes))]
  step = said.pop()
  # The last step computed is the one saved (the first step of a run logs no progress line).
  assert step == (launch.last_step() or 1)
  return step


# ----------------------------------------------------------------------------- 2 processes = 1


def test_two_processes_train_as_one_process_with_two_devices(one, two):
  want, got = _state(one[0]), _state(two[0])
  assert got.keys() == want.keys()
  worst = max(float(np.max(np.abs(got[k] - want[k]))) / max(float(np.max(np.abs(want[k]))),
                                                                 1e-30)
              for k in want if want[k].size)
  print(f'worst relative difference, 2 processes vs 1: {worst:.3g}')
  for key in want:   # every parameter and BatchNorm statistic, and the optimizer state
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)


def test_files_come_once_from_process_zero_as_one_process_writes_them(one, two):
  (one_dir, _), (two_dir, launch) = one, two
  assert _rows(two_dir) == _rows(one_dir) and len(_rows(one_dir)) == EPOCHS
  for name in ('config.json', 'eval.json'):
    assert (two_dir / name).read_bytes() == (one_dir / name).read_bytes(), name
  for name in ('loss.png', 'accuracy.png'):   # the same curves, each titled with its workdir
    with Image.open(two_dir / name) as two_png, Image.open(one_dir / name) as one_png:
      assert two_png.size == one_png.size, name
  files_two, points_two = _tensorboard(two_dir)
  assert files_two == 1   # one writer, process 0's
  assert points_two == _tensorboard(one_dir)[1]
  assert 'Wrote ' not in launch.log(1)


def test_progress_and_results_are_logged_by_process_zero_only(two):
  _, launch = two
  first, other = launch.log(0), launch.log(1)
  assert PROGRESS.search(first) and f'Epoch {EPOCHS} (finetune) done' in first
  assert 'Evaluation at step' in first
  assert not PROGRESS.search(other) and 'Epoch ' not in other and 'Evaluation' not in other
  assert 'Process 1 of 2' in other   # the start-up line says which process it is


def test_eval_and_predict_read_a_two_process_workdir_as_one_process(ctx, two):
  # In this (one-device) process, through what main.py's --mode=eval and --mode=predict call.
  workdir = ctx.tmp / 'two_copy'   # eval writes into the workdir: keep the run's as it was
  shutil.copytree(two[0], workdir)
  config = workdir_lib.load_config(str(workdir))
  result = evaluate.evaluate(config, str(workdir))
  saved = json.loads((two[0] / 'eval.json').read_text())
  assert result['confusion'] == saved['confusion'] and result['count'] == saved['count']
  np.testing.assert_allclose(result['loss'], saved['loss'], rtol=1e-5)
  lines = predict.predict(config, str(workdir), [str(ctx.data_dir / 'validation')])
  assert len(lines) == 2 * PER_CLASS['validation']
  assert all(cls in ('horses', 'humans') and 0.5 <= p <= 1 for _, cls, p in lines)


# ----------------------------------------------------------------------------- preemption


def test_sigterm_to_one_process_checkpoints_its_step_and_resumes_bit_identical(ctx, one):
  workdir = ctx.tmp / 'one_preempted'
  launch = ctx.launch(workdir, 1, name='one_preempted')
  launch.wait_for_step(1)
  launch.signal_until_exit(signal.SIGTERM)   # the first stops it; the others hit the save
  step = _preempted_step(launch, [p.returncode for p in launch.procs])
  assert 1 <= step < LAST_STEP and _checkpoint_steps(workdir) == [step]   # none was planned

  resumed = ctx.run(workdir, 1, name='one_resumed')
  assert f'Resuming from step {step} ' in resumed.log(0)
  _assert_bit_identical(_state(workdir), _state(one[0]))
  assert _rows(workdir) == _rows(one[0])


def test_two_processes_preempted_killed_and_losing_one_end_bit_identical(ctx, two):
  workdir = ctx.tmp / 'two_interrupted'
  # 1. SIGTERM to both, repeated until they exit: both stop at one step and checkpoint it. Sent
  # as the phase starts: the processes agree on the step through JAX's coordination service,
  # which takes a second or two, when the steps may be quick.
  launch = ctx.launch(workdir, 2, name='two_preempted')
  launch.wait_until(lambda: 'Phase finetune' in launch.log(0), 'the phase')
  launch.signal_until_exit(signal.SIGTERM)
  step = _preempted_step(launch, [p.returncode for p in launch.procs])
  assert 1 <= step < LAST_STEP - 4 and _checkpoint_steps(workdir) == [step]
  print(f'SIGTERM at the phase start: both processes stopped at step {step} and saved it')

  # 2. Resumed there, then both SIGKILLed two steps on.
  launch = ctx.launch(workdir, 2, name='two_killed')
  launch.wait_for_step(step + 2)
  assert f'Resuming from step {step} ' in launch.log(0)
  launch.kill()
  assert _checkpoint_steps(workdir) == [step]

  # 3. Process 1 SIGKILLed: process 0's collective fails, and it stops in one line, exit 4.
  launch = ctx.launch(workdir, 2, name='two_one_killed')
  launch.wait_for_step(step + 2)
  start = time.monotonic()
  launch.procs[1].kill()
  try:
    launch.procs[0].wait(timeout=PEER_TIMEOUT_S + 60)
  finally:
    seconds = time.monotonic() - start
    launch.kill()
  print(f'process 0 stopped {seconds:.1f} s after process 1 was killed')
  _assert_lost_in_one_line(launch.procs[0].returncode, launch.log(0))
  assert seconds < PEER_TIMEOUT_S

  # 4. Run to the end: the same arrays and rows as the uninterrupted run.
  ctx.run(workdir, 2, name='two_resumed')
  _assert_bit_identical(_state(workdir), _state(two[0]))
  assert _rows(workdir) == _rows(two[0])


def _assert_lost_in_one_line(code, log):
  assert code == errors.EXIT_PEER_LOST, log[-3000:]
  assert 'Traceback' not in log and len(re.findall('^error: ', log, re.MULTILINE)) == 1
  message = log[log.rindex('error: '):].strip()
  assert '\n' not in message and 'run the same command on every host' in message
  return message


# ----------------------------------------------------------------------------- a hung process

# Two processes that run collectives forever, as training does between its steps.
COLLECTIVES = r'''
import sys
sys.path.insert(0, sys.argv[1])
from hhjax import sharding
sharding.maybe_initialize_distributed()
from jax.experimental import multihost_utils
import numpy as np
print('ready', flush=True)
while True:
  multihost_utils.process_allgather(np.zeros(1, np.float32))
'''


def test_a_hung_process_is_found_within_the_peer_timeout(tmp_path):
  """SIGSTOP to process 1 of one pair, to process 0 (the coordinator) of another, at once: the
  other process of each ends in one line, with exit status 4, within the timeout."""
  timeout = 5
  pairs = []
  for frozen in (1, 0):
    env = dict(os.environ, JAX_PLATFORMS='cpu', HHJAX_PEER_TIMEOUT_S=str(timeout),
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}', JAX_NUM_PROCESSES='2')
    env.pop('XLA_FLAGS', None)
    logs = [tmp_path / f'{frozen}.{i}.err' for i in range(2)]
    procs = []
    for i in range(2):
      with open(logs[i], 'w') as err:
        procs.append(subprocess.Popen(
            [sys.executable, '-c', COLLECTIVES, str(ROOT)], env=dict(env, JAX_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE, stderr=err, text=True))
    pairs.append((frozen, procs, logs))
  try:
    for _, procs, _ in pairs:
      for p in procs:
        assert p.stdout.readline().strip() == 'ready'
    time.sleep(1)
    start = time.monotonic()
    for frozen, procs, _ in pairs:
      procs[frozen].send_signal(signal.SIGSTOP)
    seconds = {}
    for frozen, procs, _ in pairs:
      procs[1 - frozen].wait(timeout=timeout + 60)
      seconds[frozen] = time.monotonic() - start
  finally:
    for _, procs, _ in pairs:
      for p in procs:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()
  print(f'seconds for the other process to stop, by the one that hung: {seconds}')
  for frozen, procs, logs in pairs:
    message = _assert_lost_in_one_line(procs[1 - frozen].returncode,
                                       logs[1 - frozen].read_text())
    assert ('Process 1 of 2 has sent no heartbeat for 5 s' if frozen else
            'The coordination service (run by process 0) has not answered for 5 s') in message
    assert timeout <= seconds[frozen] < timeout + 5


# ----------------------------------------------------------------------------- ending apart

# Two processes that end their work apart: process 0 works on (as it writes a run's results
# alone) for `late` seconds after the last collective, then both end as main.py ends them.
ENDING = r'''
import sys, time
sys.path.insert(0, sys.argv[1])
from hhjax import peers
from hhjax import sharding
sharding.maybe_initialize_distributed()
import jax
from jax.experimental import multihost_utils
import numpy as np
print('ready', flush=True)
multihost_utils.process_allgather(np.zeros(1, np.float32))
if jax.process_index() == 0:
  time.sleep(float(sys.argv[2]))
peers.finish(True)
print('finished', flush=True)
'''


def test_a_process_done_first_waits_for_the_others_instead_of_aborting_at_exit(tmp_path):
  """Process 0 ends its work well past JAX's shutdown-barrier timeout (2 * timeout + 1 s) after
  process 1: both exit 0 (JAX would abort both at its barrier). In a second pair process 0
  hangs meanwhile (SIGSTOP): process 1, waiting for it, stops in one line with exit status 4."""
  timeout, late = 2, 7
  pairs = {}
  for name in ('late', 'hung'):
    env = dict(os.environ, JAX_PLATFORMS='cpu', HHJAX_PEER_TIMEOUT_S=str(timeout),
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{_free_port()}', JAX_NUM_PROCESSES='2')
    env.pop('XLA_FLAGS', None)
    logs = [tmp_path / f'{name}.{i}.err' for i in range(2)]
    procs = []
    for i in range(2):
      with open(logs[i], 'w') as err:
        procs.append(subprocess.Popen(
            [sys.executable, '-c', ENDING, str(ROOT), str(late)],
            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=err, text=True))
    pairs[name] = procs, logs
  try:
    for procs, _ in pairs.values():
      for p in procs:
        assert p.stdout.readline().strip() == 'ready'
    hung = pairs['hung'][0]
    time.sleep(1)
    assert hung[1].poll() is None   # process 1 waits for process 0 to end its work
    hung[0].send_signal(signal.SIGSTOP)
    hung[1].wait(timeout=timeout + 60)
    for p in pairs['late'][0]:
      p.wait(timeout=late + 60)
  finally:
    for procs, _ in pairs.values():
      for p in procs:
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()
  procs, logs = pairs['late']
  assert [p.returncode for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]
  assert all(p.stdout.read().splitlines()[-1] == 'finished' for p in procs)
  procs, logs = pairs['hung']
  message = _assert_lost_in_one_line(procs[1].returncode, logs[1].read_text())
  # Process 0 runs the store: its heartbeat or the store's answers stop first, as it happens.
  assert ('Process 0 of 2 has sent no heartbeat for 2 s' in message
          or 'The coordination service (run by process 0) has not answered for 2 s' in message)
