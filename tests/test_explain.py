"""Grad-CAM on small models: it is Selvaraju et al.'s map, and it follows the evidence.

The command (`--mode=explain`) is tested on a trained workdir in tests/test_pictures.py.
"""

import functools

from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hhjax import explain
from hhjax.model import classifier
from hhjax.model import inception

SIZE = 75   # mixed0 is 7 x 7 x 256 here, mixed1 7 x 7 x 288


def _random_variables(model, seed):
  """He-normal kernels, zero biases, BatchNorm statistics (0, 1): the model's variables without
  compiling its initialiser, which costs seconds more than everything else here."""
  rng = np.random.default_rng(seed)
  shapes = traverse_util.flatten_dict(
      jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))
  def value(path, shape):
    if path[-1] == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
    return np.full(shape, 1.0 if path[-1] == 'var' else 0.0, np.float32)
  return traverse_util.unflatten_dict({p: value(p, s.shape) for p, s in shapes.items()})


def _backbone_features(model, variables, images):
  """A at the cut, computed on its own (not through the classifier's captured endpoints)."""
  backbone = inception.InceptionV3(final_endpoint=model.cut)
  return jax.jit(backbone.apply)({'params': variables['params']['backbone'],
                                  'batch_stats': variables['batch_stats']['backbone']},
                                 images)[model.cut]


def _with_output_bias(variables, bias):
  params = jax.tree.map(lambda a: a, variables['params'])   # a copy
  params['head']['output']['bias'] = jnp.asarray(bias, jnp.float32)
  return {'params': params, 'batch_stats': variables['batch_stats']}


def _finite_difference_weights(model, variables, features, predicted, eps=1.0):
  """w_k = mean over positions of dy/dA_k, as a central difference of y along channel k.

  Adding t / (h w) to channel k at every position changes y by t w_k to first order, so no
  gradient code is involved. The head (Dense, ReLU, Dense) is piecewise linear in A, so the
  difference is exact while no ReLU changes side; a large step keeps float32 rounding small.
  """
  _, h, w, channels = features.shape
  head = jax.jit(functools.partial(model.apply, variables, train=False, from_features=True))
  directions = jnp.eye(channels)[:, None, None, :] * (eps / (h * w))   # [K, 1, 1, K]
  weights = []
  for a, c in zip(features, predicted):
    plus = head(a[None] + directions)
    minus = head(a[None] - directions)
    classes = jnp.full((channels,), c)
    weights.append((explain.class_score(plus, classes) -
                    explain.class_score(minus, classes)) / (2 * eps))
  return jnp.stack(weights)


@pytest.mark.parametrize('cut,head,num_classes', [('mixed0', 'flatten', 2), ('mixed1', 'gap', 3)])
def test_gradcam_is_the_map_of_its_definition(cut, head, num_classes):
  # The seed's head on one sigmoid output (y = z or -z), and a softmax head (y = z_c) on
  # another cut.
  model = classifier.Classifier(cut=cut, num_classes=num_classes, head=head, hidden=8,
                                dropout=0.0)
  images = jax.random.uniform(jax.random.key(1), (4, SIZE, SIZE, 3), minval=-1, maxval=1)
  variables = _random_variables(model, 0)
  apply = jax.jit(model.apply)
  if num_classes == 2:
    # An output bias that splits the batch, so both signs of the sigmoid logit are checked.
    logits = apply(variables, images)[:, 0]
    variables = _with_output_bias(variables, [-float(jnp.median(logits))])
  out = jax.jit(functools.partial(explain.gradcam, model))(variables, images)

  logits = apply(variables, images)
  predicted = (logits[:, 0] > 0).astype(int) if num_classes == 2 else jnp.argmax(logits, -1)
  np.testing.assert_array_equal(out['predicted'], predicted)
  if num_classes == 2:
    assert set(np.asarray(predicted).tolist()) == {0, 1}
  features = _backbone_features(model, variables, images)
  weights = _finite_difference_weights(model, variables, features, predicted)
  direct = jax.nn.relu(jnp.einsum('bhwk,bk->bhw', features, weights))
  scale = float(jnp.max(direct))
  assert scale > 0
  np.testing.assert_allclose(out['features_map'], direct, atol=2e-4 * scale)
  # Upsampled to the image, bilinearly (the same resize on the direct map).
  assert out['map'].shape == (4, SIZE, SIZE)
  np.testing.assert_allclose(out['map'], jax.image.resize(direct, (4, SIZE, SIZE), 'bilinear'),
                             atol=2e-4 * scale)
  np.testing.assert_allclose(out['probabilities'], classifier.probabilities(logits), rtol=1e-6)


def _textured(where, rng):
  """Mid grey with random texture on one half: the only evidence in the image."""
  image = np.zeros((SIZE, SIZE, 3), np.float32)
  half = SIZE // 2
  region = {'left': np.s_[:, :half], 'right': np.s_[:, SIZE - half:],
            'top': np.s_[:half], 'bottom': np.s_[SIZE - half:]}[where]
  image[region] = rng.uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)[region]
  return image


def test_the_map_lies_where_the_evidence_is_and_moves_with_it():
  # A head built to read "texture": its output weights are the features of a textured region
  # minus those of a plain one (global average pooling, no hidden layer). The class-1 evidence
  # is wherever the texture is; Grad-CAM must find that half, and follow it when it moves.
  model = classifier.Classifier(cut='mixed0', head='gap', hidden=0, dropout=0.0)
  rng = np.random.default_rng(0)
  variables = _random_variables(model, 0)
  calibration = _backbone_features(model, variables, _textured('left', rng)[None])[0]
  cells = calibration.shape[1]
  reads_texture = (calibration[:, :cells // 2].mean((0, 1)) -
                   calibration[:, cells // 2 + 1:].mean((0, 1)))
  params = jax.tree.map(lambda a: a, variables['params'])
  params['head']['output']['kernel'] = reads_texture[:, None]
  variables = {'params': params, 'batch_stats': variables['batch_stats']}
  # Fresh texture (not the calibration's) on each half in turn, and a plain image.
  places = ('left', 'right', 'top', 'bottom')
  images = np.stack([_textured(p, rng) for p in places] + [np.zeros((SIZE, SIZE, 3), np.float32)])
  logits = jax.jit(model.apply)(variables, images)[:, 0]
  variables = _with_output_bias(variables, [-(float(logits[:4].min()) + float(logits[4])) / 2])
  out = jax.jit(functools.partial(explain.gradcam, model))(variables, images)
  np.testing.assert_array_equal(out['predicted'], [1, 1, 1, 1, 0])

  half = SIZE // 2
  for k, place in enumerate(places):
    heat = np.asarray(out['map'][k])
    share = {'left': heat[:, :half], 'right': heat[:, SIZE - half:], 'top': heat[:half],
             'bottom': heat[SIZE - half:]}[place].sum() / heat.sum()
    assert share > 0.7, (place, share)   # 0.76-0.81 over seeds; an even spread gives 0.49
    # At the cut, the cells farthest from the texture hold little: their receptive fields
    # reach only its edge (0.09-0.14 of the mass over seeds; their area is 3/7 of the map).
    small = np.asarray(out['features_map'][k])
    far = {'left': small[:, cells // 2 + 1:], 'right': small[:, :cells // 2],
           'top': small[cells // 2 + 1:], 'bottom': small[:cells // 2]}[place]
    assert far.sum() < 0.2 * small.sum(), place


def test_a_long_explain_says_how_far_it_is(tmp_path, monkeypatch, caplog):
  # Thousands of images take minutes: a progress line every PROGRESS_EVERY_S (0 here).
  monkeypatch.setattr(explain, 'PROGRESS_EVERY_S', 0.0)
  n = 3
  images = np.zeros((n, 16, 16, 3), np.uint8)
  maps = np.random.default_rng(0).random((n, 4, 4)).astype(np.float32)
  with caplog.at_level('INFO', logger='absl'):
    written = explain._write(epath.Path(tmp_path), [f'/x/{k}.png' for k in range(n)], images,
                             maps, np.zeros(n, np.int32), np.full((n, 2), 0.5, np.float32),
                             ['a', 'b'], 'mixed0')
  assert len(written) == n + 2
  lines = [r.getMessage() for r in caplog.records if 'image(s),' in r.getMessage()]
  assert [line.split(':')[1].split(' image')[0].strip() for line in lines] == ['1 of 3',
                                                                              '2 of 3']
  assert lines[0].startswith(f'Writing the pictures to {tmp_path}: 1 of 3 image(s), ')
  assert 'ETA' in lines[0]
