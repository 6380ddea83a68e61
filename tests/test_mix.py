"""config.data.mix: mixup and CutMix in the train step, against their definitions (timm's Mixup
in 'batch' mode, Beta(alpha, alpha) by scipy) and, for the soft-target loss, against Keras."""

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import smoke
from hhjax import config_checks
from hhjax import errors
from hhjax import train
from hhjax.data import spec as data_spec
from hhjax.training import feature_cache
from hhjax.training import losses
from hhjax.training import mix
from hhjax.training import optim
from hhjax.training import phases
from hhjax.training import steps

HEIGHT, WIDTH = 12, 9
N = 4000
# Both kinds at alpha 1, a batch mixed 60 % of the time, CutMix in a quarter of those.
SHARED = data_spec.MixSpec(mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25)


def _draws(spec, n, seed=0, height=HEIGHT, width=WIDTH):
  """The draws of steps 0 .. n-1, as numpy."""
  drawn = jax.jit(jax.vmap(lambda s: mix.draw(mix.key(seed, s), spec, height, width)))(
      jnp.arange(n))
  return {k: np.asarray(v) for k, v in drawn.items()}


@pytest.fixture(scope='module')
def shared():
  return _draws(SHARED, N)


def _batch(b=6, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (b, HEIGHT, WIDTH, 3)).astype(np.float32)
  labels = rng.integers(0, 3, b).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def _ks_pvalue(lam, alpha):
  stats = pytest.importorskip('scipy.stats')
  return stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue


def test_lambda_follows_beta_alpha_alpha(shared):
  mixed = shared['beta'] < 1
  for kind in (shared['cutmix'], ~shared['cutmix']):   # CutMix's draw before its correction
    assert _ks_pvalue(shared['beta'][mixed & kind], 1.0) > 1e-3
  small = _draws(data_spec.MixSpec(mixup_alpha=0.2, cutmix_alpha=0.2), N)   # U-shaped
  assert np.all((small['beta'] >= 0) & (small['beta'] <= 1))
  assert _ks_pvalue(small['beta'], 0.2) > 1e-3
  assert _ks_pvalue(small['beta'], 0.3) < 1e-6   # the test tells alphas apart
  mixup = ~small['cutmix']
  np.testing.assert_array_equal(small['lam'][mixup], small['beta'][mixup])


def test_a_whole_image_box_leaves_lambda_zero_not_below():
  # Tiny alpha: lambda near 0 often, boxes of the whole image now and then (12 x 12, where
  # 1 - 144 * (1 / 144), XLA's way to divide by a constant, falls below 0).
  tiny = _draws(data_spec.MixSpec(cutmix_alpha=0.01), 2000, height=12, width=12)
  assert np.any(tiny['lam'] == 0)
  assert np.all((tiny['lam'] >= 0) & (tiny['lam'] <= 1))


def test_prob_and_switch_prob_as_timm(shared):
  mixed = shared['beta'] < 1
  # Binomial counts within 4.5 standard deviations.
  assert abs(mixed.mean() - 0.6) < 4.5 * np.sqrt(0.6 * 0.4 / N)
  cutmix = shared['cutmix'][mixed]
  assert abs(cutmix.mean() - 0.25) < 4.5 * np.sqrt(0.25 * 0.75 / mixed.sum())
  assert not shared['cutmix'][~mixed].any()
  np.testing.assert_array_equal(shared['lam'][~mixed], 1.0)


def _timm_rand_bbox(height, width, lam, cy, cx):
  """timm.data.mixup.rand_bbox (margin 0), the centre given."""
  ratio = np.sqrt(1 - lam)
  cut_h, cut_w = int(height * ratio), int(width * ratio)
  yl, yh = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
  xl, xh = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
  return yl, yh, xl, xh


def _at(drawn, step):
  return {k: jnp.asarray(v[step]) for k, v in drawn.items()}


def test_cutmix_pastes_timms_box_and_the_label_weight_is_its_area_exactly(shared):
  images, labels = _batch()
  partial = 0
  for step in np.flatnonzero(shared['cutmix'])[:30]:
    drawn = _at(shared, step)
    # The centre timm would draw with np.random.randint, from the same keys.
    keys = jax.random.split(mix.key(0, int(step)), 6)
    cy = int(jax.random.randint(keys[4], (), 0, HEIGHT))
    cx = int(jax.random.randint(keys[5], (), 0, WIDTH))
    box = _timm_rand_bbox(HEIGHT, WIDTH, float(drawn['beta']), cy, cx)
    assert tuple(int(v) for v in drawn['box']) == tuple(int(v) for v in box)
    inside = np.zeros((HEIGHT, WIDTH), bool)
    inside[box[0]:box[1], box[2]:box[3]] = True   # timm: x[:, :, yl:yh, xl:xh] = x.flip(0)...
    out = np.asarray(mix.mix_images(images, drawn))
    np.testing.assert_array_equal(out[:, inside], np.asarray(images)[::-1][:, inside])
    np.testing.assert_array_equal(out[:, ~inside], np.asarray(images)[:, ~inside])
    area = inside.sum() / (HEIGHT * WIDTH)
    assert float(drawn['lam']) == pytest.approx(1 - area, abs=1e-7)
    targets = np.asarray(mix.mix_targets(labels, drawn['lam'], 3))
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
    partial += 0 < area < 1
  assert partial > 15   # most boxes are neither empty nor the whole image


def test_mixup_images_and_targets_are_the_convex_combination(shared):
  images, labels = _batch()
  onehot = np.eye(3)[np.asarray(labels)]
  for step in np.flatnonzero((shared['beta'] < 1) & ~shared['cutmix'])[:5]:
    drawn = _at(shared, step)
    lam = float(drawn['lam'])
    assert lam == float(drawn['beta']) and 0 < lam < 1
    out = mix.mix_images(images, drawn)
    np.testing.assert_allclose(out, lam * images + (1 - lam) * images[::-1], atol=1e-6)
    targets = np.asarray(mix.mix_targets(labels, drawn['lam'], 3))
    np.testing.assert_allclose(targets, lam * onehot + (1 - lam) * onehot[::-1], atol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)


def test_an_unmixed_batch_is_unchanged_bit_for_bit(shared):
  images, labels = _batch()
  drawn = _at(shared, np.flatnonzero(shared['beta'] == 1)[0])
  assert float(drawn['lam']) == 1.0 and not drawn['cutmix']
  np.testing.assert_array_equal(mix.mix_images(images, drawn), images)
  np.testing.assert_array_equal(mix.mix_targets(labels, drawn['lam'], 3),
                                np.eye(3, dtype=np.float32)[np.asarray(labels)])


def test_the_same_seed_and_step_give_the_same_key():
  # The batch is a function of the key and the batch: the resumed training below checks that
  # a new process mixes the same batches.
  key_data = lambda seed, step: np.asarray(jax.random.key_data(mix.key(seed, step)))
  np.testing.assert_array_equal(key_data(0, 7), key_data(0, jnp.int32(7)))
  assert not np.array_equal(key_data(0, 7), key_data(1, 7))
  assert not np.array_equal(key_data(0, 7), key_data(0, 8))


# ------------------------------------------------------------------ loss on soft targets

keras = pytest.importorskip('keras')


def _problem(num_classes, n=12, seed=0):
  rng = np.random.default_rng(seed)
  outputs = 1 if num_classes == 2 else num_classes
  logits = (rng.standard_normal((n, outputs)) * 3).astype(np.float32)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  soft = rng.dirichlet(np.ones(num_classes), n).astype(np.float32)
  return logits, labels, soft


def _keras_loss(num_classes, smoothing, **kwargs):
  if num_classes == 2:
    return keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=smoothing,
                                           **kwargs)
  return keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=smoothing,
                                              **kwargs)


def _keras_targets(soft, num_classes):
  return soft[:, 1:] if num_classes == 2 else soft


@pytest.mark.parametrize('num_classes', [2, 3])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_soft_target_loss_equals_the_hard_one_on_one_hot_targets(num_classes, smoothing):
  logits, labels, _ = _problem(num_classes)
  onehot = jnp.asarray(np.eye(num_classes, dtype=np.float32)[labels])
  hard = losses.per_example_loss(jnp.asarray(logits), jnp.asarray(labels), smoothing)
  soft = losses.per_example_loss(jnp.asarray(logits), onehot, smoothing)
  np.testing.assert_allclose(soft, hard, rtol=1e-6, atol=1e-7)
  spec = losses.LossSpec(smoothing, tuple(float(w) for w in range(1, num_classes + 1)))
  assert float(losses.batch_loss(jnp.asarray(logits), onehot, spec)) == pytest.approx(
      float(losses.batch_loss(jnp.asarray(logits), jnp.asarray(labels), spec)), rel=1e-6)


@pytest.mark.parametrize('num_classes', [2, 3])
@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_soft_target_loss_equals_keras(num_classes, smoothing):
  logits, _, soft = _problem(num_classes)
  theirs = _keras_loss(num_classes, smoothing, reduction=None)(
      _keras_targets(soft, num_classes), logits)
  ours = losses.per_example_loss(jnp.asarray(logits), jnp.asarray(soft), smoothing)
  np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-5, atol=1e-6)
  # Class weights: each example weighs sum_c target_c w_c, as Keras's sample_weight does it.
  weights = tuple(float(w) for w in np.linspace(0.5, 2.0, num_classes))
  sample_weight = soft @ np.asarray(weights, np.float32)
  theirs = float(_keras_loss(num_classes, smoothing)(_keras_targets(soft, num_classes), logits,
                                                     sample_weight=sample_weight))
  ours = float(losses.batch_loss(jnp.asarray(logits), jnp.asarray(soft),
                                 losses.LossSpec(smoothing, weights)))
  assert ours == pytest.approx(theirs, rel=1e-5)


def test_the_mixing_equals_keras_mixup_and_cutmix_layers_given_the_same_draws(shared):
  """Keras 3's keras.layers.MixUp and CutMix draw otherwise (a random permutation, a lambda
  per example; CutMix's box placed inside the image, its alpha uniform in `factor`): given
  timm's draws (the reversed batch, one lambda, our box), their arithmetic is ours."""
  images, labels = _batch()
  onehot = np.eye(3, dtype=np.float32)[np.asarray(labels)]
  reverse = np.arange(len(labels))[::-1].copy()
  mixed = shared['beta'] < 1
  step = np.flatnonzero(mixed & ~shared['cutmix'])[0]
  drawn = _at(shared, step)
  layer = keras.layers.MixUp(alpha=1.0)
  given = {'mix_weight': np.full(len(labels), float(drawn['lam']), np.float32),
           'permutation_order': reverse}
  np.testing.assert_allclose(np.asarray(layer.transform_images(np.asarray(images), given)),
                             mix.mix_images(images, drawn), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(layer.transform_labels(onehot, given)),
                             mix.mix_targets(labels, drawn['lam'], 3), rtol=0, atol=1e-6)
  layer = keras.layers.CutMix(factor=1.0)
  for step in np.flatnonzero(shared['cutmix'])[:5]:
    drawn = _at(shared, step)
    top, bottom, left, right = (np.full(len(labels), float(v), np.float32)
                                for v in drawn['box'])
    masks, weight = layer._generate_batch_mask(images.shape, (left, right, top, bottom))
    given = {'permutation_order': reverse, 'batch_masks': masks, 'mix_weight': weight}
    np.testing.assert_array_equal(np.asarray(layer.transform_images(np.asarray(images), given)),
                                  mix.mix_images(images, drawn))
    np.testing.assert_allclose(np.asarray(weight), float(drawn['lam']), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.transform_labels(onehot, given)),
                               mix.mix_targets(labels, drawn['lam'], 3), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the train step


def _data_spec(seed=0, **mix_fields):
  config = default.get_config()
  config.seed = seed
  for name, value in mix_fields.items():
    config.data.mix[name] = value
  return data_spec.DataSpec.from_config(config)


class _TinyClassifier(nn.Module):
  """Flatten and Dense, called as hhjax's classifier is (`train`, dropout rng)."""
  outputs: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(self.outputs, name='head')(x.reshape(x.shape[0], -1))


def _step_setup(num_classes):
  outputs = 1 if num_classes == 2 else num_classes
  model = _TinyClassifier(outputs)
  images, labels = _batch(b=8)
  labels = labels % num_classes
  params = model.init(jax.random.PRNGKey(0), images)['params']
  params = {'head': params['head']}
  phase = phases.Phase('warmup', 1, 1e-2, (('.*', 'train'),), None)
  setup = phases.setup(phase, params, optim.OptimizerSpec(), losses.LossSpec(0.1))
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'batch_stats': {},
           'opt_state': setup.tx.init(params), 'rng': jax.random.PRNGKey(0),
           'metrics': steps.zero_metrics(), 'nonfinite_step': jnp.full((), -1, jnp.int32)}
  return model, setup, state, {'image': images, 'label': labels}


def test_prob_zero_is_the_step_without_mixing_bit_for_bit():
  assert mix.for_data(_data_spec(mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.0), 3) is None
  assert mix.for_data(_data_spec(), 3) is None
  model, setup, state, batch = _step_setup(3)
  plain = jax.jit(steps.make_train_step(model, setup))(state, batch)
  off = jax.jit(steps.make_train_step(
      model, setup, mix=mix.for_data(_data_spec(mixup_alpha=0.2, prob=0.0), 3)))(state, batch)
  jax.tree.map(np.testing.assert_array_equal, plain, off)


def test_the_step_minimises_the_loss_of_the_mixed_batch():
  num_classes = 3
  model, setup, state, batch = _step_setup(num_classes)
  mixer = mix.for_data(_data_spec(mixup_alpha=0.5, cutmix_alpha=1.0), num_classes)
  after = jax.jit(steps.make_train_step(model, setup, mix=mixer))(state, batch)
  images, targets = jax.jit(mixer)(batch['image'], batch['label'], state['step'])
  assert not np.array_equal(images, batch['image'])
  logits = model.apply({'params': state['params']}, images)
  expected = losses.batch_loss(logits, targets, setup.loss) * len(targets)
  assert float(after['metrics']['loss_sum']) == pytest.approx(float(expected), rel=1e-5)
  dominant = np.argmax(np.asarray(targets), -1)
  correct = np.sum(np.asarray(steps.predicted_class(logits)) == dominant)
  assert int(after['metrics']['correct']) == correct


def test_mixing_needs_images_not_cached_features():
  data = _data_spec(cutmix_alpha=1.0)
  data = data_spec.DataSpec(**{**data.__dict__, 'augment': data_spec.AugmentSpec(
      **{**data.augment.__dict__, 'enabled': False})})
  assert 'mixup or CutMix is on' in feature_cache._why_not(data)
  with pytest.raises(errors.ConfigError, match='mixup or CutMix'):
    feature_cache.wanted(data, feature_cache.Settings(mode='on'), None)
  config = default.get_config()
  config.data.mix.mixup_alpha = 0.2
  config.speed.cache_features = 'on'
  with pytest.raises(errors.ConfigError, match=r'config\.speed\.cache_features'):
    config_checks.validate(config)
  config.data.mix.prob = 0.0   # never mixes: the cache may be asked for
  config_checks.validate(config)


def test_old_configs_without_the_block_read_as_off():
  config = default.get_config().to_dict()
  del config['data']['mix']
  assert not data_spec.DataSpec.from_config(config).mix.enabled
  config_checks.validate(config)


# A fresh interpreter with 4 CPU devices (XLA_FLAGS before JAX starts): the batch sharded over
# them mixes as on one device, the partners and the draws being those of the global batch.
SHARDED = r"""
import sys
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, numpy as np
from configs import default
from hhjax import sharding
from hhjax.data import spec as data_spec
from hhjax.training import mix
assert jax.device_count() == 4
config = default.get_config()
config.data.mix.mixup_alpha, config.data.mix.cutmix_alpha = 0.4, 1.0
spec = data_spec.DataSpec.from_config(config)
mixer = mix.for_data(spec, 3)
rng = np.random.default_rng(0)
images = rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)
labels = rng.integers(0, 3, 8).astype(np.int32)
mesh = sharding.make_mesh()
data, repl = sharding.data_sharded(mesh), sharding.replicated(mesh)
one = jax.jit(mixer)
split = jax.jit(mixer, in_shardings=(data, data, repl), out_shardings=(data, data))
kinds = set()
for step in range(6):
  a = one(images, labels, jnp.int32(step))
  b = split(jax.device_put(images, data), jax.device_put(labels, data), jnp.int32(step))
  assert len(b[0].sharding.device_set) == 4
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  kinds.add(bool(mix.draw(mix.key(spec.seed, step), spec.mix, 16, 16)['cutmix']))
assert kinds == {True, False}, kinds   # both kinds were compared
print('ok')
"""


def test_four_devices_mix_the_global_batch_as_one():
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  root = str(pathlib.Path(__file__).resolve().parents[1])
  proc = subprocess.run([sys.executable, '-c', SHARDED, root], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip().endswith('ok')


# ------------------------------------------------------------------ a training


def _tiny_config():
  """VGG16 up to block1_pool at 32x32 (quick to compile), batch 4, 2 steps per epoch, one
  warm-up epoch; only mixing varies the images (no augmentation), so the frozen phase could
  otherwise cache its features."""
  config = smoke.get_config()
  config.model.backbone, config.model.cut = 'vgg16', 'block1_pool'
  config.data.image_size, config.data.preprocessing = 32, 'caffe'
  config.finetune.unfreeze_from = 'block1_pool'
  config.steps_per_epoch = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 0
  config.data.fake.num_train_examples = 16
  config.data.fake.num_eval_examples = 4
  config.model.hidden = 8
  config.data.augment.enabled = False
  config.data.mix.mixup_alpha = 0.4
  config.data.mix.cutmix_alpha = 1.0
  config.warmup.epochs, config.finetune.epochs = 1, 0
  return config


def test_a_training_with_mixup_and_cutmix_trains_on_images_and_resumes_exactly(
    tmp_path, caplog, monkeypatch):
  made = []
  for_data = mix.for_data
  monkeypatch.setattr(mix, 'for_data', lambda *a: made.append(for_data(*a)) or made[-1])
  config = _tiny_config()
  with caplog.at_level('INFO'):
    train.train_and_evaluate(config, str(tmp_path / 'short'))    # steps 1, 2
  assert made and all(m is not None for m in made)   # the frozen phase's step mixes
  assert 'Cached the backbone features' not in caplog.text
  config.warmup.epochs = 2
  resumed = train.train_and_evaluate(config, str(tmp_path / 'short'))   # steps 3, 4
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  assert resumed['step'] == whole['step'] == 4
  rows = [[json.loads(line) for line in open(tmp_path / d / 'metrics.jsonl')]
          for d in ('short', 'whole')]
  assert [r['step'] for r in rows[0]] == [r['step'] for r in rows[1]] == [2, 4]
  for a, b in zip(*rows):
    assert np.isfinite(a['train_loss'])
    assert (a['train_loss'], a['train_accuracy']) == (b['train_loss'], b['train_accuracy'])


def test_preview_shows_each_batch_mixed_and_how(tmp_path):
  from hhjax import preview  # pylint: disable=g-import-not-at-top
  drawn = {'lam': np.float32(0.734), 'cutmix': np.bool_(True)}
  assert preview._mix_line(drawn, 'class_1') == 'CutMix λ 0.73 with class_1'
  drawn = {'lam': np.float32(0.25), 'cutmix': np.bool_(False)}
  assert preview._mix_line(drawn, 'class_0') == 'mixup λ 0.25 with class_0'
  assert preview._mix_line({'lam': np.float32(1), 'cutmix': False}, 'x') == 'not mixed'
  # The mixing is the train step's own (mix.draw, mix_images): the figure only shows it.
  path = preview.preview_data(_tiny_config(), str(tmp_path), num_images=4, columns=2)
  assert os.path.getsize(path) > 0
