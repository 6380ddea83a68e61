"""Per-layer learning rates: multipliers in the freezing rules and timm's layer decay.

Keras has no equivalent: one Keras optimizer has one learning rate for all its variables, so a
model whose layers train at different rates is not expressible with one optimizer (it takes
one optimizer per group, e.g. several optimizers stepped by hand). The reference here is
therefore optax's math: the phase's optimizer (Keras's RMSprop, proven equal to Keras in
test_optim.py) run on each group of parameters with its own learning rate, lr x factor.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hhjax.training import optim
from hhjax.training import phases
from hhjax.training import steps

BLOCKS = ('stem', 'mixed0', 'mixed1')
LR = 1e-2


class _Backbone(nn.Module):

  @nn.compact
  def __call__(self, x):
    for name in BLOCKS:
      x = jnp.tanh(nn.Dense(5, name=name)(x))
    return x


class _TinyClassifier(nn.Module):
  """Blocks named as the backbone's, then a head: the paths the rules match."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(1, name='head')(_Backbone(name='backbone')(x))


MODEL = _TinyClassifier()
RULES = (('^head/', 'train'), ('^backbone/mixed1/', 0.1), ('^backbone/mixed0/', 'train'),
         ('^backbone/', 'freeze'))
DECAY = 0.5
# timm's param_groups_layer_decay: layers stem, mixed0, mixed1, head; layer i of 4 gets
# decay ** (3 - i). Times the rules' multipliers; the stem is frozen.
EXPECTED = {'head': 1.0, 'mixed1': 0.1 * DECAY, 'mixed0': DECAY ** 2}


def _batch(seed):
  rng = np.random.default_rng(seed)
  return {'image': jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, 2, 8), jnp.int32)}


def _state(params, tx):
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'batch_stats': {},
          'opt_state': tx.init(params), 'rng': jax.random.PRNGKey(0),
          'metrics': steps.zero_metrics(), 'nonfinite_step': jnp.full((), -1, jnp.int32)}


@pytest.fixture(scope='module')
def params():
  return jax.jit(MODEL.init)(jax.random.PRNGKey(1), jnp.zeros((1, 4)))['params']


def _setup(params, rules=RULES, decay=DECAY):
  phase = phases.Phase('finetune', 1, LR, rules, None, layer_decay=decay, blocks=BLOCKS)
  return phases.setup(phase, params, optim.OptimizerSpec())


def _group(path):
  return path[0] if path[0] == 'head' else path[1]


def test_layer_decay_factors_are_timms():
  factors = optim.layer_decay_factors(('stem', 'mixed0', 'mixed1', 'mixed2'), 0.65)
  layer_max = 4   # timm: layer_scales = [decay ** (layer_max - i) for i in range(layer_max + 1)]
  timm = [0.65 ** (layer_max - i) for i in range(layer_max + 1)]   # the last one is the head's
  assert list(factors.values()) == pytest.approx(timm[:-1], rel=1e-15)


def test_multipliers_combine_rules_and_layer_decay(params):
  setup = _setup(params)
  flat = jax.tree_util.tree_flatten_with_path(setup.multipliers)[0]
  for path, factor in flat:
    keys = tuple(k.key for k in path)
    assert factor == pytest.approx(EXPECTED.get(_group(keys), 1.0), rel=1e-12), keys
  assert setup.labels['backbone']['mixed1']['kernel'] == 'train'   # a multiplier trains


def test_steps_with_multipliers_equal_rmsprop_at_each_groups_rate(params):
  setup = _setup(params)
  step = jax.jit(steps.make_train_step(MODEL, setup))
  state = _state(params, setup.tx)
  # The reference: per group, Keras's RMSprop at lr x factor, on the same gradients.
  txs = {g: optim.keras_rmsprop(LR * f) for g, f in EXPECTED.items()}
  ref = jax.tree.map(jnp.asarray, params)
  trainable = lambda p: {'head': p['head'], 'mixed0': p['backbone']['mixed0'],
                         'mixed1': p['backbone']['mixed1']}
  ref_states = {g: txs[g].init(v) for g, v in trainable(ref).items()}

  def loss(p, batch):
    logits = MODEL.apply({'params': p}, batch['image'])
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits[:, 0],
                                                       batch['label'].astype(jnp.float32)))

  @jax.jit
  def ref_step(ref, ref_states, batch):
    grads = trainable(jax.grad(loss)(ref, batch))
    new, new_states = {}, {}
    for g, v in trainable(ref).items():
      updates, new_states[g] = txs[g].update(grads[g], ref_states[g], v)
      new[g] = optax.apply_updates(v, updates)
    return {'head': new['head'],
            'backbone': {'stem': ref['backbone']['stem'], 'mixed0': new['mixed0'],
                         'mixed1': new['mixed1']}}, new_states

  for i in range(3):
    batch = _batch(i)
    state = step(state, batch)
    ref, ref_states = ref_step(ref, ref_states, batch)
  for (path, ours), theirs in zip(jax.tree_util.tree_flatten_with_path(state['params'])[0],
                                  jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-8,
                               err_msg=str(path))
  # The rates differ enough that one rate for all would not pass the comparison above.
  plain = _setup(params, rules=tuple((p, 'train' if l != 'freeze' else l) for p, l in RULES),
                 decay=1.0)
  plain_state = jax.jit(steps.make_train_step(MODEL, plain))(_state(params, plain.tx),
                                                            _batch(0))
  assert not np.allclose(plain_state['params']['backbone']['mixed1']['kernel'],
                         state['params']['backbone']['mixed1']['kernel'], rtol=1e-3)
  # The frozen stem comes out bit-identical.
  for ours, start in zip(jax.tree.leaves(state['params']['backbone']['stem']),
                         jax.tree.leaves(params['backbone']['stem'])):
    assert np.array_equal(np.asarray(ours), np.asarray(start))


def _dots(setup, params):
  state = jax.eval_shape(lambda: _state(params, setup.tx))
  jaxpr = jax.make_jaxpr(steps.make_train_step(MODEL, setup))(state, _batch(0)).jaxpr
  return sum(eqn.primitive.name == 'dot_general' for eqn in jaxpr.eqns)


def test_multipliers_add_no_backward_pass_through_frozen_parameters(params):
  with_rates = _dots(_setup(params), params)
  same_set = _dots(_setup(params, rules=(('^head/', 'train'), ('^backbone/mixed', 'train'),
                                         ('^backbone/', 'freeze')), decay=1.0), params)
  everything = _dots(_setup(params, rules=(('.*', 'train'),), decay=1.0), params)
  assert with_rates == same_set < everything   # the stem is not differentiated


def test_all_factors_one_builds_the_plain_optimizer_and_the_same_step(params):
  rules = (('^head/', 'train'), ('^backbone/mixed1/', 1.0), ('^backbone/', 'freeze'))
  setup = _setup(params, rules=rules, decay=1.0)
  assert setup.multipliers is None
  labels = optim.param_labels(params, rules)
  plain = phases.PhaseSetup(setup.phase, labels, optim.make_optimizer(labels, LR))
  state = jax.eval_shape(lambda: _state(params, plain.tx))
  assert (str(jax.make_jaxpr(steps.make_train_step(MODEL, setup))(state, _batch(0)))
          == str(jax.make_jaxpr(steps.make_train_step(MODEL, plain))(state, _batch(0))))


@pytest.mark.parametrize('label', [0, -0.5, float('nan'), True, 'thaw'])
def test_a_bad_rule_label_is_refused(params, label):
  with pytest.raises(ValueError, match='multiplier > 0'):
    optim.param_labels(params, (('.*', label),))


def test_multipliers_scale_the_update_before_accumulation_and_the_ema_see_it():
  # A parameter at factor 0.5 trains, accumulates and is averaged exactly as it would alone at
  # half the rate: the EMA averages the weights the scaled updates produce.
  spec = optim.OptimizerSpec(name='adam', use_ema=True, ema_momentum=0.9,
                             gradient_accumulation_steps=2)
  params = {'a': jnp.ones((3,)), 'b': jnp.full((2,), 2.0)}
  train = {'a': optim.TRAIN, 'b': optim.TRAIN}
  both = optim.make_optimizer(train, LR, spec, multipliers={'a': 0.5, 'b': 1.0})
  alone = optim.make_optimizer({'a': optim.TRAIN}, LR * 0.5, spec)
  p_both, s_both = params, both.init(params)
  p_alone, s_alone = {'a': params['a']}, alone.init({'a': params['a']})
  for step in range(6):
    g = {'a': jnp.arange(3.0) - step, 'b': jnp.ones((2,)) * step}
    u, s_both = both.update(g, s_both, p_both)
    p_both = optax.apply_updates(p_both, u)
    u, s_alone = alone.update({'a': g['a']}, s_alone, p_alone)
    p_alone = optax.apply_updates(p_alone, u)
  np.testing.assert_array_equal(p_both['a'], p_alone['a'])
  assert not np.allclose(p_both['a'], params['a'])
  ema_both = optim.inference_params({'params': p_both, 'opt_state': s_both})
  ema_alone = optim.inference_params({'params': p_alone, 'opt_state': s_alone})
  np.testing.assert_array_equal(ema_both['a'], ema_alone['a'])
  assert not np.allclose(ema_both['a'], p_both['a'])
