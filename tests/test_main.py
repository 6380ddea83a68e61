"""The command line, as a user runs it: the smoke config end to end, then eval and predict."""

import collections
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(*args, env, check=True):
  proc = subprocess.run([sys.executable, str(ROOT / 'main.py'), *args], env=env,
                        capture_output=True, text=True, timeout=600, cwd=ROOT)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def smoke_workdir(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp('smoke')
  proc = _main('--config=configs/smoke.py', f'--workdir={workdir}', env=env)
  return workdir, proc.stderr


def test_smoke_config_runs_end_to_end(smoke_workdir):
  workdir, log = smoke_workdir
  for needle in ('Phase warmup', 'Phase finetune', 'img/s', 'ETA', 'Confusion matrix',
                 'Wrote'):
    assert needle in log
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['phase'] for r in rows] == ['warmup', 'warmup', 'finetune']
  assert rows[-1]['val_loss'] < rows[0]['val_loss']      # it learns the easy synthetic task
  for name in ('loss.png', 'accuracy.png', 'eval.json', 'test.json', 'config.json'):
    assert (workdir / name).stat().st_size > 0


# absl's prefix of a Python log line: level, date, time, thread, file:line.
_ABSL_PREFIX = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] ')


def _library_noise(log: str) -> list[str]:
  """The lines of `log` that the libraries print at start-up, not about the run."""
  return [line for line in log.splitlines()
          if re.match(r'[IWE]0000 ', line) or 'absl::InitializeLog' in line or
          any(word in line for word in ('cuInit', 'libtpu', 'cuda drivers', 'Variant folder',
                                        'Sharding callback duration'))]


def test_the_log_says_only_what_the_run_does_once(smoke_workdir):
  # No TensorFlow, CUDA or TPU line on a CPU machine, no line twice; the step that compiles
  # is announced, with its time and where it came from, and the time since the launch.
  _, log = smoke_workdir
  assert not _library_noise(log)
  # Each record once (a record's continuation lines, such as the confusion matrices of the
  # validation and the test split, may well be alike).
  bodies = collections.Counter(_ABSL_PREFIX.sub('', line) for line in log.splitlines()
                               if _ABSL_PREFIX.match(line))
  assert not [line for line, n in bodies.items() if n > 1 and line.strip()]
  assert 'Compiling the train step of phase warmup ...' in log
  assert re.search(r'The train step of phase warmup: (compiled|loaded) in [\d.]+ s .*'
                   r'persistent compilation cache .* the first call took [\d.]+ s and ended '
                   r'[\d.]+ s after launch\.', log), log
  assert 'Compiling the train step of phase finetune ...' in log


def test_a_second_run_loads_its_steps_from_the_persistent_cache(smoke_workdir, env, tmp_path):
  # The smoke run above compiled these steps (each takes seconds, over JAX's 1 s threshold of
  # what it keeps): a new run of the same model reads them from the cache in the env.
  proc = _main('--config=configs/smoke.py', f'--workdir={tmp_path}', '--config.warmup.epochs=1',
               '--config.finetune.epochs=0', '--config.steps_per_epoch=2', env=env)
  for what in ('The train step of phase warmup', 'The evaluation step'):
    assert f'{what}: loaded in ' in proc.stderr, proc.stderr[-3000:]
  assert not _library_noise(proc.stderr)


@pytest.mark.parametrize('verbosity', [None, '1'])
def test_the_libraries_start_up_lines_only_with_verbosity(tmp_path, env, verbosity):
  # As a user runs it, without JAX_PLATFORMS: JAX looks for a TPU too. The eval stops at its
  # first error after the libraries have loaded (the workdir holds no checkpoint).
  env = {k: v for k, v in env.items() if k != 'JAX_PLATFORMS'}
  flags = [] if verbosity is None else [f'--verbosity={verbosity}']
  proc = _main('--mode=eval', '--config=configs/smoke.py', f'--workdir={tmp_path}', *flags,
               env=env, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.rstrip().splitlines()
  assert any(line.startswith('error: ') for line in lines), proc.stderr[-3000:]
  if verbosity is None:
    assert lines[-1].startswith('error: ')
    assert not _library_noise(proc.stderr), proc.stderr
    assert not [line for line in lines[:-1] if line[:1] in 'WEF'], proc.stderr
  else:
    assert "Unable to initialize backend 'tpu'" in proc.stderr


def test_tensorboard_from_the_requirements_reads_the_runs_scalars(smoke_workdir, env):
  # The README's `tensorboard --logdir W`: the command comes with requirements.txt.
  workdir, _ = smoke_workdir
  tensorboard = pathlib.Path(sys.executable).parent / 'tensorboard'
  proc = subprocess.run([str(tensorboard), '--inspect', f'--logdir={workdir}'], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for tag in ('train/loss', 'val/accuracy', 'learning_rate'):
    assert tag in proc.stdout


def test_eval_of_the_test_split_at_the_best_checkpoint_leaves_the_runs_own_results(
    smoke_workdir, env):
  from hhjax import best  # pylint: disable=g-import-not-at-top
  workdir, _ = smoke_workdir
  # The training run's own results: validation (eval.json and pictures) and test (test.json and
  # test/): the two splits hold other images, so their numbers differ.
  own = {p: p.read_bytes() for p in [*workdir.glob('*.json'), *workdir.glob('*.png'),
                                      *(workdir / 'test').iterdir()]}
  validation, test = (json.load(open(workdir / name)) for name in ('eval.json', 'test.json'))
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert (validation['split'], test['split']) == ('validation', 'test')
  assert validation['loss'] == pytest.approx(rows[-1]['val_loss'], rel=1e-6) != test['loss']

  proc = _main('--mode=eval', f'--workdir={workdir}', '--split=test', '--checkpoint=best',
               env=env)
  chosen = best.choose(rows, lambda row: row)['step']
  path = workdir / 'eval' / f'test-step_{chosen:06d}.json'
  saved = json.load(open(path))
  assert (saved['split'], saved['step'], saved['count']) == ('test', chosen, 12)
  assert f"accuracy {saved['accuracy']:.4f}" in proc.stderr
  assert 'true \\ predicted' in proc.stderr
  for name in ('confusion_matrix.png', 'misclassified.png', 'misclassified.json'):
    assert (path.with_suffix('') / name).stat().st_size > 0
  assert {p: p.read_bytes() for p in own} == own            # nothing of the run rewritten
  if chosen == rows[-1]['step']:   # the best is the final step: test.json's numbers again
    assert saved['loss'] == pytest.approx(test['loss'], rel=1e-6)
  assert 'The evaluation step: loaded in ' in proc.stderr   # compiled by the training run
  assert not _library_noise(proc.stderr)
  # This evaluation's own report, beside its results (the run's is left as it was), is the
  # last line.
  report = path.with_suffix('') / 'report.html'
  assert proc.stderr.rstrip().splitlines()[-1].endswith(f'Run report: {report.as_uri()}')
  assert 'data-evaluation="eval"' in report.read_text()


def test_predict_prints_path_class_and_probability(smoke_workdir, env, tmp_path):
  workdir, _ = smoke_workdir
  dark = np.full((80, 80, 3), 20, np.uint8)      # the synthetic classes differ in brightness
  bright = np.full((80, 80, 3), 235, np.uint8)
  Image.fromarray(dark).save(tmp_path / 'dark.png')
  Image.fromarray(bright).save(tmp_path / 'bright.jpg')
  proc = _main('--mode=predict', f'--workdir={workdir}', f'--images={tmp_path}/*', env=env)
  lines = [line.split('\t') for line in proc.stdout.strip().splitlines()]
  assert [pathlib.Path(l[0]).name for l in lines] == ['bright.jpg', 'dark.png']
  assert [l[1] for l in lines] == ['class_1', 'class_0']
  assert all(0.5 <= float(l[2]) <= 1 for l in lines)


def test_usage_errors_are_reported_before_any_work(tmp_path, env):
  for args, needle in (
      ([f'--workdir={tmp_path}'], '--mode=train needs --config'),
      (['--mode=predict', f'--workdir={tmp_path}'], '--images'),
      (['--config=configs/smoke.py'], '--workdir'),
      (['--config=configs/smoke.py', f'--workdir={tmp_path}', '--config.batch_size=abc'],
       "--config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
      (['--config=configs/smoke.py', f'--workdir={tmp_path}', '--config.nope=3'],
       "--config.nope: the config has no field 'nope'. The fields are those of the --config"),
      # A typo: ml_collections's hint, on the same line, without escaped quotes or a literal \n.
      (['--config=configs/smoke.py', f'--workdir={tmp_path}', '--config.batch_siz=4'],
       '--config.batch_siz: the config has no field \'batch_siz\'. Did you mean "batch_size"'),
      (['--config=configs/smoke.py', f'--workdir={tmp_path}', '--config.dta.source=x'],
       'the config has no field \'dta\'. Did you mean "data"'),
      # An override without the config it changes.
      (['--mode=import_keras', '--keras_model=m.keras', f'--workdir={tmp_path}',
        '--config.data.source=folder'],
       '--config.data.source: a --config.FIELD=VALUE override needs --config=FILE.py'),
  ):
    proc = _main(*args, env=env, check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith('error: ') and needle in last, proc.stderr
    assert 'Traceback' not in proc.stderr and '\\' not in last


def test_preview_data_writes_a_grid_of_training_images(env, tmp_path):
  proc = _main('--config=configs/smoke.py', f'--workdir={tmp_path}', '--mode=preview_data',
               env=env)
  grid = tmp_path / 'preview_data.png'
  assert str(grid) in proc.stdout + proc.stderr
  image = np.asarray(Image.open(grid))
  assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0


def test_none_overrides_reach_optional_fields_of_every_type(env, tmp_path):
  # int fields (steps_per_epoch) fail in the flag parser and str fields (data.dir) would get
  # the string 'None' unless main.py applies these overrides itself.
  proc = _main('--config=configs/smoke.py', f'--workdir={tmp_path}', '--mode=preview_data',
               '--config.steps_per_epoch=None', '--config.data.dir=None', env=env)
  assert (tmp_path / 'preview_data.png').stat().st_size > 0, proc.stderr[-2000:]

  sys.path.insert(0, str(ROOT))
  import main  # pylint: disable=g-import-not-at-top
  from absl import app  # pylint: disable=g-import-not-at-top
  from configs import smoke  # pylint: disable=g-import-not-at-top
  argv, paths = main.split_none_overrides(
      ['main.py', '--config=configs/smoke.py', '--config.steps_per_epoch=None',
       '--config.data.dir=none', '--config.early_stopping.metric=null', '--workdir=W'])
  assert argv == ['main.py', '--config=configs/smoke.py', '--workdir=W']
  config = smoke.get_config()
  config.lock()
  main.set_none(config, paths)
  assert (config.steps_per_epoch, config.data.dir, config.early_stopping.metric) == (None,) * 3
  with pytest.raises(app.UsageError, match=r'batch_size=None: this field needs a value'):
    main.set_none(config, ['batch_size'])
  with pytest.raises(app.UsageError, match=r"no field 'data.nope'"):
    main.set_none(config, ['data.nope'])


def test_an_empty_workdir_or_one_naming_a_file_is_refused_in_one_line(tmp_path, env):
  # Run from an empty folder: a run that took '' for the current directory would write here.
  (tmp_path / 'a_file').write_text('not a folder')
  for args, needle in (
      (['--workdir='], '--workdir is empty'),
      ([f'--workdir={tmp_path / "a_file"}', '--mode=eval'], 'is a file, not a folder'),
  ):
    proc = subprocess.run([sys.executable, str(ROOT / 'main.py'),
                           f'--config={ROOT / "configs/smoke.py"}', *args], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith('error: ') and needle in last, proc.stderr
    assert 'Traceback' not in proc.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a_file']


def test_a_truncated_or_incomplete_config_json_is_a_one_line_error(smoke_workdir, env, tmp_path):
  from hhjax import errors  # pylint: disable=g-import-not-at-top
  from hhjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  workdir, _ = smoke_workdir
  text = (workdir / 'config.json').read_text()
  for content, needle in ((text[:len(text) // 2], 'is not valid JSON'),
                          ('{}', "lacks the config fields ['batch_size', 'data.source'"),
                          ('[1, 2]', 'holds a list, not a config'),
                          ('{"data": {"source": "fake"}}', 'lacks the config fields')):
    (tmp_path / 'config.json').write_text(content)
    with pytest.raises(errors.DataError, match=re.escape(needle)):
      workdir_lib.load_config(str(tmp_path))
  assert workdir_lib.load_config(str(workdir)).model.cut == 'mixed0'
  # A --config given to eval or predict is compared with it: the same error.
  (tmp_path / 'config.json').write_text(text[:len(text) // 2])
  with pytest.raises(errors.DataError, match='is not valid JSON'):
    workdir_lib.check_inference_config(workdir_lib.load_config(str(workdir)), str(tmp_path))
  # Through main.py: eval without --config reads it.
  proc = _main('--mode=eval', f'--workdir={tmp_path}', env=env, check=False)
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 2 and last.startswith('error: '), proc.stderr[-3000:]
  assert f'{tmp_path}/config.json is not valid JSON' in last and 'Traceback' not in proc.stderr


def test_an_unreachable_remote_workdir_is_a_one_line_error(monkeypatch):
  from etils import epath  # pylint: disable=g-import-not-at-top
  from hhjax import errors  # pylint: disable=g-import-not-at-top
  from hhjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def offline(self):   # what TensorFlow's GCS client raises without network, after its retries
    raise tf.errors.FailedPreconditionError(
        None, None, "Error executing an HTTP request: libcurl code 6 meaning 'Could not "
        f"resolve hostname'\n\t when reading metadata of {self}")
  monkeypatch.setattr(type(epath.Path('gs://bucket/run')), 'exists', offline)
  with pytest.raises(errors.StorageUnreachableError) as raised:
    workdir_lib.check_reachable('gs://bucket/run')
  message = str(raised.value)
  assert message.startswith("--workdir=gs://bucket/run cannot be reached (Error executing")
  assert '\n' not in message and 'use a local --workdir' in message
  workdir_lib.check_reachable('/a/local/path')   # local paths are not probed


def _sigterm_caught_or_blocked(pid) -> bool:
  """Whether the process has a SIGTERM handler, or holds SIGTERM blocked (across its exec)."""
  try:
    status = pathlib.Path(f'/proc/{pid}/status').read_text()
  except FileNotFoundError:
    return False
  fields = dict(line.split(':\t', 1) for line in status.splitlines() if ':\t' in line)
  bit = 1 << (15 - 1)   # SIGTERM
  return bool((int(fields['SigCgt'], 16) | int(fields['SigBlk'], 16)) & bit)


def test_a_sigterm_during_start_up_exits_3_in_one_line(tmp_path, env):
  # Status 3 is what the runbooks relaunch (tools/slurm_train.sbatch requeues 3 and 4); a
  # process killed by the signal (143) would end the job. Two moments: as soon as main.py
  # handles the signal (it then re-executes itself with glibc's settings and loads the light
  # modules), and once main() has started (the library loads next).
  env = dict(env)
  env.pop('HHJAX_MALLOC_TUNING', None)   # with the re-execution
  for moment in ('handler', 'main'):
    err = tmp_path / f'{moment}.err'
    with open(err, 'w') as stderr:
      proc = subprocess.Popen([sys.executable, str(ROOT / 'main.py'), '--config=configs/smoke.py',
                               f'--workdir={tmp_path / moment}'], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=stderr)
    try:
      deadline = time.monotonic() + 120
      while not (_sigterm_caught_or_blocked(proc.pid) if moment == 'handler' else
                 'GLIBC_TUNABLES=' in err.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()[-2000:]
        time.sleep(0.001)
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    log = err.read_text()
    assert proc.returncode == 3, (moment, proc.returncode, log[-2000:])
    assert log.rstrip().endswith('preempted (SIGTERM) outside the training steps, while starting '
                                 'or finishing: no step was lost; run the same command to resume')
    assert 'Traceback' not in log


# main.py's end, as its `__main__` block ends it, in a process that also holds what an end
# must honour: a non-daemon thread still writing, an atexit callback, an unflushed print.
_END = r'''
import atexit, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import runpy
main = runpy.run_path(os.path.join(sys.argv[1], 'main.py'), run_name='not_main')
class Collected:
  def __del__(self):
    os.write(2, b'torn down\n')
keep = Collected()   # deleted only by the interpreter's final teardown
def write():
  time.sleep(1)
  with open(sys.argv[2], 'w') as f:
    f.write('written')
threading.Thread(target=write).start()
atexit.register(lambda: os.write(2, b'atexit\n'))
print('buffered', end='')
main['_exit_without_teardown'](int(sys.argv[3]))
'''


@pytest.mark.parametrize('status', [0, 3])
def test_main_ends_after_its_threads_and_atexit_callbacks_without_the_teardown(tmp_path, env,
                                                                               status):
  """The interpreter's final teardown took seconds (5-6 s on a busy machine) after the last
  line; main.py ends without it, once threads, atexit callbacks and streams are done."""
  out = tmp_path / 'out.txt'
  proc = subprocess.run([sys.executable, '-c', _END, str(ROOT), str(out), str(status)],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == status, proc.stderr[-2000:]
  assert out.read_text() == 'written'   # the non-daemon thread was joined
  assert proc.stdout == 'buffered'
  lines = proc.stderr.splitlines()
  assert 'atexit' in lines and 'torn down' not in lines
