"""Keras-exact RMSprop and freezing labels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hhjax.training import optim


def _gradient_sequence(shapes, steps, seed=0):
  rng = np.random.default_rng(seed)
  # Mixed magnitudes, including tiny gradients where epsilon's place matters.
  scales = [1.0, 1e-3, 1e-5, 10.0, 1.0]
  return [[(rng.standard_normal(s) * scales[i % len(scales)]).astype(np.float32)
           for s in shapes] for i in range(steps)]


def _optax_run(params, grads_seq, lr):
  tx = optim.keras_rmsprop(lr)
  params = [jnp.asarray(p) for p in params]
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = tx.update([jnp.asarray(g) for g in grads], state, params)
    params = optax.apply_updates(params, updates)
  return [np.asarray(p) for p in params]


@pytest.fixture(scope='module')
def problem():
  rng = np.random.default_rng(1)
  shapes = [(4, 5), (7,)]
  params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  return params, _gradient_sequence(shapes, steps=6), 1e-2


def test_keras_rmsprop_matches_keras3(problem):
  keras = pytest.importorskip('keras')
  params, grads_seq, lr = problem
  variables = [keras.Variable(p.copy()) for p in params]
  opt = keras.optimizers.RMSprop(learning_rate=lr)   # defaults: rho 0.9, epsilon 1e-7
  for grads in grads_seq:
    opt.apply([g.copy() for g in grads], variables)
  ours = _optax_run(params, grads_seq, lr)
  for theirs, mine in zip(variables, ours):
    np.testing.assert_allclose(mine, np.asarray(theirs), rtol=2e-6, atol=1e-7)


def test_keras_rmsprop_matches_tf_keras(problem):
  tf_keras = pytest.importorskip('tf_keras')
  import tensorflow as tf
  params, grads_seq, lr = problem
  variables = [tf.Variable(p.copy()) for p in params]
  opt = tf_keras.optimizers.RMSprop(learning_rate=lr)
  for grads in grads_seq:
    opt.apply_gradients([(tf.constant(g), v) for g, v in zip(grads, variables)])
  ours = _optax_run(params, grads_seq, lr)
  for theirs, mine in zip(variables, ours):
    np.testing.assert_allclose(mine, theirs.numpy(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize('variant', [
    dict(eps=1e-8),                        # optax's default epsilon
    dict(eps=1e-7, eps_in_sqrt=False),     # epsilon outside the square root
])
def test_near_miss_rmsprop_variants_are_told_apart(problem, variant):
  # Guards the parity tests against being vacuous: the tolerance they use separates these.
  params, grads_seq, lr = problem
  tx = optax.rmsprop(lr, decay=0.9, **variant)
  p = [jnp.asarray(x) for x in params]
  state = tx.init(p)
  for grads in grads_seq:
    updates, state = tx.update([jnp.asarray(g) for g in grads], state, p)
    p = optax.apply_updates(p, updates)
  ours = _optax_run(params, grads_seq, lr)
  assert not all(np.allclose(np.asarray(a), b, rtol=2e-6, atol=1e-7) for a, b in zip(p, ours))


PARAMS = {
    'backbone': {
        'stem': {'conv_1': {'conv': {'kernel': np.zeros(3)}, 'bn': {'bias': np.zeros(1)}}},
        'mixed0': {'branch1x1': {'conv': {'kernel': np.zeros(2)}}},
        'mixed1': {'branch1x1': {'conv': {'kernel': np.zeros(2)}}},
    },
    'head': {'hidden': {'kernel': np.zeros(2), 'bias': np.zeros(1)}},
}


def test_param_labels_first_match_wins():
  rules = [('^backbone/mixed1/', 'train'), ('^backbone/', 'freeze'), ('.*', 'train')]
  labels = optim.param_labels(PARAMS, rules)
  assert labels['backbone']['mixed1']['branch1x1']['conv']['kernel'] == 'train'
  assert labels['backbone']['mixed0']['branch1x1']['conv']['kernel'] == 'freeze'
  assert labels['backbone']['stem']['conv_1']['bn']['bias'] == 'freeze'
  assert labels['head']['hidden']['kernel'] == 'train'


def test_param_labels_uncovered_parameter_is_named():
  with pytest.raises(ValueError, match=r'(?s)2 parameters match no freezing rule.*'
                                       r'backbone/stem/conv_1/conv/kernel'):
    optim.param_labels(PARAMS, [('^head/', 'train'), ('^backbone/mixed', 'freeze')])


def test_param_labels_unknown_label_is_an_error():
  with pytest.raises(ValueError, match="label must be one of"):
    optim.param_labels(PARAMS, [('.*', 'frozen')])


def test_finetune_rules_open_blocks_from_unfreeze_from():
  endpoints = ('mixed0', 'mixed1')
  labels = optim.param_labels(PARAMS, optim.finetune_rules('mixed1', endpoints))
  assert labels['backbone']['mixed1']['branch1x1']['conv']['kernel'] == 'train'
  assert labels['backbone']['mixed0']['branch1x1']['conv']['kernel'] == 'freeze'
  assert labels['head']['hidden']['bias'] == 'train'
  everything = optim.param_labels(PARAMS, optim.finetune_rules('stem', endpoints))
  assert set(jax.tree.leaves(everything)) == {'train'}


def test_finetune_rules_unknown_block_lists_valid_ones():
  with pytest.raises(ValueError, match=r"mixed7.*'stem'.*'mixed0', 'mixed1'"):
    optim.finetune_rules('mixed7', ('mixed0', 'mixed1'))


def test_make_optimizer_leaves_frozen_parameters_alone():
  params = jax.tree.map(lambda x: jnp.ones_like(x, jnp.float32), PARAMS)
  labels = optim.param_labels(params, [('^head/', 'train'), ('.*', 'freeze')])
  tx = optim.make_optimizer(labels, 0.1)
  state = tx.init(params)
  # Optimizer state only for the trainable leaves.
  assert sum(x.size for x in jax.tree.leaves(state)) == optim.count(params['head'])
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  assert all(np.all(u == 0) for u in jax.tree.leaves(updates['backbone']))
  assert all(np.all(u < 0) for u in jax.tree.leaves(updates['head']))


def test_split_and_merge_round_trip():
  labels = optim.param_labels(PARAMS, [('^head/', 'train'), ('.*', 'freeze')])
  trainable, frozen = optim.split(PARAMS, labels)
  assert list(trainable) == ['head'] and list(frozen) == ['backbone']
  merged = optim.merge(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(PARAMS)
