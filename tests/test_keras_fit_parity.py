"""Training step by step against Keras 3's `fit`: the same file, the same batches.

Keras 3 (the installed backend, TensorFlow) builds the tutorial's classifier on a backbone
(`keras.applications`, no weights), draws random weights (`keras_reference.randomize`) and saves
it with `model.save('model.h5')`; hhjax reads that file (`keras_model.read_classifier`). Then
both train phase by phase on the same batches of real images: hhjax with the train step
main.py compiles (`entry.setup_for` -> `steps.make_train_step`, jitted with main's shardings;
between phases `train._next_phase`, which starts the next phase from the EMA when there is
one), Keras with `fit(x, y, batch_size, shuffle=False, class_weight=...)` after compiling the
phase's Keras optimizer (built from the same config's `OptimizerSpec` and schedule,
`keras_classifiers.keras_optimizer`) and loss, one compile per phase as the tutorial
recompiles. Each step's loss must agree within 1e-4 relative; the trainable parameters after
each phase within 1e-2 of Keras's change over the phase (Keras's EMA too, where one is kept:
Keras swaps it into the weights when fit ends, `finalize_variable_values`, which is what the
comparison reads; the raw weights are read just before).

What trains matches Keras's `trainable` flags: the head (warm-up), or the head and the opened
blocks (fine-tuning), every BatchNorm frozen, so in inference mode on both sides; hhjax's
rules freeze the BatchNorms' beta (and gamma), as a frozen Keras BatchNormalization does
(hhjax's default fine-tuning trains beta in inference mode, which Keras's fit cannot; that one
is compared with Keras's own arithmetic in test_keras_both_ways.py). Dropout is 0.

Per-layer rates (`param_labels` multipliers and `layer_decay`) have no Keras equivalent in one
optimizer. Their case compares with a Keras model whose layers train at the same effective
rates: `fit` with a train step that applies one Keras optimizer per rate group, at the phase's
rate times the group's factor (`keras_classifiers.grouped_rates_model`); the factors are
written out here from timm's layer decay, not taken from hhjax.

Nothing needs `steps_per_execution`. With gradient accumulation Keras evaluates a schedule at
its micro-batch counter and hhjax at its optimizer-step counter (README, "Training"): that
case keeps a constant rate, where both agree. `class_weight` is fit's: each example's loss
times its class's weight, summed over the batch size.

For time: images are the smallest each backbone takes, cuts the first block, batches of 4,
3-4 steps a phase; Keras runs fit eagerly (`compile(run_eagerly=True)`: the same operations,
no graph to trace), and hhjax's speed rewrites are off, as 'auto' sets them on GPU and TPU
(test_fast_model.py holds them to the plain model's outputs and gradients).
"""

import dataclasses
import types

from flax import traverse_util
import jax
import numpy as np
import pytest

from configs import default
from hhjax import entry
from hhjax import sharding
from hhjax import train
from hhjax.model import backbones
from hhjax.model import preprocessing
from hhjax.training import optim
from hhjax.training import phases as phases_lib
from hhjax.training import state as state_lib
from hhjax.training import steps
from hhjax.weights import keras_classifier
from hhjax.weights import keras_model
import keras_classifiers
import keras_reference

keras = pytest.importorskip('keras')

BATCH = 4
LOSS_RTOL = 1e-4          # per-step losses, relative
PARAM_GAP = 1e-2          # max |hhjax - Keras| / max |Keras's change|, per parameter array
BN_PARAMS = r'bn/(bias|scale)$'   # every BatchNorm's beta and gamma: frozen, as in Keras

# backbone -> (cut, image size): the cheapest cut of each family at its smallest input size.
BACKBONES = {'inception_v3': ('mixed0', 75), 'resnet50': ('conv2_block1_out', 32),
             'xception': ('block2_add', 71)}


@dataclasses.dataclass(frozen=True)
class Case:
  backbone: str
  warmup_steps: int        # one step per epoch: each step's loss is an epoch's train_loss
  finetune_steps: int
  overrides: dict          # config fields (dotted) on top of `_config`'s
  # Keras: the learning-rate factor of a layer from (block, hhjax path of its first array);
  # None: one optimizer, one rate.
  keras_factor: object = None


def _layer_decay_factor(block, path):
  """The per-layer case's rates as timm computes them: layer decay 0.5 over stem, mixed0,
  head (0.25, 0.5, 1; the stem is frozen), and mixed0's branch_pool times 0.1 by its rule."""
  factor = {'mixed0': 0.5, 'head': 1.0}[block]
  return factor * (0.1 if path[:3] == ('backbone', 'mixed0', 'branch_pool') else 1.0)


CASES = {
    # The recipes, on InceptionV3 cut at mixed0: warm-up phases train the head, fine-tuning
    # phases the head and mixed0 too.
    'sgd_nesterov_piecewise': Case('inception_v3', 4, 0, {
        'optimizer.name': 'sgd', 'optimizer.momentum': 0.9, 'optimizer.nesterov': True,
        'warmup.schedule.name': 'piecewise', 'warmup.schedule.boundaries': (0, 2),
        'warmup.schedule.values': (0.02, 0.01, 0.005)}),
    'adamw_cosine_warmup_clipnorm_smoothing_class_weights': Case('inception_v3', 4, 0, {
        'optimizer.name': 'adamw', 'optimizer.global_clipnorm': 0.1,
        'optimizer.weight_decay': 0.1, 'optimizer.weight_decay_exclude': ('bias',),
        'warmup.learning_rate': 1e-4, 'warmup.schedule.name': 'cosine',
        'warmup.schedule.warmup_target': 1e-3, 'warmup.schedule.warmup_steps': 2,
        'warmup.schedule.decay_steps': 3, 'warmup.schedule.alpha': 0.1,
        'loss.label_smoothing': 0.1, 'loss.class_weight': {'horses': 0.6, 'humans': 1.7}}),
    # Warm-up then fine-tuning: the second phase starts from the first's EMA, in both.
    'adam_ema_accumulation_two_phases': Case('inception_v3', 4, 2, {
        'optimizer.name': 'adam', 'optimizer.use_ema': True, 'optimizer.ema_momentum': 0.5,
        'optimizer.gradient_accumulation_steps': 2, 'warmup.learning_rate': 1e-2,
        'finetune.learning_rate': 1e-3}),
    'rmsprop_per_layer_rates': Case('inception_v3', 0, 3, {
        'finetune.learning_rate': 1e-3, 'finetune.layer_decay': 0.5,
        'finetune.param_labels': ((BN_PARAMS, 'freeze'), ('^backbone/mixed0/branch_pool/', 0.1),
                                  ('^head/', 'train'), ('^backbone/mixed0/', 'train'),
                                  ('^backbone/', 'freeze'))},
        keras_factor=_layer_decay_factor),
    # The other families: warm-up then fine-tuning of the block at the cut, RMSprop.
    'resnet50_warmup_finetune': Case('resnet50', 3, 3, {}),
    'xception_warmup_finetune': Case('xception', 3, 3, {}),
}


def _config(case: Case):
  """The default config on `case`'s backbone, with `case`'s overrides."""
  cut, size = BACKBONES[case.backbone]
  config = default.get_config()
  config.model.backbone, config.model.cut, config.model.pretrained = case.backbone, cut, None
  config.model.head, config.model.hidden, config.model.dropout = 'gap', 8, 0.0
  config.data.image_size = size
  config.data.preprocessing = backbones.get(case.backbone).preprocessing
  config.batch_size, config.steps_per_epoch = BATCH, 1
  for rewrite in ('fast_convs', 'fold_bn', 'merge_1x1', 'fast_pools'):
    config.speed[rewrite] = 'off'   # as 'auto' is off GPU and TPU: half the compile time
  config.warmup.epochs, config.finetune.epochs = case.warmup_steps, case.finetune_steps
  config.warmup.learning_rate, config.finetune.learning_rate = 1e-3, 1e-4
  config.finetune.unfreeze_from = cut
  config.finetune.param_labels = ((BN_PARAMS, 'freeze'), ('^head/', 'train'),
                                  (f'^backbone/{cut}/', 'train'), ('^backbone/', 'freeze'))
  for field, value in case.overrides.items():
    *parents, name = field.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


@pytest.fixture(scope='module')
def images(real_data_dir):
  """uint8 pixels of 12 horses and 12 humans, alternating, at each size; their labels."""
  files, labels = keras_classifiers.labelled_files(real_data_dir, 'train')
  order = np.stack([np.flatnonzero(labels == 0)[:12], np.flatnonzero(labels == 1)[:12]], 1)
  order = order.reshape(-1)
  sizes = {size for _, size in BACKBONES.values()}
  return {size: keras_classifiers.pixels([files[i] for i in order], size) for size in sizes}, (
      labels[order])


@pytest.fixture(scope='module')
def keras_files(tmp_path_factory):
  """backbone -> (the Keras 3 classifier, its weights as saved, its file read by hhjax);
  built on first use."""
  built = {}

  def get(name):
    if name not in built:
      cut, size = BACKBONES[name]
      spec = keras_classifier.KerasClassifier(cut, 'gap', 8, 0.0, 2, size, backbone=name)
      model = keras_classifier.build_keras_classifier(keras, spec)
      keras_reference.randomize(model, seed=1)
      path = tmp_path_factory.mktemp(name) / 'model.h5'
      model.save(str(path))
      read, variables = keras_model.read_classifier(path)
      assert (read.backbone, read.cut, read.hidden) == (name, cut, 8)
      built[name] = types.SimpleNamespace(model=model, spec=spec, weights=model.get_weights(),
                                          variables=variables)
    return built[name]

  return get


# ------------------------------------------------------------------------------------ hhjax


def hhjax_fit(config, variables, pixels, labels, class_names):
  """main.py's phases on the batches: per phase, each step's loss (the epoch's train_loss,
  one step per epoch), the parameters and their EMA (None without) at its end, its labels."""
  mesh = sharding.make_mesh()
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  model = entry.model(config, len(class_names))
  run = types.SimpleNamespace(phases=entry.phases(config), mesh=mesh,
                              setup=entry.setup_for(config, entry.loss(config, class_names)))
  progress = phases_lib.Progress(run.phases[0].name)
  setup = run.setup(run.phases[0], variables['params'])
  state = state_lib.from_variables(variables, setup.tx, int(config.seed), mesh)
  results, start = [], 0
  while True:
    step = jax.jit(steps.make_train_step(model, setup), in_shardings=(repl, data),
                   out_shardings=repl, donate_argnums=0)
    losses = []
    for i in range(start, start + setup.phase.epochs):
      batch = {'image': pixels[i * BATCH:(i + 1) * BATCH],
               'label': labels[i * BATCH:(i + 1) * BATCH]}
      state = step(dict(state, metrics=steps.zero_metrics()), sharding.to_global(batch, mesh))
      metrics = jax.device_get(state['metrics'])
      losses.append(float(metrics['loss_sum'] / metrics['count']))
    start += setup.phase.epochs
    ema = optim.inference_params(state) if config.optimizer.use_ema else None
    results.append(types.SimpleNamespace(losses=losses, labels=setup.labels,
                                         params=jax.device_get(state['params']),
                                         ema=None if ema is None else jax.device_get(ema)))
    following = train._next_phase(run, state, progress)   # pylint: disable=protected-access
    if following is None:
      return results
    state, progress, setup = following


# ------------------------------------------------------------------------------------ Keras


def keras_fit(case: Case, config, built, pixels, labels):
  """Keras 3's fit, phase by phase, as `hhjax_fit` trains: per phase each step's loss, the
  arrays (by hhjax path) before and after fit's end."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model, spec = built.model, built.spec
  model.set_weights(built.weights)
  spec_opt = entry.optimizer(config)
  loss_spec = entry.loss(config, ['horses', 'humans'])
  x = preprocessing.normalize_np(pixels, config.data.preprocessing)
  blocks = backbones.get(case.backbone).blocks_to(config.model.cut)
  paths = keras_classifier.keras_layer_paths(model, spec)
  results, start = [], 0
  for phase in entry.phases(config):
    # The head; in fine-tuning also the opened blocks' layers but their BatchNormalizations.
    opened = blocks[blocks.index(config.finetune.unfreeze_from):]
    for p in paths:
      p.layer.trainable = p.block == 'head' or (
          phase.name == 'finetune' and not p.is_batch_norm and p.block in opened)
    fitted = model
    if case.keras_factor:
      groups = {}
      for p in paths:
        if p.layer.trainable:
          factor = case.keras_factor(p.block, p.targets[0][1])
          groups.setdefault(factor, []).extend(p.layer.trainable_weights)
      fitted = keras_classifiers.grouped_rates_model(keras, tf, model, [
          (keras_classifiers.keras_optimizer(keras, spec_opt, phase.learning_rate * f,
                                             phase.schedule), v)
          for f, v in groups.items()])
      optimizer = keras.optimizers.SGD(0.0)   # fit's own: never applied
    else:
      optimizer = keras_classifiers.keras_optimizer(keras, spec_opt, phase.learning_rate,
                                                    phase.schedule)
    fitted.compile(optimizer=optimizer,
                   loss=keras.losses.BinaryCrossentropy(label_smoothing=loss_spec.label_smoothing),
                   jit_compile=False, run_eagerly=True)
    n = phase.epochs * BATCH
    class_weight = (None if loss_spec.class_weights is None
                    else dict(enumerate(loss_spec.class_weights)))
    before = keras_classifiers.keras_variables(model, spec)
    losses, raw, final = keras_classifiers.fit_steps(
        keras, fitted, spec, x[start:start + n], labels[start:start + n], batch_size=BATCH,
        class_weight=class_weight)
    start += n
    results.append(types.SimpleNamespace(losses=losses, before=before, raw=raw, final=final))
  return results


# ------------------------------------------------------------------------------------- tests


def _worst_gap(ours, theirs, before, labels) -> float:
  """max over trainable arrays of max |ours - Keras| / max |Keras's change over the phase|."""
  worst = 0.0
  for path, label in traverse_util.flatten_dict(labels).items():
    if label != optim.TRAIN:
      continue
    key = ('params',) + tuple(path)
    change = np.max(np.abs(theirs[key] - before[key]))
    assert change > 1e-6, f'{"/".join(path)} barely moved ({change:.1e}): proves little'
    mine = np.asarray(traverse_util.flatten_dict(ours)[tuple(path)])
    worst = max(worst, float(np.max(np.abs(mine - theirs[key])) / change))
  return worst


@pytest.mark.parametrize('name', list(CASES))
def test_training_steps_equal_keras_fit(name, images, keras_files):
  case = CASES[name]
  config = _config(case)
  built = keras_files(case.backbone)
  pixels, labels = images
  pixels = pixels[BACKBONES[case.backbone][1]]
  ours = hhjax_fit(config, built.variables, pixels, labels, ['horses', 'humans'])
  theirs = keras_fit(case, config, built, pixels, labels)
  assert len(ours) == len(theirs) == (case.warmup_steps > 0) + (case.finetune_steps > 0)
  report = []
  for phase, mine, keras_ in zip(entry.phases(config), ours, theirs):
    relative = np.abs(np.asarray(mine.losses) / np.asarray(keras_.losses) - 1)
    gap = _worst_gap(mine.params, keras_.raw, keras_.before, mine.labels)
    ema_gap = (None if mine.ema is None
               else _worst_gap(mine.ema, keras_.final, keras_.before, mine.labels))
    report.append(f'{phase.name}: losses {np.round(mine.losses, 6).tolist()} (Keras '
                  f'{np.round(keras_.losses, 6).tolist()}), worst relative difference per step '
                  f'{np.array2string(relative, precision=1)}, parameters {gap:.1e} of Keras\'s '
                  f'change' + ('' if ema_gap is None else f', EMA {ema_gap:.1e}'))
    print(f'{name} {report[-1]}')
    assert np.all(relative <= LOSS_RTOL), report
    assert gap <= PARAM_GAP, report
    assert ema_gap is None or ema_gap <= PARAM_GAP, report
