"""A run killed with SIGKILL (during a checkpoint save, and mid-step) and restarted with the same
command ends with exactly the parameters, optimizer state and metrics of an uninterrupted run:
with today's recipe, and with the optimizer options in flight (a schedule, EMA, gradient
accumulation killed between micro-batches, ReduceLROnPlateau's counters and reduced rate)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from hhjax import checkpointing

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 2 warm-up epochs + 1 fine-tuning epoch of 3 steps, a checkpoint after every step.
FLAGS = ['--config.model.cut=mixed0', '--config.finetune.unfreeze_from=mixed0',
         '--config.model.hidden=8', '--config.batch_size=2', '--config.steps_per_epoch=3',
         '--config.warmup.epochs=2', '--config.finetune.epochs=1',
         '--config.checkpoint_every_steps=1', '--config.log_every_steps=1',
         '--config.keep_checkpoints=2', '--config.data.fake.num_train_examples=16',
         '--config.data.fake.num_eval_examples=4']
LAST_STEP = 9
TMP_SUFFIX = '.orbax-checkpoint-tmp'


# Extra flags per case, still 9 steps; the option cases train one phase of 3 epochs (one
# compilation per run). With 2 micro-batches per update and a checkpoint every step, every
# other checkpoint (and a kill there) falls between micro-batches.
ONE_PHASE = ['--config.warmup.epochs=3', '--config.finetune.epochs=0']
OPTIONS = {
    'rmsprop': [],
    # One case for the options' state in flight: the rate set by ReduceLROnPlateau (reduced at
    # the second epoch's end, the third runs with it; a schedule's rate lives in the same
    # injected hyperparameter state), Nesterov momentum, the EMA with its overwrites, weight
    # decay, clipping and gradient accumulation killed between micro-batches; label smoothing,
    # balanced class weights and Keras's EarlyStopping.
    'sgd_nesterov_plateau_ema_accumulation': ONE_PHASE + [
        '--config.optimizer.name=sgd', '--config.optimizer.momentum=0.9',
        '--config.optimizer.nesterov=True', '--config.optimizer.use_ema=True',
        '--config.optimizer.ema_momentum=0.5', '--config.optimizer.ema_overwrite_frequency=2',
        '--config.optimizer.gradient_accumulation_steps=2',
        '--config.optimizer.global_clipnorm=1.0', '--config.optimizer.weight_decay=0.01',
        '--config.reduce_lr_on_plateau.monitor=val_loss',
        '--config.reduce_lr_on_plateau.patience=1', '--config.reduce_lr_on_plateau.min_delta=10',
        # The loss options, and Keras's early stopping with its counters in flight (patient
        # enough not to stop; its best weights restored at the phase's end).
        '--config.loss.label_smoothing=0.1', '--config.loss.class_weight=balanced',
        '--config.warmup.early_stopping.monitor=val_loss',
        '--config.warmup.early_stopping.patience=5',
        '--config.warmup.early_stopping.restore_best_weights=True'],
}


def _command(workdir, options=()):
  return [sys.executable, str(ROOT / 'main.py'), '--config=' + str(ROOT / 'configs/smoke.py'),
          f'--workdir={workdir}', *FLAGS, *options]


def _env(cache):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache))
  env.pop('XLA_FLAGS', None)
  return env


def _steps(ckpt_dir):
  """(finished steps, steps being saved) in a checkpoint directory."""
  try:
    names = os.listdir(ckpt_dir)
  except FileNotFoundError:
    return [], []
  done = sorted(int(n) for n in names if n.isdigit())
  saving = sorted(int(n.split('.')[0]) for n in names if TMP_SUFFIX in n)
  return done, saving


def _kill_when(workdir, env, condition, what, options=()):
  """Starts the run and SIGKILLs it as soon as `condition(done, saving)` holds."""
  proc = subprocess.Popen(_command(workdir, options), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  deadline = time.time() + 300
  try:
    while time.time() < deadline:
      done, saving = _steps(ckpt_dir)
      if condition(done, saving):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return done, saving
      if proc.poll() is not None:
        raise AssertionError(f'The run ended before it could be killed {what}: '
                             f'{proc.stderr.read()[-3000:]}')
      time.sleep(0.002)
    raise AssertionError(f'Timed out waiting to kill the run {what}.')
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _final_state(workdir):
  with checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True) as c:
    assert c.latest_step() == LAST_STEP
    return c.restore_arrays(LAST_STEP)


def _rows(workdir):
  """The rows without their wall-clock 'time', which differs between any two runs."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: v for k, v in json.loads(line).items() if k != 'time'} for line in f]


def _tensorboard(workdir):
  """(tag, step, value) of every TensorBoard point, sorted; a point written twice shows twice."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  points = []
  for path in sorted(pathlib.Path(workdir, 'tensorboard').glob('events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      points += [(v.tag, event.step, tf.make_ndarray(v.tensor).tolist())
                 for v in event.summary.value]
  return sorted(points)


@pytest.mark.parametrize('case', list(OPTIONS))
def test_killed_and_restarted_run_ends_like_an_uninterrupted_one(tmp_path, case):
  options = OPTIONS[case]
  env = _env(tmp_path / 'jax_cache')   # later runs reuse the first run's compilations
  reference, resumed = tmp_path / 'reference', tmp_path / 'resumed'
  proc = subprocess.run(_command(reference, options), env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]

  if not options:
    # 1. Killed while a checkpoint is being written (its temporary directory exists).
    done, saving = _kill_when(resumed, env, lambda d, s: d and s and s[-1] >= 3,
                              'during a checkpoint save')
    assert saving, 'no save was in progress at the kill'
    # 2. Restarted, then killed again at an arbitrary point once it got further.
    first_resume = done[-1]
    done, _ = _kill_when(resumed, env, lambda d, s: d and d[-1] >= first_resume + 2,
                         'after resuming')
  else:
    # Killed once, after the first epoch, its newest checkpoint at an odd step: between two
    # micro-batches, with the plateau's counters of epoch 1 to carry over.
    done, _ = _kill_when(resumed, env, lambda d, s: d and d[-1] >= 5 and d[-1] % 2,
                         'between two micro-batches', options)
  assert done[-1] < LAST_STEP
  # 3. Restarted once more, to the end.
  proc = subprocess.run(_command(resumed, options), env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from step' in proc.stderr

  want, got = _final_state(reference), _final_state(resumed)
  want_leaves = jax.tree_util.tree_flatten_with_path(want)[0]
  got_leaves = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  assert len(want_leaves) == len(got_leaves) > 0
  for path, value in want_leaves:   # params, batch stats, optimizer state, RNG, step, metrics
    np.testing.assert_array_equal(got_leaves[path], value, err_msg=jax.tree_util.keystr(path))
  # The per-epoch record is the same too: no epoch lost or written twice.
  assert _rows(resumed) == _rows(reference)
  if 'plateau' in case:   # the plateau rule did act: the last epoch ran at the reduced rate
    rates = [row['learning_rate'] for row in _rows(reference)]
    assert rates[-1] == pytest.approx(rates[0] * 0.1)
  # And TensorBoard's, to the step: each progress point (every step here) and epoch point once,
  # with the values of the uninterrupted run.
  points = _tensorboard(reference)
  assert [p for p in points if p[0] == 'train_steps/loss'] and _tensorboard(resumed) == points
  assert not any(TMP_SUFFIX in n for n in os.listdir(resumed / 'checkpoints'))
