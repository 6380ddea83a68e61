"""Training the head on cached backbone features takes the steps training on images takes."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import smoke
from hhjax import entry
from hhjax import sharding
from hhjax import train
from hhjax.data import pipeline
from hhjax.data import spec as data_spec
from hhjax.training import feature_cache
from hhjax.training import state as state_lib
from hhjax.training import steps


def _cache_args(config):
  """(data, cache settings) as the training run unpacks them from `config`."""
  return entry.data(config), entry.feature_cache(config)


def _spec(config):
  """What the input pipeline reads of `config`."""
  return data_spec.DataSpec.from_config(config)


STEPS = 4


def small_config():
  config = smoke.get_config()
  config.data.augment.enabled = False
  config.data.fake.num_train_examples = 10   # not a multiple of the batch: epochs straddle
  config.finetune.epochs = 0
  return config


@pytest.fixture(scope='module')
def prepared():
  config = small_config()
  mesh = sharding.make_mesh()
  model = entry.model(config, config.data.fake.num_classes)
  phase = entry.phases(config)[0]
  variables = state_lib.init_variables(model, config.data.image_size, config.seed)
  # Nonzero BatchNorm statistics, so that the cached backbone does real work.
  rng = np.random.default_rng(0)
  variables['batch_stats'] = jax.tree.map(
      lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape), jnp.float32),
      variables['batch_stats'])
  setup = entry.setup_for(config)(phase, variables['params'])
  state = state_lib.build_state(variables, setup.tx, config.seed)
  return config, mesh, model, setup, state


def test_cached_steps_equal_steps_on_images(prepared):
  config, mesh, model, setup, state = prepared
  assert feature_cache.wanted(*_cache_args(config), setup)
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  start = 3   # resume mid-epoch: the cache follows the pipeline's stream from any step
  state = dict(state, step=jnp.asarray(start, jnp.int32))

  step = jax.jit(steps.make_train_step(model, setup), in_shardings=(repl, data),
                 out_shardings=repl)
  on_images, stream = state, pipeline.create_dataset(
      _spec(config), config.data.train_split, start_step=start).as_numpy_iterator()
  image_labels = []
  for _ in range(STEPS):
    batch = next(stream)
    image_labels.append(batch['label'])
    on_images = step(on_images, sharding.to_global(batch, mesh))

  cache = feature_cache.FeatureCache(model, state, entry.data(config), mesh)
  assert cache.num_examples == config.data.fake.num_train_examples
  cached_step = cache.train_step(setup)
  # The cached step donates its state, as training does: give it a copy.
  on_features, batches = jax.tree.map(jnp.copy, state), cache.batches(start_step=start)
  for expected_labels in image_labels:
    batch = next(batches)
    np.testing.assert_array_equal(batch['label'], expected_labels)
    on_features = cached_step(on_features, sharding.to_global(batch, mesh))

  assert int(on_features['step']) == int(on_images['step']) == start + STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               on_features['params']['head'], on_images['params']['head'])
  jax.tree.map(np.testing.assert_array_equal, on_features['params']['backbone'],
               state['params']['backbone'])
  np.testing.assert_allclose(on_features['metrics']['loss_sum'],
                             on_images['metrics']['loss_sum'], rtol=1e-5)
  assert int(on_features['metrics']['correct']) == int(on_images['metrics']['correct'])


def test_cached_eval_batches_hold_the_backbone_output(prepared):
  config, mesh, model, _, state = prepared
  batches = feature_cache.compute_features(model, state['params'], state['batch_stats'],
                                           entry.data(config), entry.data(config).validation, mesh)
  images = next(pipeline.create_dataset(_spec(config), entry.data(config).validation)
                .as_numpy_iterator())
  full = jax.jit(lambda v, x: model.apply(v, x))(
      {'params': state['params'], 'batch_stats': state['batch_stats']}, images['image'])
  head = jax.jit(lambda v, x: model.apply(v, x, from_features=True))(
      {'params': state['params'], 'batch_stats': state['batch_stats']}, batches[0]['image'])
  np.testing.assert_allclose(head, full, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(batches[0]['mask'], images['mask'])
  total = sum(int(b['mask'].sum()) for b in batches)
  assert total == config.data.fake.num_eval_examples


def test_cache_on_where_impossible_says_why(prepared):
  _, _, _, setup, _ = prepared
  config = small_config()
  config.data.augment.enabled = True
  assert not feature_cache.wanted(*_cache_args(config), setup)   # 'auto' steps aside quietly
  config.speed.cache_features = 'on'
  with pytest.raises(ValueError, match='augmentation is on'):
    feature_cache.wanted(*_cache_args(config), setup)


@pytest.mark.parametrize('spelling, cached', [('yes', True), (True, True), ('OFF', False),
                                               (False, False), (None, True)])
def test_cache_switch_reads_every_spelling_the_speed_rewrites_read(prepared, spelling, cached):
  # One parser for every on/off/auto field: config.speed.fold_bn='yes' and
  # config.speed.cache_features='yes' mean the same.
  _, _, _, setup, _ = prepared
  values = small_config().to_dict()
  values['speed']['cache_features'] = spelling     # as a config.json may hold it
  assert feature_cache.wanted(*_cache_args(ml_collections.ConfigDict(values)), setup) == cached


@pytest.mark.parametrize('mode', ['auto', 'on'])
def test_cache_is_not_used_when_the_backbone_trains(prepared, mode):
  _, _, _, _, state = prepared
  config = small_config()
  config.speed.cache_features = mode
  config.finetune.epochs = 1
  warmup, finetune = (entry.setup_for(config)(phase, state['params'])
                      for phase in entry.phases(config))
  assert not feature_cache.wanted(*_cache_args(config), finetune)
  assert feature_cache.wanted(*_cache_args(config), warmup)
  config.speed.cache_features = 'off'
  assert not feature_cache.wanted(*_cache_args(config), warmup)


def test_cache_larger_than_the_limit_is_skipped_or_an_error(prepared):
  config, mesh, model, setup, state = prepared
  config = small_config()
  config.speed.cache_features_max_mb = 0.001
  assert feature_cache.for_phase(model, setup, state, *_cache_args(config), mesh, 10) is None
  config.speed.cache_features = 'on'
  with pytest.raises(ValueError, match='cache_features_max_mb'):
    feature_cache.for_phase(model, setup, state, *_cache_args(config), mesh, 10)


def test_training_with_the_cache_ends_where_training_on_images_ends(tmp_path, monkeypatch):
  config = small_config()
  config.steps_per_epoch = 3
  config.warmup.epochs = 2
  config.finetune.epochs = 1   # the phase after the cached one streams images from its step
  built = []

  class Spy(feature_cache.FeatureCache):
    def __init__(self, *args, **kwargs):
      built.append(True)
      super().__init__(*args, **kwargs)

  monkeypatch.setattr(feature_cache, 'FeatureCache', Spy)
  steps_built = []
  make_train_step = steps.make_train_step
  monkeypatch.setattr(steps, 'make_train_step',
                      lambda *a, **k: steps_built.append(1) or make_train_step(*a, **k))
  results, step_counts = {}, {}
  for mode in ('on', 'off'):
    config.speed.cache_features = mode
    results[mode] = train.train_and_evaluate(config, str(tmp_path / mode))
    step_counts[mode], steps_built[:] = len(steps_built), []
  assert built == [True]   # the warm-up only; the fine-tuning trains the backbone
  # One train step per phase: the cached phase builds none on images to throw away.
  assert step_counts == {'on': 2, 'off': 2}
  on, off = results['on'], results['off']
  assert on['step'] == off['step'] == 9
  np.testing.assert_allclose(on['loss'], off['loss'], rtol=1e-4)
  assert on['confusion'] == off['confusion']
  rows = {mode: [json.loads(line) for line in open(tmp_path / mode / 'metrics.jsonl')]
          for mode in ('on', 'off')}
  assert len(rows['on']) == len(rows['off']) == 3
  for a, b in zip(rows['on'], rows['off']):
    np.testing.assert_allclose([a['train_loss'], a['val_loss']], [b['train_loss'], b['val_loss']],
                               rtol=1e-4)


def test_cached_features_of_uint8_batches_are_those_of_the_normalised_images(prepared):
  config, mesh, model, _, state = prepared
  config = config.copy_and_resolve_references()
  config.data.image_dtype = 'uint8'     # pixels travel as bytes; the model normalises them
  batches = feature_cache.compute_features(model, state['params'], state['batch_stats'],
                                           entry.data(config), entry.data(config).validation, mesh)
  images = next(pipeline.create_dataset(_spec(config), entry.data(config).validation)
                .as_numpy_iterator())
  assert images['image'].dtype == np.uint8
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  full = jax.jit(lambda v, x: model.apply(v, x))(variables, images['image'])
  head = jax.jit(lambda v, x: model.apply(v, x, from_features=True))(variables,
                                                                      batches[0]['image'])
  np.testing.assert_allclose(head, full, rtol=1e-5, atol=1e-6)
