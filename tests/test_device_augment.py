"""Augmentation on the device equals augmentation on the host, and the new augmentations follow
their published definitions: random-resized crop (torchvision / timm / Keras 3 sampling), the
evaluation's centre crop (PIL's crop + resize), random erasing (Zhong et al. 2017, timm)."""

import math
import random

import jax
import numpy as np
from PIL import Image
import pytest
from scipy import stats
import tensorflow as tf

from configs import default
from hhjax import preview
from hhjax.data import augment
from hhjax.data import decode
from hhjax.data import pipeline
from hhjax.data import spec as data_spec
from hhjax.data import streams
from hhjax.training import device_augment
from hhjax.training import feature_cache

SIZE = 75
BATCH = 6


def _config(real_dir=None, **fields):
  """The default config on small images; fields: 'crop.scale' -> value, under config.data."""
  config = default.get_config()
  if real_dir is None:
    config.data.source = 'fake'
    config.data.validation_split = 'validation'
    config.data.test_split = ''
  else:
    config.data.source = 'folder'
    config.data.dir = str(real_dir)
    config.data.train_split = 'train'
    config.data.validation_split = 'validation'
    config.data.test_split = ''
  config.data.image_size = SIZE
  # Whole grey levels after resizing: the host's float pixels are the device's bytes.
  config.data.resize_method = 'nearest'
  config.batch_size = BATCH
  for path, value in fields.items():
    node = config.data
    *parents, name = path.split('.')
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _spec(config):
  return data_spec.DataSpec.from_config(config)


def _first_batch(spec, start_step=0):
  ds = pipeline.create_dataset(spec, spec.train_split, start_step=start_step, process_index=0,
                               process_count=1)
  return next(ds.as_numpy_iterator())


def _host_pixels(batch):
  """The host batch's images back in grey levels ('inception': x / 127.5 - 1)."""
  return (batch['image'].astype(np.float64) + 1.0) * 127.5


# ----------------------------------------------------------------------------- device vs host

def _device_pixels(spec, shipped):
  return np.asarray(jax.jit(lambda b: device_augment.augment_pixels(b, spec))(shipped))


def test_device_augmentation_equals_the_host_one_on_the_same_batch(real_data_dir):
  # The tutorial's recipe (ImageDataGenerator only, fill_mode='nearest'), through both
  # pipelines: the same labels, the same pixels within 0.05 grey levels, the same inputs.
  host_spec = _spec(_config(real_data_dir))
  device_spec = _spec(_config(real_data_dir, **{'augment.on': 'device'}))
  host = _first_batch(host_spec, start_step=7)
  shipped = _first_batch(device_spec, start_step=7)
  assert shipped['image'].dtype == np.uint8 and set(shipped) == {'image', 'label', 'warp',
                                                                 'flip'}
  np.testing.assert_array_equal(shipped['label'], host['label'])
  difference = np.abs(_device_pixels(device_spec, shipped) - _host_pixels(host))
  assert difference.max() <= 0.05, difference.max()
  # The step's inputs: those pixels, normalised as the host normalises them.
  inputs = np.asarray(jax.jit(device_augment.for_data(device_spec))(shipped))
  np.testing.assert_allclose(inputs, host['image'], atol=0.05 / 127.5)


# Every fill mode, with the crop and the erasing on too (the order of the host path).
EVERYTHING = {'augment.cval': 100.0, 'crop.random_resized_crop': True,
              'random_erasing.probability': 0.7, 'random_erasing.value': '77'}


@pytest.fixture(scope='module')
def shipped_batch(real_data_dir):
  """A device-path batch of real images with every augmentation on (its draws ignore
  fill_mode), at step 7."""
  spec = _spec(_config(real_data_dir, **EVERYTHING, **{'augment.on': 'device'}))
  return _first_batch(spec, start_step=7)


@pytest.mark.parametrize('fill_mode', data_spec.FILL_MODES)
def test_device_augmentation_equals_the_host_one_for_every_fill_mode(real_data_dir,
                                                                     shipped_batch, fill_mode):
  fields = {**EVERYTHING, 'augment.fill_mode': fill_mode}
  host_spec = _spec(_config(real_data_dir, **fields))
  device_spec = _spec(_config(real_data_dir, **fields, **{'augment.on': 'device'}))
  # The host path's augmentation of the same pixels at the same stream positions.
  host = np.stack([
      augment.host_augment(tf.constant(image, tf.float32), host_spec,
                           tf.constant(7 * BATCH + i, tf.int64)).numpy()
      for i, image in enumerate(shipped_batch['image'])])
  difference = np.abs(_device_pixels(device_spec, shipped_batch) - host)
  assert difference.max() <= 0.05, (fill_mode, difference.max())
  assert (shipped_batch['erase'][:, 2] > 0).any()   # something was erased


def test_device_batches_depend_only_on_seed_and_step():
  spec = _spec(_config(**{'augment.on': 'device', 'crop.random_resized_crop': True,
                          'random_erasing.probability': 0.5,
                          'random_erasing.value': 'random'}))
  stream = pipeline.create_dataset(spec, spec.train_split, process_index=0,
                                   process_count=1).as_numpy_iterator()
  third = [next(stream) for _ in range(3)][-1]
  resumed = _first_batch(spec, start_step=2)
  assert set(resumed) == {'image', 'label', 'crop', 'warp', 'flip', 'erase', 'erase_seed'}
  for key in resumed:
    np.testing.assert_array_equal(resumed[key], third[key])


def test_host_path_with_only_keras_augmentation_is_unchanged_by_the_new_fields():
  # The tutorial's recipe: the new blocks off give Keras's random_augment, bit for bit.
  spec = _spec(_config())
  batch = _first_batch(spec, start_step=3)
  assert set(batch) == {'image', 'label'}
  # The same position without augmentation, augmented by Keras's random_augment.
  ds = pipeline.create_dataset(
      data_spec.DataSpec.from_config(_config(**{'augment.enabled': False})), spec.train_split,
      start_step=3, process_index=0, process_count=1)
  plain = next(ds.as_numpy_iterator())['image']
  position = 3 * BATCH
  raw = (plain[0].astype(np.float32) + 1.0) * 127.5
  seed = streams.stateless_seed(spec.seed, streams.AUGMENT_SALT, position)
  expected = augment.random_augment(tf.constant(raw), seed, spec.augment).numpy() / 127.5 - 1.0
  np.testing.assert_allclose(batch['image'][0], expected, atol=2e-6)


def test_feature_cache_is_refused_when_any_augmentation_is_on():
  for fields in ({'augment.enabled': False, 'crop.random_resized_crop': True},
                 {'augment.enabled': False, 'random_erasing.probability': 0.5},
                 {'augment.on': 'device'}):
    assert 'augmentation is on' in feature_cache._why_not(_spec(_config(**fields)))
  assert feature_cache._why_not(_spec(_config(**{'augment.enabled': False}))) is None


def test_preview_shows_the_device_augmentation_and_what_each_cell_had_applied(tmp_path):
  config = _config(**{'augment.on': 'device', 'crop.random_resized_crop': True,
                      'random_erasing.probability': 1.0})
  spec = _spec(config)
  shipped = _first_batch(spec)
  for k, lines in enumerate(preview.applied(spec, [0, 1])):
    top, left, h, w = shipped['crop'][k]
    assert lines[0] == f'crop {w}x{h} at ({left},{top})'
    assert lines[1].startswith('rot ') and lines[2].startswith('shift ')
    top, left, h, w = shipped['erase'][k]
    assert lines[3] == (f'erased {w}x{h} at ({left},{top})' if h else 'not erased')
  path = preview.preview_data(config, str(tmp_path), num_images=4, columns=2)
  assert np.asarray(Image.open(path)).shape[0] > 100


# ----------------------------------------------------------------------------- crops


def _boxes(draw, n, seed=0):
  """n draws of `draw(stateless seed)`, [n, 4] ints."""
  seeds = tf.cast(tf.stack([tf.fill([n], seed), tf.range(n)], axis=1), tf.int64)
  many = tf.function(lambda s: tf.map_fn(draw, s, fn_output_signature=tf.int32,
                                         parallel_iterations=64))
  return many(seeds).numpy()


def test_random_resized_crop_areas_are_uniform_and_aspects_log_uniform():
  # A large image and scales whose every candidate fits: no retry, no fallback, so the area
  # fraction is U(scale) and log(w / h) is U(log ratio) (up to rounding to whole pixels).
  crop = data_spec.CropSpec(random_resized_crop=True, scale=(0.08, 0.5), ratio=(3 / 4, 4 / 3))
  n, side = 3000, 1000
  boxes = _boxes(lambda s: augment.random_resized_crop_box(s, crop, side, side), n)
  top, left, h, w = boxes.T.astype(np.float64)
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= side).all() and (left + w <= side).all()
  area = h * w / side**2
  assert stats.kstest(area, stats.uniform(0.08, 0.42).cdf).pvalue > 0.01
  log_aspect = np.log(w / h)
  lo, hi = math.log(3 / 4), math.log(4 / 3)
  assert stats.kstest(log_aspect, stats.uniform(lo, hi - lo).cdf).pvalue > 0.01
  # The corner is uniform over the places the box fits.
  assert stats.kstest(top / (side - h), stats.uniform(0, 1).cdf).pvalue > 0.01


def _torchvision_get_params(rng, height, width, scale, ratio):
  """torchvision.transforms.RandomResizedCrop.get_params, as published (Python's random)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      return rng.randint(0, height - h), rng.randint(0, width - w), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def test_random_resized_crop_with_retries_follows_torchvisions_distribution():
  # The defaults on a square image: about a tenth of the candidates do not fit and are drawn
  # again; the accepted areas are those of the published algorithm (two-sample KS test).
  crop = data_spec.CropSpec(random_resized_crop=True)
  n = 3000
  ours = _boxes(lambda s: augment.random_resized_crop_box(s, crop, SIZE, SIZE), n)
  rng = random.Random(0)
  theirs = np.array([_torchvision_get_params(rng, SIZE, SIZE, crop.scale, crop.ratio)
                     for _ in range(n)])
  for column in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 3] / b[:, 2]):
    assert stats.ks_2samp(column(ours), column(theirs)).pvalue > 0.01


def test_random_resized_crop_falls_back_to_the_centred_box_of_the_nearest_ratio():
  # Width / height in [2, 3] at 90 % or more of a square's area never fits: torchvision's
  # fallback is the whole width and height = width / 2, centred.
  crop = data_spec.CropSpec(random_resized_crop=True, scale=(0.9, 1.0), ratio=(2.0, 3.0))
  boxes = _boxes(lambda s: augment.random_resized_crop_box(s, crop, 60, 60), 20)
  np.testing.assert_array_equal(boxes, np.tile([15, 0, 30, 60], (20, 1)))
  assert _torchvision_get_params(random.Random(0), 60, 60, crop.scale, crop.ratio) == (
      15, 0, 30, 60)


@pytest.mark.parametrize('fraction', [0.875, 0.5])
def test_centre_crop_equals_pils_crop_and_resize(real_data_dir, fraction):
  path = sorted((real_data_dir / 'validation' / 'horses').iterdir())[0]
  pixels = np.asarray(Image.open(path).convert('RGB').resize((SIZE, SIZE), Image.NEAREST))
  ours = augment.centre_crop(tf.constant(pixels, tf.float32), fraction).numpy()
  top, left, h, w = augment.centre_crop_box(fraction, SIZE, SIZE)
  theirs = np.asarray(Image.fromarray(pixels).crop((left, top, left + w, top + h)).resize(
      (SIZE, SIZE), Image.BILINEAR), np.float64)
  assert np.abs(ours - theirs).max() <= 1.0
  # Predict (and Grad-CAM) see that crop of the file.
  loaded = decode.load_image(str(path), SIZE, 'nearest', 'inception', fraction)
  np.testing.assert_allclose(loaded, ours / 127.5 - 1.0, atol=1e-6)


def test_the_evaluation_pass_sees_the_centre_crop():
  def first_eval_batch(**fields):
    spec = _spec(_config(**fields))
    return next(pipeline.create_dataset(spec, spec.validation, process_index=0,
                                        process_count=1).as_numpy_iterator())
  whole = first_eval_batch()
  cropped = first_eval_batch(**{'crop.eval_fraction': 0.875})
  expected = np.stack([augment.centre_crop(tf.constant((image + 1.0) * 127.5), 0.875).numpy()
                       for image in whole['image']]) / 127.5 - 1.0
  np.testing.assert_allclose(cropped['image'], expected, atol=1e-5)
  np.testing.assert_array_equal(cropped['mask'], whole['mask'])


# ----------------------------------------------------------------------------- random erasing


def _timm_erase_box(rng, probability, height, width, scale, ratio):
  """timm.data.random_erasing.RandomErasing._erase's box (count 1), as published; None: none."""
  if rng.random() > probability:
    return None
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = rng.uniform(scale[0], scale[1]) * area
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(target_area * aspect_ratio)))
    w = int(round(math.sqrt(target_area / aspect_ratio)))
    if w < width and h < height:
      return rng.randint(0, height - h), rng.randint(0, width - w), h, w
  return None


def test_random_erasing_follows_timms_definition():
  erasing = data_spec.ErasingSpec(probability=0.6)
  n = 3000
  ours = _boxes(lambda s: augment.random_erasing_box(s, erasing, SIZE, SIZE), n)
  rng = random.Random(0)
  theirs = [_timm_erase_box(rng, 0.6, SIZE, SIZE, erasing.scale, erasing.ratio)
            for _ in range(n)]
  theirs = np.array([b for b in theirs if b is not None])
  erased = ours[ours[:, 2] > 0]
  # How often an image is erased: Binomial(n, p times the chance a box fits).
  assert abs(len(erased) - len(theirs)) < 4 * math.sqrt(n * 0.25)
  assert (erased[:, 0] + erased[:, 2] <= SIZE).all() and (erased[:, 2] < SIZE).all()
  assert (erased[:, 1] + erased[:, 3] <= SIZE).all() and (erased[:, 3] < SIZE).all()
  for column in (lambda b: b[:, 2] * b[:, 3], lambda b: b[:, 2] / b[:, 3], lambda b: b[:, 0]):
    assert stats.ks_2samp(column(erased), column(theirs)).pvalue > 0.01


@pytest.mark.parametrize('value', ['0', 'random'])
def test_random_erasing_replaces_exactly_the_box(value):
  image = tf.fill([SIZE, SIZE, 3], 128.0)
  erasing = data_spec.ErasingSpec(probability=1.0, value=value)
  box = tf.constant([10, 20, 30, 15], tf.int32)
  out = augment.erase(image, box, augment.erase_fill(erasing, tf.constant([1, 2]),
                                                     image.shape)).numpy()
  device = np.asarray(device_augment._erase(np.full((SIZE, SIZE, 3), 128.0, np.float32),
                                            np.array([10, 20, 30, 15]), np.array([1, 2]),
                                            erasing))
  for result in (out, device):
    inside = np.zeros((SIZE, SIZE), bool)
    inside[10:40, 20:35] = True
    assert (result[~inside] == 128.0).all()
    if value == '0':
      assert (result[inside] == 0.0).all()
    else:   # Zhong et al.: random values in [0, 255]
      assert result[inside].min() >= 0 and result[inside].max() <= 255
      assert result[inside].std() > 60   # uniform noise: std 255 / sqrt(12) = 73.6


# ----------------------------------------------------------------------------- config


def test_old_configs_without_the_new_blocks_read_as_off():
  tree = default.get_config().to_dict()
  for name in ('crop', 'random_erasing'):
    del tree['data'][name]
  del tree['data']['augment']['on']
  spec = data_spec.DataSpec.from_config(tree)
  assert spec.augment.on == 'host' and not spec.crop.random_resized_crop
  assert spec.crop.eval_fraction is None and not spec.random_erasing.enabled
  assert spec == data_spec.DataSpec.from_config(default.get_config())
