"""Train the head on backbone features computed once (config.speed.cache_features).

With augmentation off and the backbone frozen (the warm-up), every training image goes
through the same fixed function, the backbone, at every epoch. Computing its output once per
image and training the head on that cache gives the same steps for a fraction of the cost:
the same examples in the same order (the input pipeline's `train_index_stream`), the same
dropout keys, the same head arithmetic. The only difference is float32 rounding in the
backbone, which now sees the images in evaluation-sized batches.

The evaluation split gets the same treatment while the phase lasts: its features are computed
once with the phase's (frozen) backbone.

Only a single process is supported (the cache is held whole on every device); elsewhere, and
when the cache would exceed `config.speed.cache_features_max_mb`, training runs as usual.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from hhjax import errors
from hhjax import sharding
from hhjax.data import pipeline
from hhjax.data import spec as data_spec
from hhjax.data import streams
from hhjax.model import classifier
from hhjax.model import preprocessing
from hhjax.training import optim
from hhjax.training import phases as phases_lib
from hhjax.training import steps

PyTree = Any


@dataclasses.dataclass(frozen=True)
class HeadOnFeatures:
  """A Classifier seen through `apply(variables, features, ...)`: only its head runs.

  The head keeps its place in the Classifier's tree, so its parameters and its dropout keys
  are those of the full model.
  """
  model: Any

  def apply(self, variables: PyTree, features: jax.Array, *args, **kwargs):
    return self.model.apply(variables, features, *args, from_features=True, **kwargs)


@dataclasses.dataclass(frozen=True)
class Settings:
  """config.speed.cache_features and cache_features_max_mb.

  Attributes:
    mode: 'auto', 'on' or 'off' (`lowering.parse_switch` reads the config's value).
    max_mb: larger caches are skipped ('auto') or an error ('on').
  """
  mode: str = 'off'
  max_mb: float = 4096.0


def _why_not(data: data_spec.DataSpec) -> str | None:
  """Why no phase of this run can train on cached features (None: frozen phases can)."""
  if data.augments:
    return ('augmentation is on (config.data.augment.enabled, crop.random_resized_crop or '
            'random_erasing.probability): every epoch sees new images')
  if data.mix.enabled:
    return ('mixup or CutMix is on (config.data.mix): the train step mixes the images of each '
            'batch, which cached features cannot')
  if jax.process_count() > 1:
    return 'the cache is single-process only'
  return None


def _backbone_trains(setup: phases_lib.PhaseSetup) -> bool:
  return setup.phase.bn_train_from is not None or any(
      label != optim.FREEZE for label in jax.tree.leaves(setup.labels.get('backbone', {})))


def wanted(data: data_spec.DataSpec, settings: Settings, setup: phases_lib.PhaseSetup) -> bool:
  """Whether `phase` trains on cached features, per config.speed.cache_features.

  Only phases whose backbone is wholly frozen (BatchNorm included) can. 'auto' (the default)
  caches in those whenever the run allows it; 'on' is the same, except that a run that does
  not allow it at all (augmentation or mixing on, several processes) is an error that says
  why; 'off' never caches.
  """
  if settings.mode == 'off':
    return False
  reason = _why_not(data)
  if reason and settings.mode == 'on':
    raise errors.ConfigError(
        f'config.speed.cache_features="on", but this run cannot train on cached features: '
        f'{reason}. Use "auto" to cache only where possible.')
  return reason is None and not _backbone_trains(setup)


def _backbone(model):
  """The classifier's backbone on its own (the variables under 'backbone' fit it)."""
  return classifier.backbone_module(model)


def compute_features(model, params: PyTree, batch_stats: PyTree, data: data_spec.DataSpec,
                     split: str, mesh: jax.sharding.Mesh) -> list[dict[str, np.ndarray]]:
  """The backbone's output for one pass of `split`, as the eval pipeline batches it.

  Returns:
    The padded batches of the pass, {'image': features, 'label', 'mask'} as numpy arrays.
  """
  backbone = _backbone(model)
  repl, sharded = sharding.replicated(mesh), sharding.data_sharded(mesh)
  # uint8 batches (data.image_dtype) are normalised as the Classifier does it.
  forward = jax.jit(
      lambda p, s, x: backbone.apply(
          {'params': p, 'batch_stats': s},
          preprocessing.normalize_images(x, model.preprocessing))[model.cut],
      in_shardings=(repl, repl, sharded), out_shardings=sharded)
  p, s = params['backbone'], batch_stats.get('backbone', {})
  batches = []
  for batch in pipeline.create_dataset(data, split, training=False).as_numpy_iterator():
    features = forward(p, s, sharding.to_global({'image': batch['image']}, mesh)['image'])
    batches.append({'image': np.asarray(jax.device_get(features)), 'label': batch['label'],
                    'mask': batch['mask']})
  return batches


class FeatureCache:
  """One phase's cached features: the train split's (on the devices) and the validation
  split's."""

  def __init__(self, model, state: PyTree, data: data_spec.DataSpec, mesh: jax.sharding.Mesh):
    self.model = model
    self.head_model = HeadOnFeatures(model)
    self._data = data
    self._mesh = mesh
    train = compute_features(model, state['params'], state['batch_stats'], data,
                             data.train_split, mesh)
    mask = np.concatenate([b['mask'] for b in train])
    features = np.concatenate([b['image'] for b in train])[mask]
    self.labels = np.concatenate([b['label'] for b in train])[mask].astype(np.int32)
    self.num_examples = len(self.labels)
    # Held whole on every device: each step gathers its batch from it.
    self.features = jax.device_put(features, sharding.replicated(mesh))
    self._eval_batches = compute_features(
        model, state['params'], state['batch_stats'], data, data.validation, mesh)
    logging.info('Cached the backbone features of %d training images (%.0f MB on each device) '
                 'and of the %r split: this phase trains only the head.', self.num_examples,
                 features.nbytes / 2**20, data.validation)

  def batches(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """{'index', 'label'} per step from `start_step` on, in the input pipeline's order."""
    stream = streams.train_index_stream(
        self.num_examples, self._data.seed, self._data.batch_size,
        start_step=start_step).batch(self._data.batch_size)
    for _, indices in stream.as_numpy_iterator():
      indices = indices.astype(np.int32)
      yield {'index': indices, 'label': self.labels[indices]}

  def eval_batches(self) -> list[dict[str, np.ndarray]]:
    """The validation split's cached features, as the eval pipeline batches them (an
    Evaluator's `batches`)."""
    return self._eval_batches

  def train_step(self, setup: phases_lib.PhaseSetup
                 ) -> Callable[[PyTree, Mapping[str, Any]], PyTree]:
    """The phase's jitted step on cached features: `(state, {'index', 'label'}) -> state`."""
    repl, data = sharding.replicated(self._mesh), sharding.data_sharded(self._mesh)
    jitted = jax.jit(gather_step(steps.make_train_step(self.head_model, setup)),
                     in_shardings=(repl, data, repl), out_shardings=repl, donate_argnums=0)
    return lambda state, batch: jitted(state, batch, self.features)


def gather_step(step_on_features: Callable[[PyTree, PyTree], PyTree]
                ) -> Callable[[PyTree, Mapping[str, Any], jax.Array], PyTree]:
  """A train step on the head turned into `(state, {'index', 'label'}, features) -> state`.

  Each step gathers its batch from the features of every training image, held on the device.
  """

  def step(state, batch, features):
    images = jnp.take(features, batch['index'], axis=0)
    return step_on_features(state, {'image': images, 'label': batch['label']})

  return step


def feature_shape(model, image_size: int) -> jax.ShapeDtypeStruct:
  """The backbone's output for one image of `image_size` (shape [1, h, w, c], dtype)."""
  return jax.eval_shape(
      lambda x: _backbone(model).init_with_output(jax.random.PRNGKey(0), x)[0][model.cut],
      jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))


def estimated_mb(model, image_size: int, num_examples: int) -> float:
  """The train cache's size in MiB (features of every training image)."""
  shape = feature_shape(model, image_size)
  return num_examples * int(np.prod(shape.shape)) * jnp.dtype(shape.dtype).itemsize / 2**20


def for_phase(model, setup: phases_lib.PhaseSetup, state: PyTree, data: data_spec.DataSpec,
              settings: Settings, mesh: jax.sharding.Mesh,
              num_examples: int) -> FeatureCache | None:
  """The phase's feature cache, or None when the phase trains on images as usual."""
  if not wanted(data, settings, setup):
    return None
  rate = classifier.drop_connect_rate(model)
  if rate > 0:
    # Keras's fit drops connections in the frozen blocks too: no two epochs see the same
    # features.
    why = (f'backbone drops connections in training (config.model.drop_connect_rate = '
           f'{rate:g}), so its features differ at every step')
    if settings.mode == 'on':
      raise errors.ConfigError(f'config.speed.cache_features="on", but the {why}. Set '
                               f'config.model.drop_connect_rate=0 to cache them.')
    logging.info('The %s: training on images.', why)
    return None
  limit = settings.max_mb
  mb = estimated_mb(model, data.image_size, num_examples)
  if mb > limit:
    message = (f'The backbone features of the {num_examples} training images would take '
               f'{mb:.0f} MB, more than config.speed.cache_features_max_mb = {limit:.0f}')
    if settings.mode == 'on':
      raise errors.ConfigError(
          f'{message}: raise that limit or set config.speed.cache_features="auto".')
    logging.info('%s: training on images.', message)
    return None
  return FeatureCache(model, state, data, mesh)
