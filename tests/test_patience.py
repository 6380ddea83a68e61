"""config.<phase>.early_stopping: Keras's EarlyStopping, decision for decision.

`keras.callbacks.EarlyStopping` is driven directly, on a stand-in model whose weights are the
epoch's number, with the same epoch metrics that hhjax's rule sees: the epoch it stops at, its
counters and the weights `restore_best_weights` sets must be the same.
"""

import json
import os

import jax
import numpy as np
import pytest

from configs import smoke
from hhjax import checkpointing
from hhjax import config_checks
from hhjax import train
from hhjax.training import patience
from hhjax.training import phases
from hhjax.training import restore

keras = pytest.importorskip('keras')

STEPS_PER_EPOCH = 10


class _Model:
  """What EarlyStopping touches of a model; its weights say which epoch they are from."""

  def __init__(self):
    self.stop_training = False
    self.epoch = 0
    self.set_to = None

  def get_weights(self):
    return [np.array(self.epoch)]

  def set_weights(self, weights):
    self.set_to = int(weights[0])


def _keras_run(kwargs, values):
  callback = keras.callbacks.EarlyStopping(**kwargs)
  model = _Model()
  callback.set_model(model)
  callback.on_train_begin()
  ran = 0
  for epoch, value in enumerate(values):
    model.epoch = epoch
    callback.on_epoch_end(epoch, {kwargs['monitor']: value})
    ran = epoch + 1
    if model.stop_training:
      break
  callback.on_train_end()
  return {'epochs': ran, 'wait': callback.wait, 'best': callback.best,
          'best_epoch': callback.best_epoch, 'restored': model.set_to}


def _our_run(kwargs, values):
  rule = patience.Patience(**kwargs)
  counters = patience.Counters()
  ran = 0
  for epoch, value in enumerate(values):
    step = (epoch + 1) * STEPS_PER_EPOCH
    ran = epoch + 1
    if patience.on_epoch_end(rule, counters, epoch, {kwargs['monitor']: value}, step):
      break
  # Keras sets the best weights at the end of fit, also the current epoch's own.
  best = patience.step_to_restore(rule, counters, ran * STEPS_PER_EPOCH)
  restored = None if counters.best_step is None else (
      ran - 1 if best is None else best // STEPS_PER_EPOCH - 1)
  return {'epochs': ran, 'wait': counters.wait, 'best': counters.best,
          'best_epoch': counters.best_epoch, 'restored': restored}


def _sequences():
  rng = np.random.default_rng(0)
  out = []
  for _ in range(12):
    # Noisy plateaus with ties (two decimals), up and down.
    walk = np.round(0.5 + np.cumsum(rng.normal(0, 0.03, 12)), 2)
    out.append([float(v) for v in walk])
  out.append([0.5] * 8)                                  # flat: no improvement after the first
  out.append([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])   # always down
  out.append([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])   # always up
  return out


SETTINGS = [
    dict(patience=0),
    dict(patience=2),
    dict(patience=3, min_delta=0.02),
    dict(patience=2, baseline=0.45),
    dict(patience=2, baseline=0.6, restore_best_weights=True),
    dict(patience=1, restore_best_weights=True),
    dict(patience=4, min_delta=0.01, restore_best_weights=True),
    dict(patience=1, start_from_epoch=3, restore_best_weights=True),
    dict(patience=20, restore_best_weights=True),          # never stops: Keras restores anyway
]
CASES = [(monitor, mode, setting) for monitor, mode in
         [('val_loss', 'auto'), ('train_loss', 'min'), ('val_accuracy', 'max')]
         for setting in SETTINGS]


@pytest.mark.parametrize('monitor, mode, setting', CASES,
                         ids=[f'{m}-{mode}-{s}' for m, mode, s in CASES])
def test_decisions_equal_keras_early_stopping(monitor, mode, setting):
  kwargs = dict(monitor=monitor, mode=mode, **setting)
  for values in _sequences():
    ours, theirs = _our_run(kwargs, values), _keras_run(kwargs, values)
    assert ours == theirs, values


def test_auto_mode_maximises_accuracies_as_keras_reads_its_accuracy_metric():
  # Keras's 'auto' reads the direction from the compiled metric named 'accuracy'.
  assert keras.metrics.BinaryAccuracy()._direction == 'up'
  assert patience.direction(patience.Patience(monitor='val_accuracy')) == 'max'
  assert patience.direction(patience.Patience(monitor='train_loss')) == 'min'


def test_the_cases_exercise_every_outcome():
  # Guards the parity test against sequences on which every rule behaves alike.
  outcomes = [_our_run(dict(monitor=m, mode=mode, **s), v)
              for m, mode, s in CASES for v in _sequences()]
  assert {o['epochs'] for o in outcomes} >= {2, 3, 8, 12}
  assert any(o['restored'] is not None and o['restored'] != o['epochs'] - 1 for o in outcomes)


def test_counters_round_trip_through_the_checkpoint_record():
  progress = phases.Progress('finetune', phase_start_step=30, epochs_done=4)
  progress.patience = patience.Counters(wait=2, best=0.1234567890123, best_epoch=1,
                                        best_step=50, stopped_epoch=0)
  meta = restore.CheckpointMeta(step=70, phase='finetune', progress=progress,
                                class_names=('a', 'b'), config={})
  back = restore.CheckpointMeta.from_json(json.loads(json.dumps(meta.to_json())))
  assert back.progress == progress
  # A record written before the counters existed reads as fresh counters.
  old = meta.to_json()
  del old['progress']['patience']
  assert restore.CheckpointMeta.from_json(old).progress.patience == patience.Counters()


def test_the_best_epochs_checkpoint_is_kept_until_released(tmp_path):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from hhjax import checkpointing  # pylint: disable=g-import-not-at-top
  state = {'step': jnp.int32(0), 'params': {'w': jnp.ones(3)}}
  with checkpointing.Checkpoints(tmp_path, keep=1) as ckpts:
    ckpts.keep_also(2)
    for step in range(1, 5):
      ckpts.save(step, state, {'step': step})
    ckpts.wait()
    assert ckpts.all_steps() == [2, 4]
    ckpts.keep_also(None)
    ckpts.save(5, state, {'step': 5})
    ckpts.wait()
    assert ckpts.all_steps() == [5]


# ------------------------------------------------------------------ in a training run

class _Killed(Exception):
  """Stands for a kill between two epochs, after the epoch's checkpoint is written."""


def _patient_config():
  """Warm-up on cached features (a frozen backbone, no augmentation): 3 steps per epoch, the
  best epoch the first (no later one beats it by min_delta), so patience 2 stops it after its
  third epoch (step 9) and restores step 3; keep_checkpoints=1 leaves step 3 to keep_also.
  With label smoothing and 'balanced' class weights (15 examples: 8 and 7)."""
  config = smoke.get_config()
  config.batch_size = 2
  config.steps_per_epoch = 3
  config.log_every_steps = 0
  config.checkpoint_every_steps = 0
  config.keep_checkpoints = 1
  config.data.fake.num_train_examples = 15
  config.data.fake.num_eval_examples = 4
  config.data.augment.enabled = False
  config.model.hidden = 8
  config.loss.label_smoothing = 0.1
  config.loss.class_weight = 'balanced'
  config.warmup.epochs = 6
  config.finetune.epochs = 0
  es = config.warmup.early_stopping
  es.monitor, es.mode, es.min_delta, es.patience = 'val_loss', 'min', 100.0, 2
  es.restore_best_weights = True
  config_checks.validate(config)
  return config


def _arrays(workdir, step):
  with checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True) as c:
    return c.restore_arrays(step), restore.read_meta(c, step)


def test_a_resume_continues_the_patience_counters_and_restores_the_best_epoch(tmp_path):
  """Killed after epoch 2 (step 6) with wait 1; the resumed run stops after epoch 3 (step 9)
  and restores step 3, as an uninterrupted run does. Counters started afresh on resume would
  take epoch 3 as the first best and run on."""
  config = _patient_config()
  workdir = str(tmp_path / 'workdir')
  end_epoch = train._end_epoch   # pylint: disable=protected-access

  def end_epoch_then_kill(run, state, *args, **kwargs):
    state, out = end_epoch(run, state, *args, **kwargs)
    if int(jax.device_get(state['step'])) == 6:
      run.ckpts.wait()
      raise _Killed()
    return state, out

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, '_end_epoch', end_epoch_then_kill)
    with pytest.raises(_Killed):
      train.train_and_evaluate(config, workdir)
  _, at_kill = _arrays(workdir, 6)
  assert (at_kill.progress.patience.wait, at_kill.progress.patience.best_step) == (1, 3)

  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 9 and 'patience 2' in result['stop_reason']
  final, meta = _arrays(workdir, 9)
  assert meta.progress.patience.restored_from == 3
  # restore_best_weights: the first epoch's weights, from its checkpoint (kept despite
  # keep_checkpoints=1); the optimizer state is not restored (Keras's weights exclude it) and
  # shows the six steps trained after it.
  best, _ = _arrays(workdir, 3)
  for a, b in zip(jax.tree.leaves(final['params']), jax.tree.leaves(best['params'])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final['opt_state']),
                                                      jax.tree.leaves(best['opt_state'])))


def test_a_phase_whose_best_weights_were_restored_takes_no_more_epochs():
  phase = phases.Phase('finetune', 5, 1e-5, (('.*', 'train'),), None)
  progress = phases.Progress('finetune', phase_start_step=0, phase_done=True, epochs_done=3)
  progress.patience.restored_from = 10
  message = phases.reopen_for_more_epochs(progress, phase, step=30, steps_per_epoch=10)
  assert progress.phase_done and 'restore_best_weights' in message and 'stays done' in message
  progress.patience.restored_from = None   # without a restore the phase continues
  assert 'training 2 more' in phases.reopen_for_more_epochs(progress, phase, 30, 10)
  assert not progress.phase_done
