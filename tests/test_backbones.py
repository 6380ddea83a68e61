"""The backbone families beside InceptionV3 (VGG, ResNet, Xception, EfficientNet, MobileNetV2)
against Keras.

Every member, from random weights (BatchNorm statistics included) in a Keras's own file
format, read back by our loader by layer name and compared at every endpoint in inference
mode: max |flax - keras| / max |keras| <= 1e-4. The smallest member of each family (`family`)
from tf_keras's `save_weights` file (the official files' layout) at the smallest input Keras
allows, and at a real size (224 px, Xception 299 px); the other members (`member`) at the
smallest size, ResNet101 and ResNet152 from tf_keras's `.h5`, VGG19 from Keras 3's `.keras`
archive. EfficientNetB1 ... B7's blocks are checked against those Keras's EfficientNet builds
(and B1 numerically, at an odd size that takes Keras's other padding). MobileNetV2: alpha 0.35
as a family, the five other alphas at an odd size (Keras's other padding).
"""

import functools
import types

import jax
import numpy as np
import pytest

from hhjax.model import backbones
from hhjax.model import preprocessing
from hhjax.weights import pretrained
import keras_reference

TOLERANCE = 1e-4
# The smallest member of each family, and the smallest input Keras builds it at.
FAMILIES = {'vgg16': 32, 'resnet50': 32, 'xception': 71,
            'efficientnet_b0': 32, 'mobilenet_v2_0.35': 32}
# Where each family's Keras model has its endpoints: Xception's additions are unnamed.
_KERAS_ADDS = 'xception'


def keras_endpoints(keras_module, keras_model, backbone: backbones.Backbone, names):
  """A Keras model that outputs the endpoints `names` of `backbone`."""
  if backbone.name == _KERAS_ADDS:
    adds = [l for l in keras_model.layers if type(l).__name__ == 'Add']
    layer = dict(zip(backbone.endpoints, adds + [keras_model.get_layer(backbone.endpoints[-1])]))
  else:
    layer = {n: keras_model.get_layer(n) for n in names}
  return keras_module.Model(keras_model.inputs, [layer[n].output for n in names])


@pytest.fixture(scope='module', params=list(FAMILIES))
def family(request, tmp_path_factory):
  """One family's tf_keras model with random weights, its weights file and ours read from it."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  name, size = request.param, FAMILIES[request.param]
  backbone = backbones.get(name)
  tf_keras.backend.clear_session()   # Keras's automatic names as in a fresh session.
  # Any input size: the same network is compared at the smallest and at a real one.
  keras_model = backbone.keras_application(
      tf_keras, weights=None, include_top=False, input_shape=(None, None, 3))
  keras_reference.randomize(keras_model, seed=1)
  path = tmp_path_factory.mktemp(name) / f'{name}_notop.h5'
  keras_model.save_weights(str(path))
  model, variables = pretrained.load_file(path, name)
  return types.SimpleNamespace(name=name, size=size, backbone=backbone, path=path,
                               keras_model=keras_model, model=model, variables=variables,
                               apply=jax.jit(model.apply))


def test_weights_file_loads_by_layer_name_as_the_whole_network_without_top(family):
  assert family.model.final_endpoint == family.backbone.endpoints[-1]
  assert not family.model.include_top
  count = sum(np.size(w) for w in family.keras_model.get_weights())
  assert sum(np.size(v) for v in jax.tree.leaves(family.variables)) == count


@pytest.mark.parametrize('family', ['xception', 'efficientnet_b0'], indirect=True)
def test_whole_model_h5_and_keras_archive_load_the_same_weights(family, tmp_path):
  """tf_keras's model.save('x.h5') and Keras 3's .keras archive of the same network load, by
  name, to the arrays of the save_weights file. Xception: its unnamed layers (Keras 3 numbers
  them afresh) are paired in order; the families without any take the same path. EfficientNet:
  its Normalization layer's arrays and depthwise kernels, in both formats."""
  import keras  # pylint: disable=g-import-not-at-top
  family.keras_model.save(str(tmp_path / 'whole.h5'))
  keras3 = family.backbone.keras_application(
      keras, weights=None, include_top=False, input_shape=(family.size, family.size, 3))
  keras3.set_weights(family.keras_model.get_weights())
  keras3.save(str(tmp_path / 'model.keras'))
  for name in ('whole.h5', 'model.keras'):
    model, variables = pretrained.load_file(tmp_path / name, family.name)
    assert model.final_endpoint == family.backbone.endpoints[-1], name
    same = jax.tree.map(np.array_equal, variables, family.variables)
    assert all(jax.tree.leaves(same)), name


def test_a_file_of_another_family_is_refused_naming_a_missing_layer(family):
  from hhjax import errors  # pylint: disable=g-import-not-at-top
  other = {'vgg16': 'resnet50', 'resnet50': 'xception', 'xception': 'vgg16',
           'efficientnet_b0': 'efficientnet_b2', 'mobilenet_v2_0.35': 'mobilenet_v2'}[family.name]
  with pytest.raises(errors.KerasWeightsError,
                     match=rf'does not hold Keras {backbones.get(other).keras_name} weights'):
    pretrained.load_file(family.path, other)


@pytest.mark.parametrize('family', ['vgg16'], indirect=True)
def test_imagenet_resolves_the_familys_official_file_through_the_cache(family, monkeypatch,
                                                                       tmp_path):
  """'imagenet' with config.model.backbone=<family> downloads that family's notop file (served
  here from a file:// URL), verifies its MD5, and reads it by name. One family: the lookup is
  the declaration's, the same for all (the MD5s and URLs are checked for all below)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from hhjax.weights import official  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(official.CACHE_DIR_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras_home'))
  official_file = family.backbone.weights['imagenet']
  served = tmp_path / official_file.filename
  served.write_bytes(family.path.read_bytes())
  local = official.WeightsFile(served.as_uri(), hashlib.md5(served.read_bytes()).hexdigest(),
                               None, False)
  monkeypatch.setitem(family.backbone.weights, 'imagenet', local)
  assert official.download_needed('imagenet', family.name) == local
  model, variables = pretrained.load_pretrained('imagenet', backbone=family.name,
                                                final_endpoint=family.backbone.endpoints[0])
  assert (tmp_path / 'cache' / 'keras' / official_file.filename).is_file()
  assert official.download_needed('imagenet', family.name) is None
  assert model.final_endpoint == family.backbone.endpoints[0]
  assert set(variables['params']) == set(family.backbone.blocks_to(model.final_endpoint))


@pytest.mark.parametrize('name', [n for n in backbones.NAMES])
def test_official_files_are_the_installed_keras_ones(name):
  """URL and MD5 of both ImageNet files as keras/src/applications has them."""
  import inspect  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  backbone = backbones.get(name)
  source_module = {'inception_v3': 'inception_v3', 'vgg16': 'vgg16', 'vgg19': 'vgg19',
                   'xception': 'xception'}.get(name, 'resnet')
  if name.startswith('efficientnet_'):
    source_module = 'efficientnet'
  if name.startswith('mobilenet_v2'):
    source_module = 'mobilenet_v2'
  module = importlib.import_module(f'keras.src.applications.{source_module}')
  source = inspect.getsource(module)
  for key, weights in backbone.weights.items():
    assert weights.include_top == (key == 'imagenet_top')
    if source_module == 'mobilenet_v2':   # no MD5 in Keras's source; named by alpha and rows
      alpha = backbone.keras_args['alpha']
      assert weights.md5 is None and 'file_hash' not in source
      assert name == ('mobilenet_v2' if alpha == 1.0 else f'mobilenet_v2_{alpha}')
      suffix = '.h5' if weights.include_top else '_no_top.h5'
      assert weights.url == (f'{module.BASE_WEIGHT_PATH}mobilenet_v2_weights_tf_dim_ordering_'
                             f'tf_kernels_{float(alpha)}_224{suffix}')
      continue
    assert f'"{weights.md5}"' in source, (key, weights.md5)
    if source_module == 'resnet':
      top, notop = module.WEIGHTS_HASHES[name]
      assert weights.md5 == (top if weights.include_top else notop)
      assert weights.url == module.BASE_WEIGHTS_PATH + weights.filename
    elif source_module == 'efficientnet':   # name + ('.h5' or '_notop.h5'), as Keras builds it
      variant = name[len('efficientnet_'):]
      top, notop = module.WEIGHTS_HASHES[variant]
      assert weights.md5 == (top if weights.include_top else notop)
      suffix = '.h5' if weights.include_top else '_notop.h5'
      assert weights.url == f'{module.BASE_WEIGHTS_PATH}efficientnet{variant}{suffix}'
    else:
      url = module.WEIGHTS_PATH if weights.include_top else module.WEIGHTS_PATH_NO_TOP
      assert weights.url == url


def test_caffe_preprocessing_is_the_same_in_the_pipeline_and_undone_by_the_preview():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from hhjax.data import decode  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 3)).astype(np.float32)
  ours = preprocessing.normalize_np(pixels, 'caffe')
  np.testing.assert_array_equal(decode.normalize(tf.constant(pixels), 'caffe').numpy(), ours)
  np.testing.assert_allclose(preprocessing.denormalize(ours, 'caffe'), pixels / 255.0,
                             atol=1e-6)


def relative_errors(keras_module, keras_model, backbone, model, variables, size: int,
                    count: int = 2) -> dict[str, float]:
  """max |ours - Keras's| / max |Keras's| at every endpoint, on random images of `size` px."""
  names = list(backbone.endpoints)
  rng = np.random.default_rng(0)
  pixels = rng.uniform(0, 255, (count, size, size, 3)).astype(np.float32)
  x = preprocessing.normalize_np(pixels, backbone.preprocessing)
  # Called eagerly, not through predict: one pass needs no traced graph.
  theirs = [np.asarray(t) for t in keras_endpoints(keras_module, keras_model, backbone, names)(
      x, training=False)]
  ours = jax.jit(model.apply)(variables, x)
  errors = {}
  for name, reference in zip(names, theirs):
    assert ours[name].shape == reference.shape, name
    errors[name] = float(np.max(np.abs(np.asarray(ours[name]) - reference))
                         / np.max(np.abs(reference)))
  worst = max(errors, key=errors.get)
  print(f'{backbone.name} at {size} px: worst relative difference {errors[worst]:.2e} at '
        f'{worst} ({len(errors)} endpoints)')
  return errors


def test_every_endpoint_matches_tf_keras_in_inference_mode(family):
  import tf_keras  # pylint: disable=g-import-not-at-top
  errors = relative_errors(tf_keras, family.keras_model, family.backbone, family.model,
                           family.variables, family.size)
  assert max(errors.values()) <= TOLERANCE, errors


# A real input size per family (Keras's default for its ImageNet weights), one image.
REAL_SIZES = {'vgg16': 224, 'resnet50': 224, 'xception': 299}


@pytest.mark.parametrize('family', list(REAL_SIZES), indirect=True)
def test_every_endpoint_matches_tf_keras_at_a_real_size(family):
  import tf_keras  # pylint: disable=g-import-not-at-top
  errors = relative_errors(tf_keras, family.keras_model, family.backbone, family.model,
                           family.variables, REAL_SIZES[family.name], count=1)
  assert max(errors.values()) <= TOLERANCE, errors


# The other members: (the Keras that builds and saves the reference, its file, input size).
# Keras 3 builds a network slower than tf_keras: its .keras archive is read for the smallest.
MEMBERS = {'vgg19': ('keras', 'model.keras', 32), 'resnet101': ('tf_keras', 'notop.h5', 32),
           'resnet152': ('tf_keras', 'notop.h5', 32)}


@pytest.fixture(scope='module', params=list(MEMBERS))
def member(request, tmp_path_factory):
  """A member's Keras model with random weights, saved in that Keras's own format, and ours
  read from the file."""
  import importlib  # pylint: disable=g-import-not-at-top
  name = request.param
  which, filename, size = MEMBERS[name]
  keras_module = importlib.import_module(which)
  backbone = backbones.get(name)
  keras_module.backend.clear_session()
  keras_model = backbone.keras_application(
      keras_module, weights=None, include_top=False, input_shape=(size, size, 3))
  keras_reference.randomize(keras_model, seed=2)
  path = tmp_path_factory.mktemp(name) / filename
  if filename.endswith('.keras'):
    keras_model.save(str(path))
  else:
    keras_model.save_weights(str(path))
  model, variables = pretrained.load_file(path, name)
  return types.SimpleNamespace(name=name, size=size, backbone=backbone, keras=keras_module,
                               keras_model=keras_model, model=model, variables=variables)


def test_every_endpoint_of_the_other_members_matches_keras(member):
  assert member.model.final_endpoint == member.backbone.endpoints[-1]
  errors = relative_errors(member.keras, member.keras_model, member.backbone, member.model,
                           member.variables, member.size)
  assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize('family', ['resnet50'], indirect=True)
def test_imagenet_top_reads_the_official_file_with_its_top_and_computes_keras_logits(
    family, monkeypatch, tmp_path):
  """'imagenet_top' (ResNet50): the random tf_keras network with Keras's top on it (avg_pool,
  predictions, as ResNet50(include_top=True) builds it), saved with save_weights and served
  as the official file through the download cache, reads as the network with its 1000-class
  top, whose probabilities and logits (up to the softmax's shift) are Keras's."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import tf_keras  # pylint: disable=g-import-not-at-top
  from hhjax.weights import official  # pylint: disable=g-import-not-at-top
  name, size, backbone = family.name, family.size, family.backbone
  monkeypatch.setenv(official.CACHE_DIR_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras_home'))
  top = tf_keras.layers.Dense(1000, name='predictions')   # logits: no softmax
  keras_model = tf_keras.Model(family.keras_model.input, top(
      tf_keras.layers.GlobalAveragePooling2D(name='avg_pool')(family.keras_model.output)))
  rng = np.random.default_rng(4)
  pixels = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  x = preprocessing.normalize_np(pixels, backbone.preprocessing)
  top.set_weights([rng.normal(0.0, 1.0, (2048, 1000)).astype(np.float32),
                   rng.normal(0.0, 1.0, 1000).astype(np.float32)])
  # Logits of spread 3, so that no probability underflows in float32.
  scale = 3.0 / np.std(np.asarray(keras_model(x, training=False)))
  top.set_weights([w * scale for w in top.get_weights()])
  official_file = backbone.weights['imagenet_top']
  served = tmp_path / official_file.filename
  keras_model.save_weights(str(served))
  local = official.WeightsFile(served.as_uri(), hashlib.md5(served.read_bytes()).hexdigest(),
                               None, True)
  monkeypatch.setitem(backbone.weights, 'imagenet_top', local)
  model, variables = pretrained.load_pretrained('imagenet_top', backbone=name)
  assert (tmp_path / 'cache' / 'keras' / official_file.filename).is_file()
  assert model.include_top and model.num_classes == 1000
  logits = np.asarray(keras_model(x, training=False), np.float64)
  ours = np.asarray(jax.jit(model.apply)(variables, x)['predictions'], np.float64)
  probabilities = np.exp(logits - logits.max(-1, keepdims=True))
  probabilities /= probabilities.sum(-1, keepdims=True)
  assert np.max(np.abs(ours - probabilities)) / np.max(probabilities) <= TOLERANCE
  centered = logits - logits.mean(-1, keepdims=True)
  ours_centered = np.log(ours) - np.log(ours).mean(-1, keepdims=True)
  error = np.max(np.abs(ours_centered - centered)) / np.max(np.abs(centered))
  print(f'{name} imagenet_top logits: relative difference {error:.2e}')
  assert error <= TOLERANCE


def test_preprocessing_is_keras_preprocess_input(family):
  import tf_keras  # pylint: disable=g-import-not-at-top
  module = {'vgg16': tf_keras.applications.vgg16, 'resnet50': tf_keras.applications.resnet,
            'xception': tf_keras.applications.xception,
            'efficientnet_b0': tf_keras.applications.efficientnet,
            'mobilenet_v2_0.35': tf_keras.applications.mobilenet_v2}[family.name]
  pixels = np.random.default_rng(1).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)
  theirs = module.preprocess_input(pixels.copy())
  ours = preprocessing.normalize_np(pixels, family.backbone.preprocessing)
  np.testing.assert_array_equal(ours, theirs)
  on_device = preprocessing.normalize_images(jax.numpy.asarray(pixels.astype(np.uint8)),
                                             family.backbone.preprocessing)
  np.testing.assert_array_equal(np.asarray(on_device), theirs)


@pytest.mark.parametrize('name', ['resnet50', 'resnet101', 'resnet152'])
def test_resnet_stages_are_the_ones_keras_stacks(name, monkeypatch):
  """ResNet101 and 152 are ResNet50's blocks (compared with Keras above) in other numbers:
  the stages Keras's own ResNet function stacks, recorded without building them."""
  from keras.src.applications import resnet as keras_resnet  # pylint: disable=g-import-not-at-top
  from hhjax.model import resnet  # pylint: disable=g-import-not-at-top
  stacked = []

  def record(x, filters, blocks, stride1=2, name=None):
    stacked.append((name, filters, blocks, stride1))
    return x

  monkeypatch.setattr(keras_resnet, 'stack_residual_blocks_v1', record)
  getattr(keras_resnet, backbones.get(name).keras_name)(
      weights=None, include_top=False, input_shape=(32, 32, 3))
  depth = int(name[len('resnet'):])
  assert stacked == [(f'conv{i + 2}', 64 * 2 ** i, n, 1 if i == 0 else 2)
                     for i, n in enumerate(resnet.DEPTHS[depth])]
  assert backbones.get(name).endpoints[-1] == 'conv5_block3_out'
  assert len(backbones.get(name).endpoints) == sum(resnet.DEPTHS[depth])


# Where the training smoke cuts each family, and the endpoint fine-tuning opens from.
_CUTS = {'vgg16': ('block2_pool', 'block2_pool'),
         'resnet50': ('conv2_block3_out', 'conv2_block3_out'),
         'xception': ('block3_add', 'block3_add'),
         'efficientnet_b0': ('block2a_project_bn', 'block2a_project_bn'),
         'mobilenet_v2_0.35': ('block_2_add', 'block_2_add')}


@pytest.fixture(scope='module')
def cut_classifier(family):
  """A classifier on the family's Keras weights cut at an endpoint, fine-tuning from it."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from hhjax import entry  # pylint: disable=g-import-not-at-top
  from hhjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  cut, start = _CUTS[family.name]
  config = default.get_config()
  config.model.backbone, config.model.cut = family.name, cut
  config.model.hidden = 8
  config.finetune.unfreeze_from = start
  config.finetune.train_bn = True
  config.data.image_size = family.size
  config.data.preprocessing = family.backbone.preprocessing
  model = entry.model(config, 2)
  # Random variables of the init's shapes: compiling the init takes longer than the steps.
  variables = keras_reference.randomize_flax(jax.eval_shape(
      functools.partial(state_lib.init_variables, model, family.size, 0)), seed=0)
  variables = pretrained.load_backbone(variables, str(family.path), cut, backbone=family.name)
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 256, (4, family.size, family.size, 3)).astype(np.uint8),
           'label': np.array([0, 1, 0, 1], np.int32)}
  return types.SimpleNamespace(config=config, model=model, variables=variables, batch=batch,
                               cut=cut, start=start)


def test_finetuning_from_an_endpoint_trains_only_the_blocks_from_it(family, cut_classifier):
  """Two fine-tuning steps (BatchNorm on batch statistics) on the Keras weights cut at an
  endpoint: the blocks before unfreeze_from, parameters and BatchNorm statistics, stay
  bit-identical; the opened ones and the head move."""
  from hhjax import entry  # pylint: disable=g-import-not-at-top
  from hhjax.training import phases  # pylint: disable=g-import-not-at-top
  from hhjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from hhjax.training import steps  # pylint: disable=g-import-not-at-top
  c = cut_classifier
  variables = c.variables
  # The pretrained arrays arrived (not the random init).
  first = family.backbone.blocks[0]
  np.testing.assert_array_equal(
      jax.tree.leaves(variables['params']['backbone'][first])[0],
      jax.tree.leaves(family.variables['params'][first])[0])
  phase = [p for p in entry.phases(c.config) if p.name == 'finetune'][0]
  setup = phases.setup(phase, variables['params'], entry.optimizer(c.config))
  state = state_lib.build_state(variables, setup.tx, 0)
  step = jax.jit(steps.make_train_step(c.model, setup))
  after = step(step(state, c.batch), c.batch)
  opened = family.backbone.endpoints_to(c.cut)[family.backbone.endpoints.index(c.start):]
  for collection in ('params', 'batch_stats'):
    for block, before in state[collection].get('backbone', {}).items():
      same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before,
                          after[collection]['backbone'][block])
      if block in opened:
        assert not all(jax.tree.leaves(same)), (collection, block)
      else:
        assert all(jax.tree.leaves(same)), (collection, block)
  assert not np.array_equal(state['params']['head']['output']['kernel'],
                            after['params']['head']['output']['kernel'])


def test_gradcam_reads_the_features_at_the_cut_of_another_family():
  """Grad-CAM finds the backbone by its place in the classifier, whichever family: one family
  besides InceptionV3 (tests/test_explain.py) shows it."""
  from configs import default  # pylint: disable=g-import-not-at-top
  from hhjax import entry  # pylint: disable=g-import-not-at-top
  from hhjax import explain  # pylint: disable=g-import-not-at-top
  from hhjax.model import classifier  # pylint: disable=g-import-not-at-top
  from hhjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.backbone, config.model.cut, config.model.hidden = 'vgg16', 'block2_pool', 8
  config.data.image_size, config.data.preprocessing = 32, 'caffe'
  model = entry.model(config, 2)
  variables = jax.jit(functools.partial(state_lib.init_variables, model, 32, 0))()
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  out = jax.jit(functools.partial(explain.gradcam, model))(variables, images)
  assert out['features_map'].shape == (2, 8, 8)   # block2_pool's grid at 32 px
  assert out['map'].shape == (2, 32, 32)
  assert np.all(np.asarray(out['map']) >= 0) and np.all(np.isfinite(np.asarray(out['map'])))
  # The map is that of the features at the cut: recomputed from them and the head's gradient.
  features = classifier.backbone_module(model).apply(
      {'params': variables['params']['backbone']},
      preprocessing.normalize_images(images, 'caffe'))['block2_pool']
  grads = jax.grad(lambda a: jax.numpy.sum(explain.class_score(
      model.apply(variables, a, from_features=True), out['predicted'])))(features)
  expected = jax.nn.relu(jax.numpy.einsum('bhwk,bk->bhw', features, grads.mean(axis=(1, 2))))
  np.testing.assert_allclose(out['features_map'], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', [n for n in backbones.NAMES if n != backbones.DEFAULT])
def test_speed_rewrites_not_verified_on_a_family_stay_off(name):
  """config.speed 'on' (or 'auto' on CPU) changes nothing for a family the rewrites were not
  verified on; InceptionV3 keeps them."""
  from hhjax.model import classifier  # pylint: disable=g-import-not-at-top
  speed = {'fast_convs': 'on', 'fold_bn': 'on', 'merge_1x1': 'on', 'fast_pools': 'on'}
  cut = backbones.get(name).endpoints[0]
  model = classifier.create_model({'backbone': name, 'cut': cut, 'head': 'gap',
                                   'hidden': 0, 'dropout': 0.0}, 2,
                                  preprocessing='inception', speed=speed)
  assert classifier.backbone_module(model).lowering == backbones.Lowering()
  inception = classifier.create_model({'cut': 'mixed0', 'head': 'gap', 'hidden': 0,
                                       'dropout': 0.0}, 2, preprocessing='inception',
                                      speed=speed)
  assert classifier.backbone_module(inception).lowering == backbones.Lowering(
      fast_convs=True, fold_bn=True, merge_1x1=True, fast_pools=True)


@pytest.mark.parametrize('name', list(FAMILIES))
def test_keras_classifier_export_computes_ours_and_reads_back(name, tmp_path):
  """The Keras tutorial's classifier on the backbone, built in Keras 3 holding our variables
  (what export writes), computes our probabilities; its .keras file reads back (what
  import_keras reads) as the same classifier, bit for bit. One member per family, cut early."""
  import keras  # pylint: disable=g-import-not-at-top
  from hhjax.model import classifier  # pylint: disable=g-import-not-at-top
  from hhjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from hhjax.weights import keras_classifier  # pylint: disable=g-import-not-at-top
  from hhjax.weights import keras_model  # pylint: disable=g-import-not-at-top
  size, (cut, _) = FAMILIES[name], _CUTS[name]
  spec = keras_classifier.KerasClassifier(cut, 'flatten', 8, 0.2, 2, size, backbone=name)
  model = spec.flax_model()
  variables = jax.device_get(
      jax.jit(functools.partial(state_lib.init_variables, model, size, 0))())
  variables = keras_reference.randomize_flax(variables, seed=3)
  built = keras_classifier.build_keras_classifier(keras, spec, variables)
  x = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  theirs = built.predict(x, verbose=0)[:, 0]
  ours = np.asarray(classifier.probabilities(jax.jit(model.apply)(variables, x)))[:, 1]
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
  built.save(str(tmp_path / 'model.keras'))
  read, again = keras_model.read_classifier(tmp_path / 'model.keras')
  assert (read.backbone, read.cut, read.head, read.hidden, read.dropout, read.image_size) == (
      name, cut, 'flatten', 8, 0.2, size)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), again, variables)
  assert all(jax.tree.leaves(same))


# ------------------------------------------------------------------------- EfficientNet


@pytest.mark.parametrize('name', [f'efficientnet_b{i}' for i in range(8)])
def test_efficientnet_blocks_are_the_ones_keras_builds(name, monkeypatch):
  """B0 (compared with Keras above) scaled as Keras scales it: each variant's blocks (names,
  kernel, channels in and out, expansion, stride, drop-connect rate) as Keras's own EfficientNet
  calls its `block`, recorded without building them, and the stem's and top's widths as Keras's
  layers have them."""
  from keras.src.applications import efficientnet as keras_efficientnet  # pylint: disable=g-import-not-at-top
  from hhjax.model import efficientnet  # pylint: disable=g-import-not-at-top
  recorded = []

  def record(x, activation, drop_rate, name, filters_in, filters_out, kernel_size, strides,
             expand_ratio, se_ratio, id_skip):
    assert (activation, se_ratio, id_skip) == ('swish', 0.25, True)
    recorded.append((name, kernel_size, filters_in, filters_out, expand_ratio, strides,
                     drop_rate))
    return x

  monkeypatch.setattr(keras_efficientnet, 'block', record)
  backbone = backbones.get(name)
  keras_model = getattr(keras_efficientnet, backbone.keras_name)(
      weights=None, include_top=False, input_shape=(32, 32, 3))
  variant = name[len('efficientnet_'):]
  ours = [(b.prefix, b.kernel_size, b.filters_in, b.filters_out, b.expand_ratio, b.strides,
           b.drop_rate) for b in efficientnet.blocks(variant)]
  assert ours == recorded
  width = efficientnet.VARIANTS[variant].width
  assert keras_model.get_layer('stem_conv').kernel.shape[-1] == efficientnet.round_filters(
      32, width)
  assert keras_model.get_layer('top_conv').kernel.shape[-1] == efficientnet.round_filters(
      1280, width)
  assert backbone.endpoints == tuple(
      f'{p}add' if f_in == f_out and s == 1 else f'{p}project_bn'
      for p, _, f_in, f_out, _, s, _ in recorded) + ('top_activation',)


def test_efficientnet_b1_matches_tf_keras_at_an_odd_size(tmp_path):
  """B1 (two blocks a stage where B0 has one) at 33 px, where Keras's `correct_pad` pads
  odd-sized maps otherwise than even ones: the ends of its first three stages."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  backbone, size = backbones.get('efficientnet_b1'), 33
  tf_keras.backend.clear_session()
  keras_model = tf_keras.applications.EfficientNetB1(weights=None, include_top=False,
                                                     input_shape=(size, size, 3))
  keras_reference.randomize(keras_model, seed=4)
  keras_model.save_weights(str(tmp_path / 'b1.h5'))
  # Up to stage 3 (the 17, 9 and 5 px maps, both kernel sizes), for the suite's time.
  names = list(backbone.parity_endpoints[:3])
  model, variables = pretrained.load_pretrained(tmp_path / 'b1.h5', backbone=backbone.name,
                                                final_endpoint=names[-1])
  x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  theirs = keras_endpoints(tf_keras, keras_model, backbone, names).predict(x, verbose=0)
  ours = jax.jit(model.apply)(variables, x)
  errors = {n: float(np.max(np.abs(np.asarray(ours[n]) - t)) / np.max(np.abs(t)))
            for n, t in zip(names, theirs)}
  print(f'efficientnet_b1 (33 px) relative errors: {errors}')
  assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize('family', ['efficientnet_b0'], indirect=True)
def test_efficientnet_imagenet_is_keras_weights_imagenet(family, monkeypatch, tmp_path):
  """model.pretrained='imagenet' computes what Keras 3's EfficientNetB0(weights='imagenet')
  computes from the same file, the extra Rescaling Keras adds for the official files (their
  variance is the ImageNet stddev) included; that Keras model saved as .keras (the Rescaling in
  its config) loads to the same network."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  from keras.src.applications import efficientnet as keras_efficientnet  # pylint: disable=g-import-not-at-top
  from hhjax.weights import official  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'efficientnetb0_notop.h5'
  path.write_bytes(family.path.read_bytes())
  monkeypatch.setattr(keras_efficientnet.file_utils, 'get_file', lambda *a, **k: str(path))
  keras3 = keras.applications.EfficientNetB0(weights='imagenet', include_top=False,
                                             input_shape=(family.size, family.size, 3))
  assert [type(l).__name__ for l in keras3.layers[1:4]] == [
      'Rescaling', 'Normalization', 'Rescaling']
  monkeypatch.setenv(official.CACHE_DIR_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras_home'))
  local = official.WeightsFile(path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest(), None,
                               False)
  monkeypatch.setitem(family.backbone.weights, 'imagenet', local)
  model, variables = pretrained.load_pretrained('imagenet', backbone=family.name)
  keras3.save(str(tmp_path / 'imagenet.keras'))
  _, from_archive = pretrained.load_file(tmp_path / 'imagenet.keras', family.name)
  x = np.random.default_rng(5).uniform(0, 255, (2, family.size, family.size, 3)).astype(
      np.float32)
  theirs = keras3.predict(x, verbose=0)
  assert model.final_endpoint == family.model.final_endpoint
  for ours in (variables, from_archive):   # the parity test's compiled network
    out = np.asarray(family.apply(ours, x)['top_activation'])
    error = float(np.max(np.abs(out - theirs)) / np.max(np.abs(theirs)))
    print(f'efficientnet_b0 weights="imagenet" relative error: {error:.2e}')
    assert error <= TOLERANCE


def test_efficientnet_preprocessing_is_the_model_input_as_it_comes():
  """'raw' hands the pixels over unchanged, in the pipeline and on the device (Keras's
  efficientnet.preprocess_input is the identity; the model rescales and normalises)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from hhjax.data import decode  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 3)).astype(np.float32)
  np.testing.assert_array_equal(preprocessing.normalize_np(pixels, 'raw'), pixels)
  np.testing.assert_array_equal(decode.normalize(tf.constant(pixels), 'raw').numpy(), pixels)
  np.testing.assert_array_equal(
      np.asarray(preprocessing.normalize_images(jax.numpy.asarray(pixels.astype(np.uint8)),
                                                'raw')), pixels)
  np.testing.assert_allclose(preprocessing.denormalize(pixels, 'raw'), pixels / 255.0)


def test_efficientnet_drop_connect_is_on_in_training_steps_only_at_the_configured_rate():
  """Training steps drop each image's residual branches at the configured rate (Keras's
  per-block rates are checked against Keras above); evaluation does not; rate 0 turns it off
  (training then computes the evaluation's logits: BatchNorm stays in inference mode in
  both)."""
  from hhjax.model import classifier  # pylint: disable=g-import-not-at-top
  from hhjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  spec = {'backbone': 'efficientnet_b0', 'cut': 'block2b_add', 'head': 'gap', 'hidden': 0,
          'dropout': 0.0}
  models = {rate: classifier.create_model(dict(spec, drop_connect_rate=rate), 2,
                                          preprocessing='raw') for rate in (None, 0.0, 0.5)}
  assert {r: classifier.drop_connect_rate(m) for r, m in models.items()} == {
      None: 0.2, 0.0: 0.0, 0.5: 0.5}
  variables = keras_reference.randomize_flax(jax.eval_shape(
      functools.partial(state_lib.init_variables, models[None], 32, 0)), seed=0)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)

  def logits(model, train, seed):
    return np.asarray(jax.jit(functools.partial(model.apply, train=train))(
        variables, images, rngs={'dropout': jax.random.key(seed)}))

  assert {r: classifier.backbone_module(m).drop_connect_rate for r, m in models.items()} == {
      None: 0.2, 0.0: 0.0, 0.5: 0.5}
  evaluation = logits(models[None], False, 0)
  np.testing.assert_array_equal(logits(models[0.0], True, 0), evaluation)
  # Kept branches are scaled by 1 / (1 - rate), dropped ones gone: no image as in evaluation.
  dropped = logits(models[0.5], True, 0)
  assert np.all(np.abs(dropped - evaluation).max(axis=-1) > 1e-6)


def test_drop_connect_rate_is_checked_against_the_family():
  from configs import default  # pylint: disable=g-import-not-at-top
  from hhjax import config_checks  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.drop_connect_rate = 0.1
  assert any('config.model.drop_connect_rate = 0.1' in p and 'has no drop-connect' in p
             for p in config_checks.problems(config))   # InceptionV3
  config.model.backbone, config.model.cut = 'efficientnet_b0', 'block6d_add'
  config.finetune.unfreeze_from = 'block6a_project_bn'
  config.data.preprocessing = 'raw'
  assert config_checks.problems(config) == []
  config.model.drop_connect_rate = 1.0
  assert any('config.model.drop_connect_rate = 1.0: must be None or a number in [0, 1)' in p
             for p in config_checks.problems(config))


# ------------------------------------------------------------------------- MobileNetV2


@pytest.mark.parametrize('name', [n for n in backbones.NAMES
                                  if n.startswith('mobilenet_v2') and n not in FAMILIES])
def test_mobilenet_v2_every_alpha_matches_tf_keras_at_an_odd_size(name, tmp_path):
  """The alphas beside the family's 0.35 (compared above at 32 px): each from its tf_keras
  save_weights file, at 33 px, where Keras's `correct_pad` pads the odd maps (17, 9, 5, 3 px)
  otherwise than even ones, every endpoint."""
  import tf_keras  # pylint: disable=g-import-not-at-top
  backbone, size = backbones.get(name), 33
  tf_keras.backend.clear_session()
  keras_model = backbone.keras_application(tf_keras, weights=None, include_top=False,
                                           input_shape=(size, size, 3))
  keras_reference.randomize(keras_model, seed=5)
  keras_model.save_weights(str(tmp_path / 'notop.h5'))
  model, variables = pretrained.load_file(tmp_path / 'notop.h5', name)
  assert backbones.of_module(model) is backbone
  errors = relative_errors(tf_keras, keras_model, backbone, model, variables, size)
  assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize('family', ['mobilenet_v2_0.35'], indirect=True)
def test_mobilenet_v2_imagenet_is_fetched_without_an_md5_and_kept(family, monkeypatch, tmp_path):
  """Keras's source gives MobileNetV2's files no MD5: 'imagenet' downloads the file (served
  here from a file:// URL) unchecked, reads it, and the next fetch takes the cached copy."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from hhjax.weights import official  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv(official.CACHE_DIR_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras_home'))
  official_file = family.backbone.weights['imagenet']
  assert official_file.md5 is None
  served = tmp_path / 'served' / official_file.filename
  served.parent.mkdir()
  served.write_bytes(family.path.read_bytes())
  monkeypatch.setitem(family.backbone.weights, 'imagenet',
                      dataclasses.replace(official_file, url=served.as_uri()))
  model, variables = pretrained.load_pretrained('imagenet', backbone=family.name)
  cached = tmp_path / 'cache' / 'keras' / official_file.filename
  assert cached.is_file() and official.download_needed('imagenet', family.name) is None
  served.unlink()
  assert official.fetch_official('imagenet', family.name) == cached
  same = jax.tree.map(np.array_equal, variables, family.variables)
  assert all(jax.tree.leaves(same)) and backbones.of_module(model) is family.backbone


def test_mobilenet_v2_converted_folder_keeps_the_alpha(tmp_path):
  """A converted folder names the member, not only Keras's MobileNetV2: it reads back at its
  alpha."""
  model = backbones.get('mobilenet_v2_0.5').build('block_2_add')
  variables = jax.device_get(jax.jit(model.init)(jax.random.key(0),
                                                 np.zeros((1, 32, 32, 3), np.float32)))
  pretrained.save_converted(tmp_path / 'converted', model, variables)
  again, _ = pretrained.load_converted(tmp_path / 'converted')
  assert backbones.of_module(again).name == 'mobilenet_v2_0.5'
  assert again.final_endpoint == 'block_2_add'
