"""Reference Keras InceptionV3 models with random weights, for the parity tests.

No ImageNet weights are reachable from CI, so the tests compare against Keras itself on random
weights: every array is drawn again, BatchNorm moving means and (positive) variances included,
at scales that keep the activations of all eleven blocks of order one.
"""

import os
import pathlib

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def randomize(model, seed: int = 0) -> None:
  """Draws new values for every weight of a Keras (tf_keras or Keras 3) application model."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    weights = layer.get_weights()
    if not weights:
      continue
    kind = type(layer).__name__
    if kind == 'Conv2D':
      kh, kw, cin, _ = weights[0].shape
      # He-normal: keeps the scale through ReLUs.
      new = [rng.normal(0.0, np.sqrt(2.0 / (kh * kw * cin)), weights[0].shape)]
      if len(weights) == 2:                      # with a bias (VGG, ResNet)
        new.append(rng.normal(0.0, 0.1, weights[1].shape))
    elif kind == 'SeparableConv2D':
      kh, kw, cin, _ = weights[0].shape
      new = [rng.normal(0.0, np.sqrt(1.0 / (kh * kw)), weights[0].shape),
             rng.normal(0.0, np.sqrt(2.0 / cin), weights[1].shape)]
      if len(weights) == 3:
        new.append(rng.normal(0.0, 0.1, weights[2].shape))
    elif kind == 'DepthwiseConv2D':          # EfficientNet: [k, k, in, 1], no bias
      kh, kw, _, _ = weights[0].shape
      new = [rng.normal(0.0, np.sqrt(1.0 / (kh * kw)), weights[0].shape)]
    elif kind == 'Normalization':            # EfficientNet's mean, variance, count
      (c,) = weights[0].shape
      new = [rng.uniform(0.3, 0.6, c), rng.uniform(0.03, 0.1, c), weights[2]]
    elif kind == 'BatchNormalization' and len(weights) == 4:   # with gamma (ResNet, Xception)
      (c,) = weights[0].shape
      new = [rng.uniform(0.5, 1.5, c),           # gamma
             rng.normal(0.0, 0.2, c),            # beta
             rng.normal(0.0, 0.2, c),            # moving_mean
             rng.uniform(0.5, 2.0, c)]           # moving_variance, positive
    elif kind == 'BatchNormalization':
      (c,) = weights[0].shape
      new = [rng.normal(0.0, 0.2, c),            # beta
             rng.normal(0.0, 0.2, c),            # moving_mean
             rng.uniform(0.5, 2.0, c)]           # moving_variance, positive
    elif kind == 'Dense':
      new = [rng.normal(0.0, 1.0 / np.sqrt(weights[0].shape[0]), weights[0].shape),
             rng.normal(0.0, 0.1, weights[1].shape)]
    else:
      raise AssertionError(f'unexpected layer with weights: {layer.name} ({kind})')
    layer.set_weights([np.asarray(w).astype(np.asarray(old).dtype)
                       for w, old in zip(new, weights)])


def randomize_flax(variables, seed: int = 0):
  """Our variables with new random values at the scales `randomize` draws (variances > 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def draw(path, x):
    key = getattr(path[-1], 'key', None)
    if key == 'var':
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    if key == 'variance':   # EfficientNet's input Normalization
      return rng.uniform(0.03, 0.1, x.shape).astype(np.float32)
    if key == 'count':
      return np.zeros(x.shape, np.float32)
    if key == 'scale':
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    if key in ('kernel', 'depthwise_kernel', 'pointwise_kernel'):
      fan_in = int(np.prod(x.shape[:-1])) if key != 'depthwise_kernel' else int(
          np.prod(x.shape[:2]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), x.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, x.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, variables)


def save_tf_keras_weights(path: pathlib.Path, *, include_top: bool = False, size: int = 150,
                          seed: int = 0) -> pathlib.Path:
  """A random tf_keras InceptionV3 saved with `save_weights` (the official files' layout)."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  # Layer names as a fresh Keras session gives them (conv2d, conv2d_1, ...), as in the official
  # files, whichever Keras models this process built before.
  tf_keras.backend.clear_session()
  model = tf_keras.applications.InceptionV3(
      weights=None, include_top=include_top, input_shape=(size, size, 3))
  randomize(model, seed)
  model.save_weights(str(path))
  return path


def endpoint_model(keras_module, model):
  """A Keras model that outputs mixed0 ... mixed10 (and predictions when `model` has them)."""
  outputs = [model.get_layer(f'mixed{i}').output for i in range(11)]
  names = [f'mixed{i}' for i in range(11)]
  if any(layer.name == 'predictions' for layer in model.layers):
    outputs.append(model.get_layer('predictions').output)
    names.append('predictions')
  return keras_module.Model(model.inputs, outputs), names
