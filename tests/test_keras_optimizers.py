"""Keras 3's SGD, Adam, AdamW and RMSprop with their options, step by step against Keras itself.

Each case runs Keras's optimizer (`optimizer.apply(grads, variables)`) and hhjax's
(`optim.make_optimizer`, trainable head beside a frozen backbone) on the same gradients from the
same weights, and compares the weights after every step (and Keras's EMA variables with
`optim.inference_params`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hhjax.training import keras_optim
from hhjax.training import optim
from hhjax.training import plateau
import keras_classifiers

keras = pytest.importorskip('keras')

SHAPES = {'kernel': (4, 3), 'bias': (3,)}
STEPS = 8
RTOL, ATOL = 1e-5, 1e-7


def _gradients(seed=0):
  rng = np.random.default_rng(seed)
  # Mixed magnitudes: tiny gradients show where epsilon enters, large ones the clipping.
  scales = [1.0, 1e-3, 1e-5, 10.0, 1.0, 0.1, 3.0, 1e-4]
  return [{k: (rng.standard_normal(s) * scales[i % len(scales)]).astype(np.float32)
           for k, s in SHAPES.items()} for i in range(STEPS)]


def _initial():
  rng = np.random.default_rng(1)
  return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _keras_run(spec, lr, schedule, grads_seq):
  init = _initial()
  variables = [keras.Variable(init[k].copy(), name=k) for k in SHAPES]
  opt = keras_classifiers.keras_optimizer(keras, spec, lr, schedule)
  trajectory = []
  for grads in grads_seq:
    opt.apply([grads[k].copy() for k in SHAPES], variables)
    ema = None
    if spec.use_ema:
      ema = {k: np.asarray(a) for k, a in zip(SHAPES, opt._model_variables_moving_average)}  # pylint: disable=protected-access
    trajectory.append(({k: np.asarray(v) for k, v in zip(SHAPES, variables)}, ema))
  return trajectory


def _hhjax_run(spec, lr, schedule, grads_seq):
  frozen = {'conv': {'kernel': np.ones((2,), np.float32)}}
  params = {'backbone': frozen, 'head': {'dense': {k: jnp.asarray(v)
                                                    for k, v in _initial().items()}}}
  labels = optim.param_labels(params, [('^head/', 'train'), ('^backbone/', 'freeze')])
  tx = optim.make_optimizer(labels, lr, spec, schedule)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  trajectory = []
  for grads in grads_seq:
    full = {'backbone': jax.tree.map(jnp.ones_like, frozen),
            'head': {'dense': {k: jnp.asarray(g) for k, g in grads.items()}}}
    updates, opt_state = update(full, opt_state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params['backbone']['conv']['kernel'], 1.0)
    ema = None
    if spec.use_ema:
      ema = optim.inference_params({'params': params, 'opt_state': opt_state})['head']['dense']
    trajectory.append((params['head']['dense'], ema, opt_state))
  return trajectory


Opt, Sched = keras_optim.OptimizerSpec, keras_optim.ScheduleSpec
CASES = {
    'sgd_nesterov_piecewise': (
        Opt('sgd', momentum=0.9, nesterov=True), 0.1,
        Sched('piecewise', boundaries=(2, 5), values=(0.1, 0.03, 0.01))),
    'sgd_momentum_exponential_staircase_decay': (
        Opt('sgd', momentum=0.8, weight_decay=0.05, weight_decay_exclude=('bias',)), 0.05,
        Sched('exponential', decay_steps=3, decay_rate=0.5, staircase=True)),
    'adamw_cosine_warmup_clipnorm': (
        Opt('adamw', global_clipnorm=1.0, weight_decay_exclude=('bias',)), 1e-3,
        Sched('cosine', decay_steps=5, alpha=0.1, warmup_target=1e-2, warmup_steps=3)),
    'adam_ema_accumulation': (
        Opt('adam', use_ema=True, ema_momentum=0.9, gradient_accumulation_steps=2), 1e-2,
        Sched()),
    'adam_ema_overwrite_exponential': (
        Opt('adam', beta_1=0.8, beta_2=0.99, epsilon=1e-6, use_ema=True, ema_momentum=0.5,
            ema_overwrite_frequency=3), 1e-2, Sched('exponential', decay_steps=4,
                                                   decay_rate=0.7)),
    'rmsprop_decay_clipnorm_accumulation': (
        Opt('rmsprop', weight_decay=0.1, global_clipnorm=0.5, gradient_accumulation_steps=3),
        1e-2, Sched()),
    'sgd_cosine_no_warmup_adamw_default_decay': (
        Opt('adamw'), 1e-2, Sched('cosine', decay_steps=6, alpha=0.2)),
    'adam_amsgrad_clipnorm': (
        Opt('adam', amsgrad=True, beta_2=0.8, clipnorm=1.0), 1e-2, Sched()),
    'adamw_amsgrad_clipvalue_accumulation_ema': (
        Opt('adamw', amsgrad=True, beta_2=0.9, clipvalue=0.5, gradient_accumulation_steps=2,
            use_ema=True, ema_momentum=0.8), 1e-2, Sched()),
    'sgd_momentum_clipnorm': (
        Opt('sgd', momentum=0.9, clipnorm=0.5), 0.05, Sched()),
    'rmsprop_clipvalue': (
        Opt('rmsprop', clipvalue=0.01), 1e-2, Sched()),
}


@pytest.mark.parametrize('case', list(CASES))
def test_optimizer_matches_keras_step_by_step(case):
  spec, lr, schedule = CASES[case]
  grads_seq = _gradients()
  theirs = _keras_run(spec, lr, schedule, grads_seq)
  ours = _hhjax_run(spec, lr, schedule, grads_seq)
  worst = 0.0
  for step, ((want, want_ema), (got, got_ema, _)) in enumerate(zip(theirs, ours)):
    for k in SHAPES:
      np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL,
                                 err_msg=f'{case}: {k} after step {step + 1}')
      worst = max(worst, float(np.max(np.abs(got[k] - want[k]) / (np.abs(want[k]) + 1e-6))))
      if want_ema is not None:
        np.testing.assert_allclose(got_ema[k], want_ema[k], rtol=RTOL, atol=ATOL,
                                   err_msg=f'{case}: EMA of {k} after step {step + 1}')
  moved = np.max(np.abs(theirs[-1][0]['kernel'] - _initial()['kernel']))
  assert moved > 1e-3, 'the weights barely moved: the comparison would prove little'
  print(f'{case}: max relative error {worst:.2e}')


@pytest.mark.parametrize('case, without', [
    ('adam_amsgrad_clipnorm', dict(amsgrad=False)),
    ('adam_amsgrad_clipnorm', dict(clipnorm=None)),
    ('rmsprop_clipvalue', dict(clipvalue=None)),
], ids=lambda v: v if isinstance(v, str) else '-'.join(f'{k}={x}' for k, x in v.items()))
def test_each_option_changes_the_trajectory(case, without):
  # Guards the cases above against being vacuous: on these gradients the option matters.
  spec, lr, schedule = CASES[case]
  grads_seq = _gradients()
  got = _hhjax_run(spec, lr, schedule, grads_seq)[-1][0]
  other = _hhjax_run(dataclasses.replace(spec, **without), lr, schedule, grads_seq)[-1][0]
  assert not np.allclose(got['kernel'], other['kernel'], rtol=1e-3, atol=1e-5)


def test_two_clippings_are_refused_as_keras_refuses_them():
  with pytest.raises(ValueError, match='Only one of'):
    keras.optimizers.SGD(clipnorm=1.0, clipvalue=1.0)
  with pytest.raises(ValueError, match='Only one of config.optimizer.clipnorm'):
    keras_optim.train_transform(Opt('sgd', clipnorm=1.0, clipvalue=1.0), 0.1)


def test_accumulation_updates_only_every_n_micro_batches():
  spec, lr, schedule = CASES['rmsprop_decay_clipnorm_accumulation']
  ours = _hhjax_run(spec, lr, schedule, _gradients())
  kernels = [np.asarray(p['kernel']) for p, _, _ in ours]
  changed = [not np.array_equal(a, b) for a, b in zip([_initial()['kernel']] + kernels, kernels)]
  assert changed == [False, False, True, False, False, True, False, False]


@pytest.mark.parametrize('schedule', [
    Sched('cosine', decay_steps=7, alpha=0.1),
    Sched('cosine', decay_steps=7, alpha=0.0, warmup_target=0.5, warmup_steps=4),
    Sched('exponential', decay_steps=3, decay_rate=0.9),
    Sched('exponential', decay_steps=3, decay_rate=0.9, staircase=True),
    Sched('piecewise', boundaries=(0, 3, 10), values=(1.0, 0.5, 0.25, 0.125)),
], ids=lambda s: s.name + ('_warmup' if s.warmup_target else '')
   + ('_staircase' if s.staircase else ''))
def test_schedule_matches_keras_at_every_step(schedule):
  lr = 0.1
  keras_schedule = keras_classifiers.keras_schedule(keras, lr, schedule)
  ours = keras_optim.schedule(lr, schedule)
  steps = np.arange(0, 16)
  want = np.array([float(keras_schedule(int(s))) for s in steps])
  got = np.array([float(ours(jnp.asarray(s))) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_sgd_momentum_keeps_each_steps_rate_unlike_optax_sgd():
  # Guards the SGD case against being vacuous: optax.sgd scales the raw-gradient trace by the
  # current rate, which a changing rate tells apart from Keras's velocity of -lr * g.
  spec, lr, schedule = CASES['sgd_nesterov_piecewise']
  grads_seq = _gradients()
  want = _keras_run(spec, lr, schedule, grads_seq)[-1][0]
  tx = optax.sgd(keras_optim.schedule(lr, schedule), momentum=0.9, nesterov=True)
  params = {k: jnp.asarray(v) for k, v in _initial().items()}
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert not np.allclose(params['kernel'], want['kernel'], rtol=RTOL, atol=ATOL)


def test_adam_epsilon_placement_differs_from_optax_adam():
  # Guards the Adam cases: with gradients near epsilon, optax.adam (epsilon added to the
  # bias-corrected sqrt(v)) is told apart from Keras, and hhjax's Adam is not.
  lr = 1e-2
  grads_seq = [jax.tree.map(lambda g: g * 1e-6, grads) for grads in _gradients()]
  want = _keras_run(Opt('adam'), lr, Sched(), grads_seq)[-1][0]
  got = _hhjax_run(Opt('adam'), lr, Sched(), grads_seq)[-1][0]
  np.testing.assert_allclose(got['bias'], want['bias'], rtol=RTOL, atol=ATOL)
  tx = optax.adam(lr, eps=1e-7)
  params = {k: jnp.asarray(v) for k, v in _initial().items()}
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert not np.allclose(params['bias'], want['bias'], rtol=RTOL, atol=ATOL)


def test_default_rmsprop_keeps_its_optimizer_state_layout():
  # Checkpoints written before the options existed restore into the default optimizer.
  params = {'head': {'k': jnp.ones((2,))}}
  labels = {'head': {'k': 'train'}}
  state = optim.make_optimizer(labels, 0.1).init(params)
  before = optax.partition({'train': optim.keras_rmsprop(0.1),
                            'freeze': optax.set_to_zero()}, labels).init(params)
  assert jax.tree.structure(state) == jax.tree.structure(before)


def test_learning_rate_is_read_and_set_in_the_state():
  params = {'head': {'k': jnp.ones((2,))}}
  labels = {'head': {'k': 'train'}}
  tx = optim.make_optimizer(labels, 0.1, Opt('sgd', plateau=True))
  state = tx.init(params)
  assert keras_optim.current_learning_rate(state) == pytest.approx(0.1)
  state = keras_optim.set_learning_rate(state, 0.01)
  updates, state = tx.update({'head': {'k': jnp.ones((2,))}}, state, params)
  np.testing.assert_allclose(updates['head']['k'], -0.01, rtol=1e-6)
  assert keras_optim.current_learning_rate(state) == pytest.approx(0.01)
  constant = optim.make_optimizer(labels, 0.1, Opt('sgd')).init(params)
  assert keras_optim.current_learning_rate(constant) is None


@pytest.mark.parametrize('monitor,values', [
    ('val_loss', [1.0, 0.9, 0.95, 0.9, 0.91, 0.92, 0.93, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]),
    ('val_accuracy', [0.5, 0.6, 0.6, 0.6, 0.61, 0.6, 0.6, 0.6, 0.6, 0.6, 0.7, 0.7, 0.7]),
])
def test_reduce_lr_on_plateau_matches_keras_callback(monitor, values):
  spec = plateau.PlateauSpec(monitor=monitor, factor=0.5, patience=2, min_delta=0.005,
                                 cooldown=1, min_lr=0.02)
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss='mse',
                metrics=['accuracy'])
  callback = keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=0.5, patience=2,
                                               min_delta=0.005, cooldown=1, min_lr=0.02,
                                               mode='min' if 'loss' in monitor else 'max')
  callback.set_model(model)
  callback.on_train_begin()
  counters, rate = plateau.start(), np.float32(0.1)
  for epoch, value in enumerate(values):
    callback.on_epoch_end(epoch, {monitor: value})
    counters, new = plateau.step(spec, counters, value, float(rate))
    if new is not None:
      rate = np.float32(new)   # the state holds the rate in float32, as Keras's variable
    assert rate == np.float32(model.optimizer.learning_rate.numpy()), f'epoch {epoch}'
    assert (counters['wait'], counters['cooldown_counter']) == (
        callback.wait, callback.cooldown_counter), f'epoch {epoch}'
  assert rate < np.float32(0.1)   # the sequence reduces the rate at least once


def test_config_fields_reach_the_optimizer_and_the_phases():
  from configs import default  # pylint: disable=g-import-not-at-top
  from hhjax import entry  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  values = dict(name='sgd', momentum=0.5, nesterov=True, beta_1=0.8, beta_2=0.9,
                weight_decay=0.01, weight_decay_exclude=('bias',), global_clipnorm=2.0,
                gradient_accumulation_steps=4, use_ema=True, ema_momentum=0.9,
                ema_overwrite_frequency=5, rho=0.8, epsilon=1e-6)
  for name, value in values.items():
    config.optimizer[name] = value
  config.reduce_lr_on_plateau.monitor = 'val_accuracy'
  config.finetune.schedule.name = 'piecewise'
  config.finetune.schedule.boundaries = (3,)
  config.finetune.schedule.values = (0.1, 0.01)
  spec = entry.optimizer(config)
  assert {k: getattr(spec, k) for k in values} == values and spec.plateau
  clipped = default.get_config()
  clipped.optimizer.name, clipped.optimizer.amsgrad = 'adam', True
  clipped.optimizer.clipnorm = 1.5
  assert entry.optimizer(clipped) == Opt('adam', amsgrad=True, clipnorm=1.5)
  clipped.optimizer.clipnorm, clipped.optimizer.clipvalue = None, 0.25
  assert entry.optimizer(clipped) == Opt('adam', amsgrad=True, clipvalue=0.25)
  assert entry.plateau(config).monitor == 'val_accuracy'
  warmup, finetune = entry.phases(config)
  assert warmup.schedule == Sched()
  assert finetune.schedule == Sched('piecewise', boundaries=(3,), values=(0.1, 0.01))
  # Today's config: today's optimizer.
  assert entry.optimizer(default.get_config()) == Opt()
