"""The augmentation is Keras's ImageDataGenerator: same parameters, same geometry, same draws."""

import dataclasses

import ml_collections
import numpy as np
import pytest
from scipy import ndimage
import tensorflow as tf

from configs import default
from hhjax import config_checks
from hhjax import errors
from hhjax.data import augment
from hhjax.data import spec as data_spec

# Keras resamples with scipy in float64; here the matrix is float64 and the resampling float32,
# so source coordinates differ by ~1e-5 px and values by (gradient x 1e-5), about 1e-3 grey
# levels. 0.05 of a level (on 0..255) leaves a wide margin for other CPUs while any geometric
# slip (a swapped axis, a half-pixel offset, a wrong sign) moves values by tens of levels.
MAX_LEVELS = 0.05

CASES = {
    'rotation': {'theta': 33.3},
    'shift_tx': {'tx': 21.7},
    'shift_ty': {'ty': -17.2},
    'shear': {'shear': 14.0},
    'shear_seed_size': {'shear': 0.17},
    'zoom': {'zx': 0.83, 'zy': 1.17},
    'flip_horizontal': {'flip_horizontal': True},
    'flip_vertical': {'flip_vertical': True},
    'all_together': {'theta': -28.1, 'tx': -12.3, 'ty': 25.9, 'shear': 0.17, 'zx': 1.14,
                     'zy': 0.86, 'flip_horizontal': True, 'flip_vertical': True},
}


def _test_image(height: int, width: int) -> np.ndarray:
  """Smooth texture plus hard-edged, off-centre blocks: shows every shift, flip and axis swap."""
  rng = np.random.default_rng(0)
  image = ndimage.gaussian_filter(rng.uniform(0, 255, (height, width, 3)), (2, 2, 0))
  image = (image - image.min()) / (image.max() - image.min()) * 255
  image[height // 4:height // 4 + 20, width // 5:width // 5 + 70] = (255, 0, 0)
  image[height // 2:height // 2 + 50, 3 * width // 4:3 * width // 4 + 10] = (0, 0, 255)
  return image.astype(np.float32)


@pytest.fixture(scope='module')
def image():
  return _test_image(150, 150)


def _keras(image, params, fill_mode='nearest', cval=0.0):
  from tf_keras.preprocessing.image import ImageDataGenerator  # pylint: disable=g-import-not-at-top
  generator = ImageDataGenerator(fill_mode=fill_mode, cval=cval)
  return generator.apply_transform(image.copy(), params).astype(np.float64)


def _ours(image, params, fill_mode='nearest', cval=0.0):
  return augment.apply_transform(image, params, fill_mode=fill_mode, cval=cval).numpy()


@pytest.mark.parametrize('case', list(CASES))
def test_transform_matches_keras_apply_transform(image, case):
  params = CASES[case]
  expected = _keras(image, params)
  # Even the seed's 0.17-degree shear moves edges by > 20 levels: enough to tell.
  assert np.abs(expected - image).max() > 20, 'the case must move pixels to prove anything'
  np.testing.assert_allclose(_ours(image, params), expected, rtol=0, atol=MAX_LEVELS)


@pytest.mark.parametrize('fill_mode', ['reflect', 'wrap', 'constant'])
@pytest.mark.parametrize('case', ['rotation', 'all_together'])
def test_other_fill_modes_match_keras(image, fill_mode, case):
  expected = _keras(image, CASES[case], fill_mode, cval=7.0)
  np.testing.assert_allclose(_ours(image, CASES[case], fill_mode, cval=7.0), expected, rtol=0,
                             atol=MAX_LEVELS)


def test_right_angle_rotation_with_constant_fill_keeps_the_border():
  # float32 cos(90 deg) is -4e-8, which would put a whole border column just outside.
  image = _test_image(40, 40)
  params = {'theta': 90.0}
  np.testing.assert_allclose(_ours(image, params, 'constant', 7.0),
                             _keras(image, params, 'constant', 7.0), rtol=0, atol=MAX_LEVELS)


def test_non_square_images_follow_keras_axis_conventions():
  # Keras centres x on height / 2 and scales tx by the height: only a non-square image shows it.
  image = _test_image(120, 170)
  params = CASES['all_together']
  np.testing.assert_allclose(_ours(image, params), _keras(image, params), rtol=0,
                             atol=MAX_LEVELS)


def _default_augment() -> data_spec.AugmentSpec:
  return data_spec.DataSpec.from_config(default.get_config()).augment


def _draw(aug, height, width, num):
  draw = tf.function(lambda s: augment.random_transform_params(s, aug, height, width))
  seeds = [tf.constant([0, k], tf.int64) for k in range(num)]
  drawn = [draw(s) for s in seeds]
  return {k: np.array([float(d[k]) for d in drawn]) for k in augment.PARAM_NAMES}


def test_random_parameters_follow_keras_get_random_transform():
  from tf_keras.preprocessing.image import ImageDataGenerator  # pylint: disable=g-import-not-at-top
  aug = _default_augment()
  height, width, num = 100, 200, 400
  ours = _draw(aug, height, width, num)
  generator = ImageDataGenerator(**{k: getattr(aug, k) for k in (
      'rotation_range', 'width_shift_range', 'height_shift_range', 'shear_range', 'zoom_range',
      'horizontal_flip', 'vertical_flip', 'fill_mode')})
  keras = [generator.get_random_transform((height, width, 3), seed=k) for k in range(num)]
  keras = {k: np.array([float(p[k]) for p in keras]) for k in augment.PARAM_NAMES}
  # Keras's bounds: tx from height_shift_range x rows, ty from width_shift_range x columns.
  bounds = {'theta': (-40, 40), 'tx': (-0.2 * height, 0.2 * height),
            'ty': (-0.2 * width, 0.2 * width), 'shear': (-0.2, 0.2), 'zx': (0.8, 1.2),
            'zy': (0.8, 1.2), 'flip_horizontal': (0, 1), 'flip_vertical': (0, 1)}
  for name, (low, high) in bounds.items():
    for drawn in (ours[name], keras[name]):
      assert low <= drawn.min() and drawn.max() <= high, name
      # Uniform draws fill their range: both ends are approached.
      span = high - low
      assert drawn.min() < low + 0.05 * span and drawn.max() > high - 0.05 * span, name
    assert abs(ours[name].mean() - keras[name].mean()) < 0.1 * (high - low), name
  assert not np.array_equal(ours['zx'], ours['zy']), 'Keras draws the two zooms independently'


def test_parameters_depend_only_on_the_seed():
  aug = _default_augment()
  draw = lambda k: augment.random_transform_params(tf.constant([5, k], tf.int64), aug, 150, 150)
  first, again, other = draw(1), draw(1), draw(2)
  for name in augment.PARAM_NAMES:
    assert float(first[name]) == float(again[name])
  assert any(float(first[n]) != float(other[n]) for n in ('theta', 'tx', 'ty', 'zx'))


def test_disabled_ranges_leave_the_image_unchanged(image):
  aug = dataclasses.replace(_default_augment(), rotation_range=0.0, width_shift_range=0.0,
                            height_shift_range=0.0, shear_range=0.0, zoom_range=0.0,
                            horizontal_flip=False, vertical_flip=False)
  out = augment.random_augment(tf.constant(image), tf.constant([0, 3], tf.int64), aug)
  np.testing.assert_array_equal(out.numpy(), image)


def test_unknown_fill_mode_is_refused():
  config = default.get_config()
  config.data.augment.fill_mode = 'mirror'
  with pytest.raises(ValueError, match="fill_mode = 'mirror': must be one of"):
    config_checks.validate(config)
  with pytest.raises(ValueError, match="fill_mode must be one of .*'mirror'"):
    augment.apply_transform(tf.zeros([4, 4, 3]), {}, fill_mode='mirror')


@pytest.mark.parametrize('field, value, expected', [
    ('rotation_range', -5.0, r'rotation_range = -5.0: must be a number >= 0'),
    ('zoom_range', (1.2, 0.8), r'zoom_range = \(1.2, 0.8\): must be .*0 < lower <= upper'),
    ('zoom_range', (0.1, 0.2, 0.3), r'zoom_range = \(0.1, 0.2, 0.3\): must be a number'),
])
def test_unusable_augment_values_are_config_errors(field, value, expected):
  config = default.get_config().to_dict()
  config['data']['augment'][field] = value
  with pytest.raises(errors.ConfigError, match=expected):
    config_checks.validate(ml_collections.ConfigDict(config))
