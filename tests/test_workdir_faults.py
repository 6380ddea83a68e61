"""Faults around one workdir, as a user meets them, with main.py processes.

One story shared by the tests: a training run is SIGKILLed after its first epoch's row, before
that epoch's checkpoint is kept; the same command is run again (it takes the lock over and
resumes), and while it trains a second training run is started (it must refuse), and an eval
and a predict (a folder with a WebP image and an unreadable file, --bad_files=skip) run beside
it. Smaller faults of the same commands are checked in-process.
"""

import collections
import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from hhjax import errors
from hhjax import predict as predict_lib
from hhjax.data import bad_files
from hhjax.training import evaluation
from hhjax.training import restore

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The smoke config, warm-up only (no second phase to compile), every checkpoint kept (so that
# the eval beside reads a fixed one), long enough for a second run and an eval to start while
# it trains.
TRAIN_FLAGS = ['--config=configs/smoke.py', '--config.warmup.epochs=10',
               '--config.finetune.epochs=0', '--config.keep_checkpoints=100']
STEPS = [10 * (e + 1) for e in range(10)]
TAGS = ('train/loss', 'train/accuracy', 'val/loss', 'val/accuracy', 'learning_rate',
        'val/f1_macro', 'val/ece')
# The progress rows, every config.log_every_steps = 5 steps of the smoke config.
PROGRESS_STEPS = [5 * (s + 1) for s in range(20)]
PROGRESS_TAGS = ('train_steps/loss', 'train_steps/accuracy', 'train_steps/learning_rate')


class _Process:
  """A main.py process; its output goes to files, so that several can run at once."""

  def __init__(self, logs: pathlib.Path, name: str, workdir, *args, env):
    self._out, self._err = logs / f'{name}.out', logs / f'{name}.err'
    with open(self._out, 'w') as out, open(self._err, 'w') as err:
      self.popen = subprocess.Popen(
          [sys.executable, str(ROOT / 'main.py'), f'--workdir={workdir}', *args], env=env,
          cwd=ROOT, stdout=out, stderr=err, text=True)
    self._start = time.monotonic()
    self.seconds = None

  def finish(self, timeout=300) -> subprocess.CompletedProcess:
    try:
      self.popen.wait(timeout=timeout)
    finally:
      if self.popen.poll() is None:
        self.popen.kill()
        self.popen.wait()
    self.seconds = time.monotonic() - self._start
    return subprocess.CompletedProcess(self.popen.args, self.popen.returncode,
                                       self._out.read_text(), self._err.read_text())


def _wait_for(condition, what, proc, timeout=120):
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f'The run ended (status {proc.returncode}) before {what}.')
    if time.monotonic() > deadline:
      raise AssertionError(f'Timed out waiting for {what}.')
    time.sleep(0.02)


def _lock_owner(workdir):
  try:
    return json.loads((workdir / 'train.lock').read_text())
  except (FileNotFoundError, ValueError):
    return {}


def _rows(workdir):
  path = workdir / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _finished_checkpoints(workdir):
  ckpts = workdir / 'checkpoints'
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


@dataclasses.dataclass
class Story:
  workdir: pathlib.Path
  killed_pid: int
  resumed: subprocess.CompletedProcess
  resumed_pid: int
  owner: dict                       # the lock file while the resumed run trains
  second: subprocess.CompletedProcess
  second_s: float
  beside: subprocess.CompletedProcess
  predict: subprocess.CompletedProcess
  training_when_eval_started: bool


def _image_folder(folder):
  Image.fromarray(np.full((80, 80, 3), 235, np.uint8)).save(folder / 'bright.webp')
  Image.fromarray(np.full((80, 80, 3), 20, np.uint8)).save(folder / 'dark.png')
  (folder / 'broken.jpg').write_bytes(b'not an image')
  (folder / 'notes.txt').write_text('left out: not an image file name')
  return folder


@pytest.fixture(scope='module')
def story(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp('busy')
  logs = tmp_path_factory.mktemp('logs')
  images = _image_folder(tmp_path_factory.mktemp('images'))

  killed = _Process(logs, 'killed', workdir, *TRAIN_FLAGS, env=env)
  _wait_for(lambda: _rows(workdir), 'the first epoch row', killed.popen)
  killed.popen.kill()
  killed.finish()
  for step in _finished_checkpoints(workdir):
    if step > 5:   # as if killed while the step-10 checkpoint was being written
      shutil.rmtree(workdir / 'checkpoints' / str(step))

  resumed = _Process(logs, 'resumed', workdir, *TRAIN_FLAGS, env=env)
  try:
    _wait_for(lambda: _lock_owner(workdir).get('pid') == resumed.popen.pid,
              'the resumed run to take the lock', resumed.popen)
    owner = _lock_owner(workdir)
    second = _Process(logs, 'second', workdir, *TRAIN_FLAGS, env=env)
    _wait_for(lambda: _finished_checkpoints(workdir), 'a checkpoint to evaluate', resumed.popen)
    training = resumed.popen.poll() is None and _lock_owner(workdir) == owner
    beside = _Process(logs, 'beside', workdir, '--mode=eval', env=env)
    predict = _Process(logs, 'predict', workdir, '--mode=predict', f'--images={images}',
                       '--bad_files=skip', env=env)
    second_result, beside_result, predict_result = (
        second.finish(), beside.finish(), predict.finish())
  finally:
    resumed_result = resumed.finish()
  return Story(workdir, killed.popen.pid, resumed_result, resumed.popen.pid, owner,
               second_result, second.seconds, beside_result, predict_result, training)


def _error(proc):
  """The message main.py printed for a UserError: from 'error: ' to the end."""
  assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  return proc.stderr[proc.stderr.rindex('error: '):].strip()


def test_second_training_run_on_a_busy_workdir_refuses_at_once(story):
  line = _error(story.second)
  assert '\n' not in line
  assert f'error: {story.workdir} is in use by another training run (' in line
  for needle in (f"host {story.owner['host']}", f'pid {story.resumed_pid}',
                 f"started {story.owner['started']}"):
    assert needle in line
  # main.py checks the lock before the library loads: 2-5 s on the 2-core CPU, all startup
  # (more while the first run, an eval and a predict share the cores).
  assert story.second_s < 30, story.second_s
  assert 'training images' not in story.second.stderr   # before the data is even read


def test_first_run_finishes_with_one_row_per_epoch_and_releases_the_lock(story):
  assert story.resumed.returncode == 0, story.resumed.stderr[-3000:]
  assert [r['step'] for r in _rows(story.workdir)] == STEPS
  assert (story.workdir / 'train.lock').read_text() == ''


def test_lock_of_a_killed_run_is_taken_over_with_a_message(story):
  log = story.resumed.stderr
  assert 'train.lock: the training run that held it (host' in log
  assert f'pid {story.killed_pid}, started' in log and 'ended without releasing it' in log


def test_eval_runs_beside_a_training_run(story):
  assert story.training_when_eval_started
  assert story.beside.returncode == 0, story.beside.stderr[-3000:]
  assert 'Evaluation at step' in story.beside.stderr


def test_resumed_run_has_one_tensorboard_point_per_step_and_tag(story):
  points = []
  for path in (story.workdir / 'tensorboard').glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      points += [(v.tag, event.step) for v in event.summary.value]
  assert len(points) == len(set(points)), 'a point written twice'
  steps = collections.defaultdict(list)
  for tag, step in points:
    steps[tag].append(step)
  assert set(TAGS) | set(PROGRESS_TAGS) <= set(steps)
  for tag, at in steps.items():
    if tag.startswith('train_steps/'):   # those before the checkpoint it resumed from kept
      assert sorted(at) == PROGRESS_STEPS, tag
    elif tag.startswith('_hparams_/'):
      assert at == [0], tag
    else:                                # the epoch rows: losses, accuracies, metrics
      assert sorted(at) == STEPS, tag


def test_predict_beside_a_training_run_reads_webp_and_skips_bad_files_with_the_flag(story):
  proc = story.predict
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = [pathlib.Path(line.split('\t')[0]).name for line in proc.stdout.splitlines()]
  assert names == ['bright.webp', 'dark.png']
  assert 'Skipping 1 file(s)' in proc.stderr and 'broken.jpg' in proc.stderr


def test_bad_file_advice_names_a_flag_that_works_alone(tmp_path):
  folder = _image_folder(tmp_path)
  files = predict_lib.expand_images([str(folder)])
  assert [pathlib.Path(f).name for f in files] == ['bright.webp', 'broken.jpg', 'dark.png']
  with pytest.raises(errors.DataError) as raised:
    bad_files.readable_files(files, 'error')
  assert str(raised.value).endswith(
      "run again with --bad_files=skip (config.data.bad_files='skip') to classify the others.")


def test_eval_that_cannot_write_eval_json_warns_and_goes_on(tmp_path, caplog):
  # A path eval.json cannot be written to, whoever runs the test (root ignores permissions).
  (tmp_path / 'eval.json').mkdir()
  result = {'loss': 0.5, 'accuracy': 0.75, 'count': 4, 'confusion': np.array([[2, 0], [1, 1]])}
  with caplog.at_level('INFO', logger='absl'):
    out = evaluation.report(result, ['a', 'b'], 30, str(tmp_path), is_main=True)
  assert out['accuracy'] == 0.75
  assert 'Evaluation at step 30 on 4 images' in caplog.text   # printed first
  assert f'Could not write {tmp_path}/eval.json (IsADirectoryError' in caplog.text
  assert 'the results above are not saved' in caplog.text


def test_eval_reads_again_when_a_training_run_deletes_the_checkpoint_it_reads(
    tmp_path, monkeypatch, caplog):
  for step in (5, 10):
    (tmp_path / 'checkpoints' / str(step)).mkdir(parents=True)
  calls = []

  def read(workdir, target, which):   # the first read loses its checkpoint to rotation
    calls.append(which)
    if len(calls) == 1:
      (tmp_path / 'checkpoints' / '5').rmdir()
      raise ValueError('NOT_FOUND: Error opening "zarr" driver')
    return 'restored'

  monkeypatch.setattr(restore, '_read_only', read)
  with caplog.at_level('WARNING', logger='absl'):
    assert restore.for_inference(str(tmp_path), None, 'latest') == 'restored'
  assert calls == ['latest', 'latest'] and 'deleted checkpoint(s) [5]' in caplog.text

  def broken(workdir, target, which):    # nothing deleted: the error is the checkpoint's own
    raise ValueError('damaged')
  monkeypatch.setattr(restore, '_read_only', broken)
  with pytest.raises(ValueError, match='damaged'):
    restore.for_inference(str(tmp_path), None, 'latest')
