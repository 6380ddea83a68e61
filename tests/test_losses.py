"""config.loss: label smoothing and class weights, each equal to Keras's.

The loss values are compared with `keras.losses.BinaryCrossentropy` /
`CategoricalCrossentropy(label_smoothing=...)`, and training with class weights with Keras's
`train_on_batch(class_weight=...)` on a tiny Dense model (the loss semantics do not need a
CNN): hhjax's real train step (`steps.make_train_step`) and Keras's RMSprop, step by step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import smoke
from hhjax import errors
from hhjax import sharding
from hhjax.data import pipeline
from hhjax.data import spec as data_spec
from hhjax.training import evaluation
from hhjax.training import losses
from hhjax.training import optim
from hhjax.training import phases
from hhjax.training import steps

keras = pytest.importorskip('keras')

SMOOTHINGS = (0.0, 0.1, 0.3)


def _problem(num_classes, n=12, seed=0):
  rng = np.random.default_rng(seed)
  outputs = 1 if num_classes == 2 else num_classes
  logits = (rng.standard_normal((n, outputs)) * 3).astype(np.float32)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  return logits, labels


def _keras_loss(num_classes, smoothing, **kwargs):
  if num_classes == 2:
    return keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=smoothing,
                                           **kwargs)
  return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing,
                                              **kwargs)


def _keras_targets(labels, num_classes):
  if num_classes == 2:
    return labels[:, None].astype(np.float32)
  return np.eye(num_classes, dtype=np.float32)[labels]


@pytest.mark.parametrize('num_classes', [2, 3])
@pytest.mark.parametrize('smoothing', SMOOTHINGS)
def test_label_smoothing_per_example_loss_equals_keras(num_classes, smoothing):
  logits, labels = _problem(num_classes)
  theirs = _keras_loss(num_classes, smoothing, reduction=None)(
      _keras_targets(labels, num_classes), logits)
  ours = losses.per_example_loss(jnp.asarray(logits), jnp.asarray(labels), smoothing)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('num_classes', [2, 3])
def test_smoothing_changes_the_loss_by_more_than_the_tolerance(num_classes):
  # Guards the parity test above against being vacuous.
  logits, labels = _problem(num_classes)
  plain = losses.per_example_loss(jnp.asarray(logits), jnp.asarray(labels), 0.0)
  smoothed = losses.per_example_loss(jnp.asarray(logits), jnp.asarray(labels), 0.1)
  assert np.max(np.abs(np.asarray(plain) - np.asarray(smoothed))) > 1e-2


@pytest.mark.parametrize('num_classes', [2, 3])
def test_class_weighted_batch_loss_is_keras_sum_over_batch_size(num_classes):
  logits, labels = _problem(num_classes)
  weights = (0.5, 2.0, 3.0)[:num_classes]
  spec = losses.LossSpec(label_smoothing=0.1, class_weights=weights)
  sample_weight = np.asarray(weights, np.float32)[labels]
  theirs = float(_keras_loss(num_classes, 0.1)(_keras_targets(labels, num_classes), logits,
                                               sample_weight=sample_weight))
  ours = float(losses.batch_loss(jnp.asarray(logits), jnp.asarray(labels), spec))
  assert ours == pytest.approx(theirs, rel=1e-6)
  # Not the mean over the weights' sum (Keras's 'mean_with_sample_weight'):
  assert ours != pytest.approx(theirs * len(labels) / sample_weight.sum(), rel=1e-3)


class _TinyClassifier(nn.Module):
  """A Dense layer as hhjax's classifier is called (`train`, dropout rng), params under 'head'."""
  outputs: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(self.outputs, name='head')(x)


def _keras_dense(num_classes, smoothing, kernel, bias, lr):
  inputs = keras.Input((kernel.shape[0],))
  model = keras.Model(inputs, keras.layers.Dense(kernel.shape[1])(inputs))
  model.layers[-1].set_weights([kernel, bias])
  model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=lr),
                loss=_keras_loss(num_classes, smoothing), jit_compile=False)
  return model


# Class weights as the config gives them: by name, by index, and 'balanced'.
FIT_CASES = [
    (2, 0.0, {'class_1': 3.0}),
    (2, 0.1, 'balanced'),
    (3, 0.1, {0: 0.5, 'class_2': 2.5}),
]


@pytest.mark.parametrize('num_classes, smoothing, class_weight', FIT_CASES,
                         ids=[f'{k}classes-s{s}-{w}' for k, s, w in FIT_CASES])
def test_train_steps_with_class_weights_equal_keras_fit(num_classes, smoothing, class_weight):
  """Per-step losses within 1e-4 relative and parameters within 1e-2 of Keras's change."""
  rng = np.random.default_rng(3)
  dim, batch, num_steps, lr = 6, 8, 5, 1e-2
  outputs = 1 if num_classes == 2 else num_classes
  # An imbalanced training split: class 0 is most of it.
  labels = np.minimum(rng.geometric(0.6, batch * num_steps) - 1, num_classes - 1)
  labels = labels.astype(np.int32)
  images = (rng.standard_normal((batch * num_steps, dim)) + labels[:, None]).astype(np.float32)
  kernel = (rng.standard_normal((dim, outputs)) * 0.3).astype(np.float32)
  bias = np.zeros(outputs, np.float32)
  names = [f'class_{i}' for i in range(num_classes)]
  counts = np.bincount(labels, minlength=num_classes)
  spec = losses.LossSpec(smoothing, losses.resolve_class_weights(class_weight, names, counts))

  model = _TinyClassifier(outputs)
  params = {'head': {'kernel': jnp.asarray(kernel), 'bias': jnp.asarray(bias)}}
  phase = phases.Phase('warmup', 1, lr, (('.*', 'train'),), None)
  setup = phases.setup(phase, params, optim.OptimizerSpec(), spec)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'batch_stats': {},
           'opt_state': setup.tx.init(params), 'rng': jax.random.PRNGKey(0),
           'metrics': steps.zero_metrics(), 'nonfinite_step': jnp.full((), -1, jnp.int32)}
  step = jax.jit(steps.make_train_step(model, setup))

  keras_model = _keras_dense(num_classes, smoothing, kernel, bias, lr)
  keras_weight = dict(enumerate(spec.class_weights))
  ours, theirs = [], []
  for i in range(num_steps):
    x, y = images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]
    before = float(state['metrics']['loss_sum'])
    state = step(state, {'image': jnp.asarray(x), 'label': jnp.asarray(y)})
    ours.append((float(state['metrics']['loss_sum']) - before) / batch)
    theirs.append(float(keras_model.train_on_batch(x, _keras_targets(y, num_classes),
                                                   class_weight=keras_weight)))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4)
  k_kernel, k_bias = keras_model.layers[-1].get_weights()
  for mine, keras_value, start in ((state['params']['head']['kernel'], k_kernel, kernel),
                                   (state['params']['head']['bias'], k_bias, bias)):
    change = np.max(np.abs(keras_value - start))
    assert change > 1e-3   # the steps moved the weights: the comparison can fail
    gap = np.max(np.abs(np.asarray(mine) - keras_value)) / change
    print(f'parameters: max |ours - Keras| / Keras change = {gap:.1e}')   # shown with -s
    assert gap <= 1e-2


@pytest.mark.parametrize('num_classes', [2, 3])
def test_eval_loss_is_keras_val_loss_smoothed_and_unweighted(num_classes):
  """Keras's evaluate (and fit's val_loss) uses the compiled loss, smoothing included; class
  weights are a fit argument for the training data only."""
  rng = np.random.default_rng(5)
  n, dim = 10, 4
  outputs = 1 if num_classes == 2 else num_classes
  images = rng.standard_normal((n, dim)).astype(np.float32)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  kernel = rng.standard_normal((dim, outputs)).astype(np.float32)
  bias = np.zeros(outputs, np.float32)
  keras_model = _keras_dense(num_classes, 0.2, kernel, bias, 1e-3)
  theirs = keras_model.evaluate(images, _keras_targets(labels, num_classes), batch_size=n,
                                verbose=0)
  mesh = sharding.make_mesh()
  batches = lambda: [{'image': images, 'label': labels, 'mask': np.ones(n, np.float32)}]
  evaluator = evaluation.Evaluator(_TinyClassifier(outputs), num_classes, mesh, batches,
                                   label_smoothing=0.2)
  ours = evaluator({'head': {'kernel': kernel, 'bias': bias}}, {})['loss']
  assert ours == pytest.approx(float(theirs), rel=1e-5)


def test_balanced_weights_equal_scikit_learn():
  sklearn_weights = pytest.importorskip('sklearn.utils.class_weight')
  labels = np.array([0] * 7 + [1] * 2 + [2] * 3)
  ours = losses.balanced_weights(np.bincount(labels))
  theirs = sklearn_weights.compute_class_weight('balanced', classes=np.arange(3), y=labels)
  np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_class_weight_mapping_by_name_or_index_and_left_out_classes_weigh_one():
  names = ['cats', 'dogs', 'birds']
  assert losses.resolve_class_weights({'dogs': 2.0, 2: 0.5}, names) == (1.0, 2.0, 0.5)
  assert losses.resolve_class_weights('cats=3,1=0.25', names) == (3.0, 0.25, 1.0)
  assert losses.resolve_class_weights(ml_collections.ConfigDict({'0': 4.0}), names) == (
      4.0, 1.0, 1.0)   # a config.json's mapping: keys are text
  assert losses.resolve_class_weights(None, names) is None


def test_class_weight_naming_no_class_is_a_config_error():
  with pytest.raises(errors.ConfigError, match=r"'horses'.*\['cats', 'dogs'\]"):
    losses.resolve_class_weights({'horses': 2.0}, ['cats', 'dogs'])
  with pytest.raises(errors.ConfigError, match='index'):
    losses.resolve_class_weights({5: 2.0}, ['cats', 'dogs'])


def test_balanced_needs_every_class_in_the_training_split():
  with pytest.raises(errors.DataError, match=r'\[1\] have no training example'):
    losses.resolve_class_weights('balanced', ['a', 'b'], (4, 0))


def test_class_counts_come_from_the_training_table():
  config = smoke.get_config()
  config.data.fake.num_train_examples = 10
  config.data.fake.num_classes = 3
  spec = data_spec.DataSpec.from_config(config)
  assert pipeline.class_counts(spec, 'train') == (4, 3, 3)   # labels are index % 3


def test_class_counts_of_records_read_on_demand_come_from_their_labels():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from hhjax.data import records  # pylint: disable=g-import-not-at-top

  def example(label):
    return tf.train.Example(features=tf.train.Features(feature={
        'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[b'x'])),
        'label': tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))}
    )).SerializeToString()

  split = records.Records([example(label) for label in (1, 0, 1, 1)], 'test:train')
  np.testing.assert_array_equal(split.labels(), [1, 0, 1, 1])
