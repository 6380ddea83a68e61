"""Training, evaluation and prediction: frozen warm-up, then fine-tuning, with exact resume.

The run is a list of phases (`warmup`: backbone frozen; `finetune`: blocks from
`config.finetune.unfreeze_from` on open). Each phase has its own jitted train step, built from
the config by `make_train_step`: a pure function `state -> state` over a mesh of all devices
(batch sharded on 'data', everything else replicated, state donated).

The state is a plain pytree:

    step            int32, global step (counts every phase; also the data stream's position)
    params          {'backbone': ..., 'head': ...}
    batch_stats     {'backbone': ...}
    opt_state       optax state of this phase's optimizer (none for frozen parameters)
    rng             dropout key; step `s` uses fold_in(rng, s)
    metrics         running sums of the current epoch (loss, correct, count)
    nonfinite_step  first step whose loss was NaN/inf, or -1

Everything needed to continue exactly is in the state or in the checkpoint's metadata (phase,
phase start, whether the phase is finished), so a run killed at any moment and started again
with the same command ends with the same parameters as an uninterrupted one.

Workdir layout: config.json, checkpoints/, metrics.jsonl, tensorboard/, loss.png,
accuracy.png, eval.json.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import functools
import glob
import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hhjax import checkpointing
from hhjax.training import feature_cache
from hhjax import metrics as metrics_lib
from hhjax.model import classifier as models
from hhjax.training import optim
from hhjax import sharding

PyTree = Any
CONFIG_FILE = 'config.json'
EVAL_FILE = 'eval.json'
CHECKPOINT_DIR = 'checkpoints'
EARLY_STOPPING_METRICS = ('train_accuracy', 'train_loss', 'val_accuracy', 'val_loss')


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


# ------------------------------------------------------------------------------------ phases


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stage of training with its own trainable set and learning rate."""
  name: str                       # 'warmup' or 'finetune'
  epochs: int
  learning_rate: float
  rules: tuple[tuple[str, str], ...]   # freezing rules, first match wins
  bn_train_from: str | None       # None: every BatchNorm in inference mode


def _rules(value) -> tuple[tuple[str, str], ...] | None:
  if value is None:
    return None
  return tuple((str(p), str(l)) for p, l in value)


def make_phases(config: ml_collections.ConfigDict) -> list[Phase]:
  """The phases `config` asks for, in order (a phase with 0 epochs is left out)."""
  blocks = models.backbone_blocks(config.model.cut)
  phases = []
  if config.warmup.epochs > 0:
    rules = _rules(config.warmup.get('param_labels')) or (
        ('^head/', optim.TRAIN), ('^backbone/', optim.FREEZE))
    phases.append(Phase('warmup', int(config.warmup.epochs),
                        float(config.warmup.learning_rate), rules, None))
  if config.finetune.epochs > 0:
    ft = config.finetune
    default_rules = tuple(optim.finetune_rules(ft.unfreeze_from, blocks))  # validates the name
    rules = _rules(ft.get('param_labels')) or default_rules
    phases.append(Phase('finetune', int(ft.epochs), float(ft.learning_rate), rules,
                        ft.unfreeze_from if ft.train_bn else None))
  if not phases:
    raise ValueError('Nothing to train: config.warmup.epochs and config.finetune.epochs are 0.')
  return phases


@dataclasses.dataclass
class Progress:
  """Where the run stands between steps; saved as checkpoint metadata."""
  phase_index: int = 0
  phase_start_step: int = 0
  phase_done: bool = False
  epochs_done: int = 0            # completed epochs over all phases
  stop_reason: str | None = None  # why the last phase ended early, if it did


# ------------------------------------------------------------------------------------ losses


def per_example_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Binary cross-entropy on one sigmoid logit, or softmax cross-entropy over classes."""
  if logits.shape[-1] == 1:
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def predicted_class(logits: jax.Array) -> jax.Array:
  if logits.shape[-1] == 1:
    return (logits[:, 0] > 0).astype(jnp.int32)  # sigmoid > 0.5, as Keras's binary accuracy
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _zero_metrics() -> dict[str, jax.Array]:
  return {'loss_sum': jnp.zeros((), jnp.float32), 'correct': jnp.zeros((), jnp.int32),
          'count': jnp.zeros((), jnp.int32)}


# ------------------------------------------------------------------------------------ state


def make_optimizer(config: ml_collections.ConfigDict, phase: Phase,
                   labels: PyTree) -> optax.GradientTransformation:
  if config.optimizer.name != 'rmsprop':
    raise ValueError(f"config.optimizer.name must be 'rmsprop', got {config.optimizer.name!r}.")
  return optim.make_optimizer(labels, phase.learning_rate, rho=float(config.optimizer.rho),
                              epsilon=float(config.optimizer.epsilon))


def _dummy_images(config: ml_collections.ConfigDict, batch: int = 1) -> jax.Array:
  size = int(config.data.image_size)
  return jnp.zeros((batch, size, size, 3), jnp.float32)


def init_variables(model: models.Classifier, config: ml_collections.ConfigDict) -> PyTree:
  """Random initial `{'params', 'batch_stats'}` (Keras initialisers), from config.seed.

  The init key uses the 'rbg' generator (XLA's RngBitGenerator): on CPU it compiles about
  3x faster than threefry for the hundreds of parameter arrays, and the output is replicated,
  so every device computes the same values. Dropout keeps threefry, whose bits do not depend
  on how the batch is sharded.
  """
  init_rng = jax.random.key(config.seed, impl='rbg')
  variables = model.init({'params': init_rng}, _dummy_images(config), train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def build_state(variables: PyTree, tx: optax.GradientTransformation, seed: int) -> PyTree:
  """The training state at step 0 of the first phase (pure; works under `jax.eval_shape`)."""
  return {
      'step': jnp.zeros((), jnp.int32),
      'params': variables['params'],
      'batch_stats': variables['batch_stats'],
      'opt_state': tx.init(variables['params']),
      'rng': jax.random.split(jax.random.PRNGKey(seed))[1],
      'metrics': _zero_metrics(),
      'nonfinite_step': jnp.full((), -1, jnp.int32),
  }


def _replicate(tree: PyTree, repl: jax.sharding.Sharding) -> PyTree:
  """`tree` replicated on every device, through host memory.

  In a run of several processes, `jax.device_put` of an array that sits on one local device
  builds a global array whose shards orbax cannot save; from numpy it builds a proper one.
  """
  return jax.device_put(jax.device_get(tree), repl)


def _with_sharding(tree: PyTree, sharding_: jax.sharding.Sharding) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), tree)


# ------------------------------------------------------------------------------------ steps


def make_train_step(model: models.Classifier, phase: Phase, labels: PyTree,
                    tx: optax.GradientTransformation) -> Callable[[PyTree, PyTree], PyTree]:
  """The phase's train step `(state, batch) -> state`, not yet jitted.

  Only the parameters labelled 'train' are differentiated: the frozen ones are closed over as
  constants, so XLA builds no backward pass through them (a warm-up step costs about one
  backbone forward plus the head) and they come out bit-identical.
  """

  def loss_fn(trainable, frozen, batch_stats, images, labels_, rng):
    variables = {'params': optim.merge(trainable, frozen), 'batch_stats': batch_stats}
    if phase.bn_train_from is None:
      logits = model.apply(variables, images, train=True, rngs={'dropout': rng})
      new_batch_stats = batch_stats
    else:
      logits, updated = model.apply(variables, images, train=True,
                                    bn_train_from=phase.bn_train_from,
                                    rngs={'dropout': rng}, mutable=['batch_stats'])
      new_batch_stats = updated['batch_stats']
    losses = per_example_loss(logits, labels_)
    return jnp.mean(losses), (logits, new_batch_stats)

  def train_step(state, batch):
    step = state['step']
    rng = jax.random.fold_in(state['rng'], step)
    images, labels_ = batch['image'], batch['label']
    trainable, frozen = optim.split(state['params'], labels)
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, state['batch_stats'], images, labels_, rng)
    # The optimizer is an optax.partition over the full tree; the frozen part's "gradients"
    # are zeros its 'freeze' transform discards, and its output is dropped below, so XLA
    # removes both.
    full_grads = optim.merge(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state['opt_state'], state['params'])
    trainable_updates, _ = optim.split(updates, labels)
    params = optim.merge(optax.apply_updates(trainable, trainable_updates), frozen)
    m = state['metrics']
    correct = jnp.sum(predicted_class(logits) == labels_)
    finite = jnp.isfinite(loss)
    return {
        'step': step + 1,
        'params': params,
        'batch_stats': batch_stats,
        'opt_state': opt_state,
        'rng': state['rng'],
        'metrics': {'loss_sum': m['loss_sum'] + loss * labels_.shape[0],
                    'correct': m['correct'] + correct.astype(jnp.int32),
                    'count': m['count'] + labels_.shape[0]},
        # Recorded as the step number the progress lines show (steps done, 1-based).
        'nonfinite_step': jnp.where((state['nonfinite_step'] < 0) & ~finite, step + 1,
                                    state['nonfinite_step']),
    }

  return train_step


def make_eval_step(model: models.Classifier, num_classes: int):
  """`(params, batch_stats, batch) -> sums` over the masked examples, with a confusion matrix."""

  def eval_step(params, batch_stats, batch):
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                         train=False)
    labels_ = batch['label']
    mask = batch['mask'].astype(jnp.float32) if 'mask' in batch else jnp.ones(labels_.shape)
    pred = predicted_class(logits)
    confusion = jnp.einsum('bi,bj->ij', jax.nn.one_hot(labels_, num_classes) * mask[:, None],
                           jax.nn.one_hot(pred, num_classes))
    return {'loss_sum': jnp.sum(per_example_loss(logits, labels_) * mask),
            'correct': jnp.sum((pred == labels_) * mask),
            'count': jnp.sum(mask),
            'confusion': confusion}

  return eval_step


# ------------------------------------------------------------------------------------ config


def _absolute(workdir: str) -> str:
  """Local paths made absolute; URLs such as gs://bucket/run (multi-host TPU) kept as they are."""
  workdir = os.fspath(workdir)
  return workdir if '://' in workdir else os.path.abspath(workdir)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config to WORKDIR/config.json (what eval and predict read)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(workdir) / CONFIG_FILE
  tmp = path.parent / (CONFIG_FILE + '.tmp')
  tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
  tmp.replace(path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir`."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} not found: --workdir must be a directory that '
                            '`python main.py --mode=train` wrote, or pass --config too.')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _flat(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  a, b = _flat(saved), _flat(current)
  return [f'{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}'
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def pretrained_spec(config: ml_collections.ConfigDict) -> str | None:
  """config.model.pretrained, with the command line's `None` (a string there) meaning none."""
  spec = config.model.get('pretrained')
  if spec is None or str(spec).strip().lower() in ('', 'none', 'null'):
    return None
  return str(spec)


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  if config.steps_per_epoch:
    return int(config.steps_per_epoch)
  return max(1, num_train_examples // int(config.batch_size))


def _eval_batch_size(config: ml_collections.ConfigDict) -> int:
  return int(config.get('eval_batch_size') or config.batch_size)


# ------------------------------------------------------------------------------------ runner


class _Evaluator:
  """Runs the jitted eval step over one pass of the eval split (or of `dataset`)."""

  def __init__(self, model, config, num_classes, mesh, dataset=None):
    from hhjax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top
    self._mesh = mesh
    self._config = config
    self._num_classes = num_classes
    repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    self._step = jax.jit(make_eval_step(model, num_classes), in_shardings=(repl, repl, data),
                         out_shardings=repl)
    self._dataset = dataset
    self._input_pipeline = input_pipeline

  def __call__(self, params, batch_stats) -> dict[str, Any]:
    if self._dataset is None:   # one pass per call; the object is reused across epochs
      self._dataset = self._input_pipeline.create_dataset(self._config,
                                                          self._config.data.eval_split)
    totals = None
    for batch in self._dataset.as_numpy_iterator():
      out = self._step(params, batch_stats, sharding.to_global(batch, self._mesh))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
      raise ValueError(f'The eval split {self._config.data.eval_split!r} yielded no batches.')
    totals = jax.device_get(totals)
    count = float(totals['count'])
    return {'loss': float(totals['loss_sum']) / count,
            'accuracy': float(totals['correct']) / count,
            'count': int(count),
            'confusion': np.asarray(totals['confusion']).round().astype(int)}


def _metrics_from_state(state: PyTree) -> tuple[float, float, int]:
  m = jax.device_get(state['metrics'])
  count = int(m['count'])
  if not count:
    return float('nan'), float('nan'), 0
  return float(m['loss_sum']) / count, float(m['correct']) / count, count


def _format_eta(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


def _early_stop(config: ml_collections.ConfigDict, row: Mapping[str, float]) -> str | None:
  es = config.early_stopping
  if not es.metric:
    return None
  if es.metric not in EARLY_STOPPING_METRICS:
    raise ValueError(f'config.early_stopping.metric must be one of {EARLY_STOPPING_METRICS}, '
                     f'got {es.metric!r}.')
  value, threshold = row[es.metric], float(es.threshold)
  mode = es.get('mode', 'max')
  if (mode == 'max' and value > threshold) or (mode == 'min' and value < threshold):
    return (f'{es.metric} = {value:.4f} {">" if mode == "max" else "<"} {threshold} '
            '(config.early_stopping)')
  return None


def _phase_setup(model, config, phase, params_shape, mesh):
  labels = optim.param_labels(params_shape, phase.rules)
  tx = make_optimizer(config, phase, labels)
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  step_fn = jax.jit(make_train_step(model, phase, labels, tx), in_shardings=(repl, data),
                    out_shardings=repl, donate_argnums=0)
  return labels, tx, step_fn


def _abstract_state(model, config, phase, mesh):
  variables = jax.eval_shape(functools.partial(init_variables, model, config))
  labels = optim.param_labels(variables['params'], phase.rules)
  tx = make_optimizer(config, phase, labels)
  state = jax.eval_shape(lambda v: build_state(v, tx, config.seed), variables)
  return _with_sharding(state, sharding.replicated(mesh))


def _model_hint(saved_config: Mapping[str, Any] | None, config) -> str:
  if not saved_config:
    return ''
  diffs = [d for d in _config_differences(saved_config.get('model', {}),
                                          _config_dict(config.model))
           if not d.startswith('pretrained')]
  if saved_config.get('data', {}).get('image_size') != config.data.image_size:
    diffs.append(f"data.image_size: checkpoint {saved_config.get('data', {}).get('image_size')}"
                 f', now {config.data.image_size}')
  if not diffs:
    return ''
  return 'The checkpoint was written with another model config:\n  ' + '\n  '.join(
      f'config.model.{d}' if not d.startswith('data.') else f'config.{d}' for d in diffs) + '\n'


def restore_state(ckpts: checkpointing.Checkpoints, step: int, model, config, mesh
                  ) -> tuple[PyTree, dict[str, Any]]:
  """Restores the full state saved at `step`; returns (state, checkpoint info)."""
  info = ckpts.info(step)
  phases = make_phases(config)
  names = [p.name for p in phases]
  saved_phase = info.get('phase')
  if saved_phase not in names:
    raise checkpointing.CheckpointMismatchError(
        f'The checkpoint at step {step} was written in phase {saved_phase!r}, which the current '
        f'config does not have (phases: {names}).')
  phase = phases[names.index(saved_phase)]
  hint = _model_hint(info.get('config'), config)
  state = ckpts.restore(step, _abstract_state(model, config, phase, mesh), hint)
  return state, info


def _log_phase(phase: Phase, labels: PyTree, params: PyTree) -> None:
  trainable, frozen = optim.split(params, labels)
  logging.info('Phase %s: %d epochs, learning rate %g, %s trainable / %s frozen parameters%s.',
               phase.name, phase.epochs, phase.learning_rate, f'{optim.count(trainable):,}',
               f'{optim.count(frozen):,}',
               '' if phase.bn_train_from is None else
               f', BatchNorm trains from {phase.bn_train_from}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains as `config` says, resuming from WORKDIR/checkpoints if there are any.

  Returns:
    The final evaluation (loss, accuracy, confusion matrix, class names) plus 'step' and
    'stop_reason'.
  """
  from hhjax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top

  metrics_lib.quiet_orbax()
  workdir = _absolute(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh()
  sharding.check_batch_size(int(config.batch_size), 'config.batch_size')
  sharding.check_batch_size(_eval_batch_size(config), 'config.eval_batch_size')

  info = input_pipeline.dataset_info(config)
  class_names = [str(c) for c in info.class_names]
  num_classes = int(info.num_classes)
  num_train = int(info.num_examples[config.data.train_split])
  spe = steps_per_epoch(config, num_train)
  phases = make_phases(config)
  model = models.create_model(config, num_classes)
  logging.info('%d training images, %d classes %s; %d steps per epoch of %d images; '
               '%d device(s): %s.', num_train, num_classes, class_names, spe,
               config.batch_size, jax.device_count(), jax.devices()[0].platform)

  ckpts = checkpointing.Checkpoints(os.path.join(workdir, CHECKPOINT_DIR),
                                    keep=int(config.keep_checkpoints))
  writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
  repl = sharding.replicated(mesh)
  latest = ckpts.latest_step()
  if latest is not None:
    state, saved = restore_state(ckpts, latest, model, config, mesh)
    saved_classes = saved.get('class_names')
    if saved_classes is not None and list(saved_classes) != class_names:
      raise checkpointing.CheckpointMismatchError(
          f'The checkpoint in {workdir} was trained on classes {saved_classes}, the data now has '
          f'{class_names}. Use another --workdir.')
    diffs = _config_differences(saved.get('config', {}), _config_dict(config))
    if diffs:
      logging.warning('Resuming with a config that differs from the checkpoint\'s:\n  %s',
                      '\n  '.join(diffs))
    progress = Progress(**saved['progress'])
    # The saved index counts the phases of the config that wrote it; with warm-up epochs
    # added or removed since, the phase is found by name (restore_state checked it exists).
    progress.phase_index = [p.name for p in phases].index(saved['phase'])
    writer.truncate_after(latest)
    logging.info('Resuming from step %d (phase %s) in %s.', latest, saved['phase'], workdir)
  else:
    variables = jax.jit(functools.partial(init_variables, model, config), out_shardings=repl)()
    spec = pretrained_spec(config)
    if spec:
      variables = _replicate(
          models.load_pretrained_backbone(variables, spec, config.model.cut), repl)
    else:
      logging.info('No pretrained weights (config.model.pretrained=None): random init.')
    labels = optim.param_labels(variables['params'], phases[0].rules)
    tx = make_optimizer(config, phases[0], labels)
    state = jax.jit(lambda v: build_state(v, tx, config.seed), out_shardings=repl)(variables)
    progress = Progress()
    writer.truncate_after(0)   # rows of an earlier attempt killed before its first checkpoint
  # Only now that the checkpoint (if any) fits: a refused resume must leave the config that
  # eval and predict read for that checkpoint as it was.
  save_config(config, workdir)

  evaluator = _Evaluator(model, config, num_classes, mesh)
  step = int(jax.device_get(state['step']))
  train_iter = None
  total_planned = sum(p.epochs for p in phases) * spe   # for the ETA; early stops shorten it
  log_every = max(1, int(config.log_every_steps or spe))
  checkpoint_every = int(config.checkpoint_every_steps or 0)   # 0: only at epoch ends

  def save(state, progress, metrics=None):
    nonfinite = int(jax.device_get(state['nonfinite_step']))
    if nonfinite >= 0:
      _stop_nonfinite(ckpts, nonfinite, phases[progress.phase_index])
    ckpts.save(int(jax.device_get(state['step'])), state, {
        'phase': phases[progress.phase_index].name,
        'step': int(jax.device_get(state['step'])),
        'progress': dataclasses.asdict(progress),
        'class_names': class_names,
        'config': _config_dict(config),
    }, metrics)

  last_eval = None
  while progress.phase_index < len(phases):
    phase = phases[progress.phase_index]
    if progress.phase_done:
      if progress.phase_index + 1 == len(phases):
        break
      # Next phase: same parameters and statistics, a fresh optimizer for the new trainable set
      # (Keras recompiles with a new optimizer between the two stages).
      progress = Progress(phase_index=progress.phase_index + 1, phase_start_step=step,
                          epochs_done=progress.epochs_done)
      phase = phases[progress.phase_index]
      labels = optim.param_labels(state['params'], phase.rules)
      tx = make_optimizer(config, phase, labels)
      new_opt_state = jax.jit(tx.init, out_shardings=repl)(state['params'])
      state = dict(state, opt_state=new_opt_state)

    labels, tx, train_step = _phase_setup(model, config, phase, state['params'], mesh)
    _log_phase(phase, labels, state['params'])
    phase_end = progress.phase_start_step + phase.epochs * spe
    phase_evaluator = evaluator
    # config.speed.cache_features: a frozen backbone without augmentation runs once per image.
    cache = (feature_cache.for_phase(model, phase, labels, state, config, mesh, num_train)
             if step < phase_end else None)
    if cache is not None:
      train_step = cache.train_step(make_train_step(cache.head_model, phase, labels, tx))
      phase_evaluator = _Evaluator(cache.head_model, config, num_classes, mesh,
                                   dataset=cache.eval_dataset)
      batches = cache.batches(start_step=step)
      train_iter = None   # a later phase on images starts its stream where this one ends
    else:
      if train_iter is None and step < phase_end:
        train_iter = input_pipeline.create_dataset(
            config, config.data.train_split, start_step=step).as_numpy_iterator()
      batches = train_iter
    t_log, step_log, t_first = time.perf_counter(), step, None

    while step < phase_end:
      batch = next(batches)
      state = train_step(state, sharding.to_global(batch, mesh))
      step += 1
      if t_first is None:   # exclude compilation from the throughput figures
        jax.block_until_ready(state['step'])
        t_log, step_log, t_first = time.perf_counter(), step, True
      epoch_in_phase, step_in_epoch = divmod(step - progress.phase_start_step, spe)
      epoch_end = step_in_epoch == 0

      if step % log_every == 0 or epoch_end:
        loss, acc, _ = _metrics_from_state(state)
        nonfinite = int(jax.device_get(state['nonfinite_step']))
        if nonfinite >= 0:
          _stop_nonfinite(ckpts, nonfinite, phase)
        now = time.perf_counter()
        if step > step_log:   # not on the step that compiled
          rate = (step - step_log) * config.batch_size / max(now - t_log, 1e-9)
          eta = (total_planned - step) * config.batch_size / rate
          logging.info('%s epoch %d/%d step %d/%d  loss %.4f  accuracy %.4f  %.1f img/s  '
                       'ETA %s', phase.name, epoch_in_phase + (0 if epoch_end else 1),
                       phase.epochs, step, total_planned, loss, acc, rate, _format_eta(eta))
          t_log, step_log = now, step

      if epoch_end:
        train_loss, train_acc, _ = _metrics_from_state(state)
        t_eval = time.perf_counter()
        last_eval = phase_evaluator(state['params'], state['batch_stats'])
        progress.epochs_done += 1
        row = {'step': step, 'epoch': progress.epochs_done, 'phase': phase.name,
               'train_loss': train_loss, 'train_accuracy': train_acc,
               'val_loss': last_eval['loss'], 'val_accuracy': last_eval['accuracy'],
               'learning_rate': phase.learning_rate}
        logging.info('Epoch %d (%s) done at step %d: train loss %.4f accuracy %.4f | '
                     'validation loss %.4f accuracy %.4f on %d images (%.1f s)',
                     progress.epochs_done, phase.name, step, train_loss, train_acc,
                     last_eval['loss'], last_eval['accuracy'], last_eval['count'],
                     time.perf_counter() - t_eval)
        writer.write(row)
        reason = _early_stop(config, row)
        if reason:
          logging.info('Early stopping of phase %s: %s.', phase.name, reason)
          progress.stop_reason = reason
        progress.phase_done = bool(reason) or step >= phase_end
        state = dict(state, metrics=_replicate(_zero_metrics(), repl))
        save(state, progress, {'val_accuracy': last_eval['accuracy'],
                               'val_loss': last_eval['loss']})
        t_log, step_log = time.perf_counter(), step
        if progress.phase_done:
          break
      elif checkpoint_every and step % checkpoint_every == 0:
        save(state, progress)
    else:
      progress.phase_done = True   # a phase resumed at its very end

  ckpts.wait()
  if last_eval is None:
    last_eval = evaluator(state['params'], state['batch_stats'])
  result = _report(last_eval, class_names, step, workdir, is_main)
  result['stop_reason'] = progress.stop_reason
  if is_main:
    rows = metrics_lib.read_rows(workdir)
    for path in metrics_lib.plot_history(rows, workdir):
      logging.info('Wrote %s', path)
  writer.close()
  ckpts.close()
  return result


def _stop_nonfinite(ckpts: checkpointing.Checkpoints, step: int, phase: Phase) -> None:
  ckpts.wait()
  last = ckpts.latest_step()
  kept = (f'The last good checkpoint (step {last}) is kept in {ckpts.directory}.'
          if last is not None else 'No checkpoint had been written yet.')
  raise NonFiniteLossError(
      f'The training loss became NaN or infinite at step {step} (phase {phase.name}); training '
      f'stopped. {kept} Lower the learning rate (config.{phase.name}.learning_rate) or check '
      'the input data; running the same command again resumes from that checkpoint.')


def _report(result: Mapping[str, Any], class_names: Sequence[str], step: int, workdir: str,
            is_main: bool) -> dict[str, Any]:
  out = {'step': step, 'loss': result['loss'], 'accuracy': result['accuracy'],
         'count': result['count'], 'class_names': list(class_names),
         'confusion': np.asarray(result['confusion']).tolist()}
  logging.info('Evaluation at step %d on %d images: loss %.4f, accuracy %.4f\n'
               'Confusion matrix (rows: true class, columns: predicted):\n%s', step,
               result['count'], result['loss'], result['accuracy'],
               metrics_lib.format_confusion(result['confusion'], class_names))
  if is_main:
    (epath.Path(workdir) / EVAL_FILE).write_text(json.dumps(out, indent=2))
  return out


# ------------------------------------------------------------------------------------ eval


def _restore_for_inference(config, workdir, which: str = 'latest'):
  metrics_lib.quiet_orbax()
  mesh = sharding.make_mesh()
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, CHECKPOINT_DIR), read_only=True)
  step = ckpts.best_step() if which == 'best' else ckpts.latest_step()
  if step is None:
    raise FileNotFoundError(f'No finished checkpoint in {ckpts.directory}: train first.')
  info = ckpts.info(step)
  class_names = info.get('class_names')
  model = models.create_model(config, len(class_names))
  state, _ = restore_state(ckpts, step, model, config, mesh)
  ckpts.close()
  return mesh, model, state, class_names, step


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             checkpoint: str = 'latest') -> dict[str, Any]:
  """Evaluates the latest (or 'best') checkpoint in `workdir` on config.data.eval_split.

  Prints loss, accuracy and the confusion matrix; writes WORKDIR/eval.json.
  """
  sharding.check_batch_size(_eval_batch_size(config), 'config.eval_batch_size')
  mesh, model, state, class_names, step = _restore_for_inference(config, workdir, checkpoint)
  result = _Evaluator(model, config, len(class_names), mesh)(state['params'],
                                                            state['batch_stats'])
  return _report(result, class_names, step, _absolute(workdir),
                 jax.process_index() == 0)


IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif')


def expand_images(patterns: Iterable[str]) -> list[str]:
  """Files, folders (searched recursively for images) and globs, in a stable order."""
  files = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      for root, _, names in sorted(os.walk(pattern)):
        files += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(IMAGE_EXTENSIONS)]
    elif os.path.isfile(pattern):
      files.append(pattern)
    else:
      matches = sorted(glob.glob(pattern, recursive=True))
      found = [m for m in matches if os.path.isfile(m)]
      if not found:
        raise FileNotFoundError(f'--images {pattern!r}: no such file, folder or glob match.')
      files += found
  if not files:
    raise FileNotFoundError(f'No images found in {list(patterns)}.')
  return files


def _load_image(path: str, config, input_pipeline) -> np.ndarray:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return input_pipeline.preprocess_image(tf.io.read_file(path), config).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
    raise ValueError(f'{path}: not a readable image ({e.message.splitlines()[0]}).') from None


def _readable_images(files: list[str], config, input_pipeline) -> list[str]:
  """`files` without unreadable ones if config.data.bad_files='skip'; else any is an error."""
  bad = input_pipeline.check_image_files(files, config.data.get('num_parallel_calls'))
  if not bad:
    return files
  limit = 20
  listing = '\n'.join([f'  {p}: {r}' for p, r in sorted(bad.items())[:limit]] +
                      ([f'  ... and {len(bad) - limit} more'] if len(bad) > limit else []))
  if config.data.get('bad_files') == 'skip':
    logging.warning("Skipping %d file(s) that are not readable images "
                    "(config.data.bad_files='skip'):\n%s", len(bad), listing)
    files = [f for f in files if f not in bad]
    if not files:
      raise FileNotFoundError('None of the files given to --images is a readable image.')
    return files
  raise ValueError(f'{len(bad)} of the {len(files)} files given to --images are not readable '
                   f'images (PNG, JPEG, BMP, GIF, WebP):\n{listing}\nRemove them from --images '
                   "(or run with config.data.bad_files='skip' to classify the others).")


def predict(config: ml_collections.ConfigDict, workdir: str, images: Sequence[str],
            checkpoint: str = 'latest') -> list[tuple[str, str, float]]:
  """Classifies image files with the latest (or 'best') checkpoint in `workdir`.

  Images are decoded, resized and normalised as the eval split is. Prints and returns
  (path, class name, probability of that class) per image.
  """
  from hhjax.data import pipeline as input_pipeline  # pylint: disable=g-import-not-at-top
  files = _readable_images(expand_images(images), config, input_pipeline)
  mesh, model, state, class_names, _ = _restore_for_inference(config, workdir, checkpoint)
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)

  @functools.partial(jax.jit, in_shardings=(repl, repl, data), out_shardings=repl)
  def predict_step(params, batch_stats, images_):
    return models.probabilities(model.apply({'params': params, 'batch_stats': batch_stats},
                                            images_, train=False))

  batch_size = _eval_batch_size(config)
  batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  results = []
  is_main = jax.process_index() == 0   # every process computes; one prints
  for start in range(0, len(files), batch_size):
    chunk = files[start:start + batch_size]
    arrays = np.stack([_load_image(path, config, input_pipeline) for path in chunk])
    padded = np.concatenate([arrays, np.zeros((batch_size - len(chunk),) + arrays.shape[1:],
                                              arrays.dtype)])
    probs = np.asarray(jax.device_get(predict_step(
        state['params'], state['batch_stats'], jax.device_put(padded, data))))[:len(chunk)]
    for path, p in zip(chunk, probs):
      k = int(np.argmax(p))
      results.append((path, class_names[k], float(p[k])))
      if is_main:
        print(f'{path}\t{class_names[k]}\t{p[k]:.4f}', flush=True)
  return results
