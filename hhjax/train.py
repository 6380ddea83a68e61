"""--mode=train: restore or initialise, run each phase, evaluate, plot.

    train_and_evaluate(config, workdir)

This is the train mode's entry point: it reads the config and hands explicit values to the
training library below it (hhjax.training: phases, steps, state, restore, evaluation).

reads as its steps: `_Run.create` (data, model, phases, checkpoints), `_restore_or_initialise`,
then `_run_phase` for each phase left, then the final evaluation and plots. Inside a phase the
per-step loop only feeds the jitted step; `training.step_log.StepLog` owns the progress lines
and the ETA, and `_end_epoch` the epoch's evaluation, metrics row, early stopping and
checkpoint.

Everything needed to continue exactly is in the state or in the checkpoint's metadata (phase,
phase start, whether the phase is finished), so a run killed at any moment and started again
with the same command ends with the same parameters as an uninterrupted one. On SIGTERM the run
checkpoints the step it is at and stops (hhjax.preemption), so the next run loses no step.
"""

from collections.abc import Iterator
import dataclasses
import json
import os
import shutil
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from hhjax import checkpointing
from hhjax import compat
from hhjax import compilation
from hhjax import entry
from hhjax import errors
from hhjax import files
from hhjax import eval_metrics
from hhjax import metrics as metrics_lib
from hhjax import peers
from hhjax import pictures
from hhjax import preemption
from hhjax import run_report
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax import workdir_lock
from hhjax.data import pipeline
from hhjax.data import sources
from hhjax.data import spec as data_spec
from hhjax.model import classifier
from hhjax.training import device_augment
from hhjax.training import evaluation
from hhjax.training import feature_cache
from hhjax.training import losses
from hhjax.training import keras_optim
from hhjax.training import mix
from hhjax.training import optim
from hhjax.training import patience
from hhjax.training import phases as phases_lib
from hhjax.training import plateau as plateau_lib
from hhjax.training import restore
from hhjax.training import state as state_lib
from hhjax.training import step_log
from hhjax.training import steps

PyTree = Any

# The test split's evaluation at the end of training, and the folder of its pictures.
TEST_FILE = workdir_lib.TEST_FILE
TEST_PICTURES = workdir_lib.TEST_PICTURES
# The splits of the run and the rows held out of the training split (written at its start).
DATA_SPLIT_FILE = 'data_split.json'


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
  if config.steps_per_epoch:
    return int(config.steps_per_epoch)
  return max(1, num_train_examples // int(config.batch_size))


@dataclasses.dataclass
class _Run:
  """What stays fixed for a whole run, built once before the first step."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  data: data_spec.DataSpec
  model: classifier.Classifier
  phases: list[phases_lib.Phase]
  class_names: list[str]
  num_train: int
  steps_per_epoch: int
  ckpts: checkpointing.Checkpoints
  writer: metrics_lib.MetricsWriter
  evaluator: evaluation.Evaluator
  target: restore.Target
  early_stopping: phases_lib.EarlyStopping
  loss: losses.LossSpec
  plateau: plateau_lib.PlateauSpec
  cache: feature_cache.Settings
  is_main: bool
  notice: preemption.Notice
  train_iter: Iterator[Any] | None = None   # the image stream, kept across phases

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, workdir: str,
             notice: preemption.Notice) -> '_Run':
    start = time.monotonic()   # metrics rows count wall time from here
    compat.quiet_orbax()
    workdir = workdir_lib.absolute(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(int(config.batch_size), 'config.batch_size')
    sharding.check_batch_size(entry.eval_batch_size(config), 'config.eval_batch_size')
    data = entry.data(config)
    info = pipeline.dataset_info(data)
    class_names = [str(c) for c in info.class_names]
    num_train = int(info.num_examples[data.train_split])
    spe = steps_per_epoch(config, num_train)
    model = entry.model(config, len(class_names))
    logging.info('%d training images, %d classes %s; %d steps per epoch of %d images; '
                 '%d device(s): %s.', num_train, len(class_names), class_names, spe,
                 config.batch_size, jax.device_count(), jax.devices()[0].platform)
    logging.info('Validation (chooses: early stopping, the best checkpoint): %s, %d images%s. '
                 'Test (reported when training ends, never chosen on): %s.', data.validation,
                 info.num_examples[data.validation],
                 ', held out of the training split, stratified by class' if data.holds_out
                 else '',
                 f'{data.test_split}, {info.num_examples[data.test_split]} images'
                 if data.test_split else 'none (config.data.test_split is None)')
    loss = _loss(config, data, class_names)
    is_main = jax.process_index() == 0
    return cls(
        config=config, workdir=workdir, mesh=mesh, data=data, model=model,
        phases=entry.phases(config), class_names=class_names, num_train=num_train,
        steps_per_epoch=spe,
        ckpts=checkpointing.Checkpoints(workdir_lib.checkpoint_dir(workdir),
                                        keep=int(config.keep_checkpoints)),
        writer=metrics_lib.MetricsWriter(workdir, enabled=is_main, start=start),
        evaluator=evaluation.Evaluator(model, len(class_names), mesh,
                                       evaluation.eval_batches(data),
                                       label_smoothing=loss.label_smoothing,
                                       metrics=entry.eval_metrics(config)),
        target=entry.restore_target(config, mesh, model_for=lambda _: model, loss_spec=loss),
        early_stopping=entry.early_stopping(config), loss=loss, plateau=entry.plateau(config),
        cache=entry.feature_cache(config),
        is_main=is_main, notice=notice)

  @property
  def total_steps(self) -> int:
    """The planned number of steps (for the ETA; early stops shorten it)."""
    return sum(p.epochs for p in self.phases) * self.steps_per_epoch

  def setup(self, phase: phases_lib.Phase, params: PyTree) -> phases_lib.PhaseSetup:
    return self.target.setup_for(phase, params)

  def save(self, state: PyTree, progress: phases_lib.Progress,
           metrics: dict[str, float] | None = None) -> None:
    """Checkpoints `state`; first stops the run if a loss has become NaN or infinite."""
    _check_finite(self, state, progress.phase)
    step = int(jax.device_get(state['step']))
    # restore_best_weights: the best epoch's checkpoint stays until the phase has used it.
    self.ckpts.keep_also(patience.kept_step(self.phases[progress.index(self.phases)].stopping,
                                            progress.patience))
    restore.save(self.ckpts, state, restore.CheckpointMeta(
        step=step, phase=progress.phase, progress=progress,
        class_names=tuple(self.class_names), config=self.target.config), metrics)


def _loss(config: ml_collections.ConfigDict, data: data_spec.DataSpec,
          class_names: list[str]) -> losses.LossSpec:
  """config.loss with its class weights resolved (and logged) for the training split."""
  counts = (pipeline.class_counts(data, data.train_split)
            if entry.class_weight_needs_counts(config) else None)
  loss = entry.loss(config, class_names, counts)
  if loss.class_weights is not None:
    source = (f"'balanced': n / (k * count) from the training split's counts "
              f"{dict(zip(class_names, counts))}" if counts is not None else 'as given')
    logging.info('Class weights (config.loss.class_weight, %s): %s.', source,
                 losses.describe(loss.class_weights, class_names))
  if loss.label_smoothing:
    logging.info('Label smoothing %g (config.loss.label_smoothing).', loss.label_smoothing)
  return loss


def _check_finite(run: _Run, state: PyTree, phase: str) -> None:
  step = int(jax.device_get(state['nonfinite_step']))
  if step < 0:
    return
  run.ckpts.wait()
  last = run.ckpts.latest_step()
  kept = (f'The last good checkpoint (step {last}) is kept in {run.ckpts.directory}.'
          if last is not None else 'No checkpoint had been written yet.')
  again = ('resumes from that checkpoint' if last is not None else
           'starts from the beginning')
  raise errors.NonFiniteLossError(
      f'The training loss became NaN or infinite at step {step} (phase {phase}); training '
      f'stopped. {kept} Lower the learning rate (config.{phase}.learning_rate) or check the '
      f'input data; running the same command again {again}.')


def _restore_or_initialise(run: _Run) -> tuple[PyTree, phases_lib.Progress,
                                               phases_lib.PhaseSetup]:
  """The state to start from: the newest checkpoint in the workdir that reads whole, else step 0.

  Damaged later checkpoints stay in place; a save of the same step, computed again, replaces
  each of them.
  """
  steps = run.ckpts.all_steps()
  if not steps:
    _write_data_split(run)
    abstract = state_lib.abstract_variables(run.model, run.target.image_size)
    setup = run.setup(run.phases[0], abstract['params'])
    if not entry.pretrained(run.config):
      for line in phases_lib.heads_on_random_features(run.phases, abstract['params'],
                                                      len(run.class_names)):
        logging.warning('%s', line)
    state = state_lib.initialise(run.model, run.target.image_size, run.target.seed, setup.tx,
                                 run.mesh, pretrained_weights=entry.pretrained(run.config),
                                 cut=run.config.model.cut)
    run.writer.truncate_after(0)   # rows of an earlier attempt killed before its first save
    return state, phases_lib.Progress(run.phases[0].name), setup

  restored = restore.latest(run.ckpts, run.target)
  latest, phase, saved = restored.step, restored.phase, restored.meta
  saved_classes = saved.class_names
  if saved_classes is not None and list(saved_classes) != run.class_names:
    raise errors.CheckpointMismatchError(
        f'The checkpoint in {run.workdir} was trained on classes {saved_classes}, the data '
        f'now has {run.class_names}. Use another --workdir.')
  workdir_lib.check_resume_config(saved.config, run.target.config, run.workdir)
  _check_same_held_out(saved.config, run)
  diffs = workdir_lib.config_differences(saved.config, run.target.config)
  if diffs:
    logging.warning("Resuming with a config that differs from the checkpoint's:\n  %s",
                    '\n  '.join(diffs))
  run.writer.truncate_after(latest)
  if latest == max(steps):
    logging.info('Resuming from step %d (phase %s) in %s.', latest, phase.name, run.workdir)
  else:
    logging.warning('Resuming from step %d (phase %s) in %s, the newest checkpoint that can be '
                    'read; each damaged later one is overwritten when training reaches its step '
                    'again.', latest, phase.name, run.workdir)
  _more_epochs(run, restored)
  return restored.state, restored.progress, restored.setup


def _check_same_held_out(saved_config: dict[str, Any], run: _Run) -> None:
  """Refuses a resume whose training split would lose other rows to validation.

  The training stream's position is the global step: with another held-out share (fraction,
  seed or training split) the same step would point at other images, and rows validated on
  so far would train.
  """
  if not saved_config or 'data' not in saved_config:
    return
  saved = data_spec.held_out_identity(saved_config)
  now = data_spec.held_out_identity(run.target.config)
  if saved != now:
    def text(identity):
      return ('nothing held out' if identity is None else
              ', '.join(f'{k} {v!r}' for k, v in identity.items()))
    raise errors.CheckpointMismatchError(
        f'The checkpoint in {run.workdir} was trained with another held-out validation share '
        f'of the training split: checkpoint {text(saved)}, now {text(now)} '
        '(config.data.validation_split / validation_fraction / seed). Resumed, the training '
        'stream would read other rows than the run it continues. Resume with the values it '
        'was trained with, or train the new config in another --workdir.')


def _write_data_split(run: _Run) -> None:
  """WORKDIR/data_split.json: the splits of this run and, when validation is held out of the
  training split, its rows there (per class), written when the run starts.

  Every process lists the rows (an image folder's check is a collective step); process 0
  writes.
  """
  data = run.data
  record = {'train_split': data.train_split, 'validation': data.validation,
            'test_split': data.test_split, 'class_names': run.class_names}
  if data.holds_out:
    rows, training, whole = sources.held_out(data)
    per_class = [np.bincount(whole.labels[r], minlength=len(run.class_names)).tolist()
                 for r in (rows, training)]
    record.update(validation_fraction=data.validation_fraction, seed=data.seed,
                  validation_per_class=per_class[0], training_per_class=per_class[1],
                  validation_rows=[int(r) for r in rows])
  if run.is_main:
    files.write_atomic(epath.Path(run.workdir) / DATA_SPLIT_FILE,
                       json.dumps(record, indent=1))


def _more_epochs(run: _Run, restored: restore.Restored) -> None:
  """A finished phase given more epochs continues with them; a passed one says it cannot."""
  saved_config = restored.meta.config or {}
  saved_epochs = {p.name: saved_config[p.name]['epochs'] for p in run.phases
                  if isinstance(saved_config.get(p.name), dict)
                  and 'epochs' in saved_config[p.name]}
  for line in phases_lib.passed_phases_grown(restored.progress, run.phases, saved_epochs):
    logging.warning('%s', line)
  message = phases_lib.reopen_for_more_epochs(restored.progress, restored.phase, restored.step,
                                              run.steps_per_epoch)
  if message:
    logging.info('%s', message)


def _end_epoch(run: _Run, state: PyTree, progress: phases_lib.Progress, phase_end: int,
               evaluator: evaluation.Evaluator) -> tuple[PyTree, dict[str, Any]]:
  """Evaluates, writes the epoch's row, decides early stopping and saves a checkpoint."""
  step = int(jax.device_get(state['step']))
  train_loss, train_acc, _ = step_log.metrics_from_state(state)
  t_eval = time.perf_counter()
  result = evaluator(optim.inference_params(state), state['batch_stats'])
  progress.epochs_done += 1
  row = {'step': step, 'epoch': progress.epochs_done, 'phase': progress.phase,
         'train_loss': train_loss, 'train_accuracy': train_acc,
         'val_loss': result['loss'], 'val_accuracy': result['accuracy'],
         'learning_rate': _learning_rate(run, state, progress),
         **eval_metrics.row_fields(result['metrics'], run.class_names, 'val')}
  logging.info('Epoch %d (%s) done at step %d: train loss %.4f accuracy %.4f | '
               'validation loss %.4f accuracy %.4f on %d images (%.1f s)',
               progress.epochs_done, progress.phase, step, train_loss, train_acc,
               result['loss'], result['accuracy'], result['count'],
               time.perf_counter() - t_eval)
  run.writer.write(row)
  phase = run.phases[progress.index(run.phases)]
  epoch_in_phase = (step - progress.phase_start_step) // run.steps_per_epoch - 1
  # Both rules see every epoch (Keras calls every callback); either may end the phase.
  reasons = [r for r in (phases_lib.early_stop(run.early_stopping, row),
                         patience.on_epoch_end(phase.stopping, progress.patience,
                                               epoch_in_phase, row, step)) if r]
  if reasons:
    reason = '; '.join(reasons)
    logging.info('Early stopping of phase %s: %s.', progress.phase, reason)
    progress.stop_reason = reason
  progress.phase_done = bool(reasons) or step >= phase_end
  state = dict(state, metrics=state_lib.replicate(steps.zero_metrics(),
                                                  sharding.replicated(run.mesh)))
  if progress.phase_done:
    state, result = _restore_best_weights(run, state, progress, phase, evaluator, result)
  state = _reduce_lr_on_plateau(run, state, progress, row)
  run.save(state, progress, {'val_accuracy': result['accuracy'], 'val_loss': result['loss']})
  return state, result


def _restore_best_weights(run: _Run, state: PyTree, progress: phases_lib.Progress,
                          phase: phases_lib.Phase, evaluator: evaluation.Evaluator,
                          result: dict[str, Any]) -> tuple[PyTree, dict[str, Any]]:
  """At a phase's end, Keras's restore_best_weights: the weights (params and BatchNorm
  statistics, and the EMA where one is kept) of the best epoch's checkpoint, and their
  evaluation. Unchanged when the rule is
  off or the last epoch was the best."""
  step = int(jax.device_get(state['step']))
  best = patience.step_to_restore(phase.stopping, progress.patience, step)
  if best is None:
    return state, result
  run.ckpts.wait()
  try:
    saved = restore.restore(run.ckpts, best, run.target).state
  except errors.CheckpointDamagedError as e:
    logging.warning('Cannot restore the best weights of phase %s (step %d): %s Keeping the '
                    'last epoch\'s weights.', phase.name, best, e)
    return state, result
  # The optimizer state comes back too: the phase ends here (the next one builds its own), and
  # with config.optimizer.use_ema it holds the average that the best epoch was evaluated with.
  state = dict(state, params=saved['params'], batch_stats=saved['batch_stats'],
               opt_state=saved['opt_state'])
  progress.patience.restored_from = best
  result = evaluator(optim.inference_params(state), state['batch_stats'])
  logging.info('Restored the weights of step %d, the end of the best epoch (%d of phase %s, '
               '%s %.4f; config.%s.early_stopping.restore_best_weights): validation loss %.4f '
               'accuracy %.4f.', best, progress.patience.best_epoch + 1, phase.name,
               phase.stopping.monitor, progress.patience.best, phase.name, result['loss'],
               result['accuracy'])
  return state, result


def _learning_rate(run: _Run, state: PyTree, progress: phases_lib.Progress) -> float:
  """The rate of the state's last step (see step_log.learning_rate)."""
  return step_log.learning_rate(state, run.phases[progress.index(run.phases)])


def _reduce_lr_on_plateau(run: _Run, state: PyTree, progress: phases_lib.Progress,
                          row: dict[str, Any]) -> PyTree:
  """config.reduce_lr_on_plateau at an epoch's end: counts in `progress` (saved with the
  checkpoint), the new rate in the optimizer state."""
  if not run.plateau.monitor or progress.phase_done:
    return state
  counters = progress.plateau or plateau_lib.start()
  progress.plateau, rate = plateau_lib.step(run.plateau, counters,
                                                    row[run.plateau.monitor],
                                                    row['learning_rate'])
  if rate is None:
    return state
  logging.info('ReduceLROnPlateau: %s did not improve for %d epochs; learning rate %g -> %g '
               '(config.reduce_lr_on_plateau).', run.plateau.monitor, run.plateau.patience,
               row['learning_rate'], rate)
  opt_state = jax.jit(keras_optim.set_learning_rate, static_argnums=1,
                      out_shardings=sharding.replicated(run.mesh))(state['opt_state'], rate)
  return dict(state, opt_state=opt_state)


def _log_phase(setup: phases_lib.PhaseSetup, params: PyTree) -> None:
  phase = setup.phase
  trainable, frozen = optim.split(params, setup.labels)
  schedule = phase.schedule
  rate = {'constant': f'learning rate {phase.learning_rate:g}',
          'piecewise': f'learning rates {list(schedule.values)} split at optimizer steps '
                       f'{list(schedule.boundaries)}'}.get(
                           schedule.name, f'learning rate {phase.learning_rate:g} on a '
                           f'{schedule.name} schedule')
  logging.info('Phase %s: %s, %s, %s trainable / %s frozen parameters%s.',
               phase.name, phases_lib.epochs_text(phase.epochs), rate,
               f'{optim.count(trainable):,}', f'{optim.count(frozen):,}',
               '' if phase.bn_train_from is None else
               f', BatchNorm trains from {phase.bn_train_from}')
  if setup.multipliers is not None:
    factors, _ = optim.split(setup.multipliers, setup.labels)
    values = jax.tree.leaves(factors)
    logging.info('Per-layer learning rates (config.%s.param_labels multipliers, layer_decay '
                 '%g): the trainable parameters at %g to %g times %g.', phase.name,
                 phase.layer_decay, min(values), max(values), phase.learning_rate)


def _phase_inputs(run: _Run, setup: phases_lib.PhaseSetup, state: PyTree, step: int):
  """(jitted train step, batches from `step` on, evaluator) for the phase.

  config.speed.cache_features: a frozen backbone without augmentation runs once per image,
  and the phase trains the head on the cached features.
  """
  cache = feature_cache.for_phase(run.model, setup, state, run.data, run.cache, run.mesh,
                                  run.num_train)
  if cache is not None:
    run.train_iter = None   # a later phase on images starts its stream where this one ends
    evaluator = evaluation.Evaluator(cache.head_model, len(run.class_names), run.mesh,
                                     cache.eval_batches,
                                     label_smoothing=run.loss.label_smoothing,
                                     metrics=entry.eval_metrics(run.config))
    return cache.train_step(setup), cache.batches(start_step=step), evaluator
  if run.train_iter is None:
    run.train_iter = pipeline.create_dataset(run.data, run.data.train_split,
                                             start_step=step).as_numpy_iterator()
  repl, data = sharding.replicated(run.mesh), sharding.data_sharded(run.mesh)
  prepare = device_augment.for_data(run.data)   # None: the host augments
  mixer = mix.for_data(run.data, len(run.class_names))   # None: config.data.mix is off
  train_step = jax.jit(steps.make_train_step(run.model, setup, prepare, mixer),
                       in_shardings=(repl, data),
                       out_shardings=repl, donate_argnums=0)
  return train_step, run.train_iter, run.evaluator


def _run_phase(run: _Run, state: PyTree, progress: phases_lib.Progress,
               setup: phases_lib.PhaseSetup) -> tuple[PyTree, dict[str, Any] | None]:
  """Trains `setup.phase` from the state's step to the phase's end or an early stop.

  Returns:
    The state and the last epoch's evaluation (None if no epoch ended here).
  """
  _log_phase(setup, state['params'])
  step = int(jax.device_get(state['step']))
  phase_end = progress.phase_start_step + setup.phase.epochs * run.steps_per_epoch
  if step >= phase_end:   # a phase resumed at its very end
    progress.phase_done = True
    return state, None
  train_step, batches, evaluator = _phase_inputs(run, setup, state, step)
  train_step = compilation.first_call_logged(train_step,
                                             f'the train step of phase {setup.phase.name}')
  log = step_log.StepLog(
      every=max(1, int(run.config.log_every_steps or run.steps_per_epoch)),
      batch_size=int(run.config.batch_size), total_steps=run.total_steps,
      steps_per_epoch=run.steps_per_epoch, phase=setup.phase, progress=progress,
      check=lambda state: _check_finite(run, state, setup.phase.name),
      on_row=run.writer.write_progress)
  checkpoint_every = int(run.config.checkpoint_every_steps or 0)   # 0: only at epoch ends
  last_eval = None
  while step < phase_end:
    state = train_step(state, sharding.to_global(next(batches), run.mesh))
    step += 1
    run.ckpts.check_saved()   # a save that failed in the background stops the run here
    preempted = run.notice.stop_now()   # every process, every step: the same answer in each
    epoch_end = (step - progress.phase_start_step) % run.steps_per_epoch == 0
    log.after_step(step, state, epoch_end)
    if epoch_end:   # a preempted epoch end still evaluates: its row belongs to this step
      state, last_eval = _end_epoch(run, state, progress, phase_end, evaluator)
      log.restart(step)
    elif preempted or (checkpoint_every and step % checkpoint_every == 0):
      run.save(state, progress)
    if preempted:
      run.ckpts.wait()
      raise errors.Preempted(step)
    if epoch_end and progress.phase_done:
      break
  return state, last_eval


def _next_phase(run: _Run, state: PyTree, progress: phases_lib.Progress
                ) -> tuple[PyTree, phases_lib.Progress, phases_lib.PhaseSetup] | None:
  """The state, progress and setup at the start of the next phase (None after the last).

  Same parameters (their EMA, with config.optimizer.use_ema) and statistics, a fresh optimizer
  for the new trainable set (Keras recompiles with a new optimizer between the two stages).
  """
  progress = progress.next_phase(run.phases, int(jax.device_get(state['step'])))
  if progress is None:
    return None
  # As Keras's fit ends (finalize_variable_values): the weights become their EMA, if kept.
  params = optim.inference_params(state)
  setup = run.setup(run.phases[progress.index(run.phases)], params)
  opt_state = jax.jit(setup.tx.init, out_shardings=sharding.replicated(run.mesh))(params)
  return dict(state, params=params, opt_state=opt_state), progress, setup


def _final_test(run: _Run, state: PyTree, step: int,
                validation: dict[str, Any]) -> dict[str, Any]:
  """The test split, once, on the final state: WORKDIR/test.json and its pictures in
  WORKDIR/test/. Nothing reads it to choose; a binary head's decision threshold chosen on
  `validation` (the final validation result) is applied to it, beside 0.5."""
  split = run.data.test_split
  test_eval = run.evaluator(optim.inference_params(state), state['batch_stats'],
                            evaluation.eval_batches(run.data, split))
  chosen = (validation.get('threshold') or {}).get('value')
  if chosen is not None:
    test_eval['metrics']['threshold_from_validation'] = eval_metrics.at_threshold(
        test_eval['probabilities'], test_eval['labels'], chosen)
  folder = os.path.join(run.workdir, TEST_PICTURES)
  out = evaluation.report(test_eval, run.class_names, step, run.workdir, run.is_main,
                          split=split, path=os.path.join(run.workdir, TEST_FILE),
                          pictures_dir=folder)
  pictures.write_eval_pictures(run.data, test_eval, run.class_names, step, folder,
                               is_main=run.is_main, split=split)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains as `config` says, resuming from WORKDIR/checkpoints if there are any.

  `config` is taken as checked: main.py runs `config_checks.validate` on it before anything
  loads; call it first when calling this from a program of your own.

  Returns:
    The final evaluation of the validation split (loss, accuracy, confusion matrix, class
    names) plus 'step', 'stop_reason' and, with a test split, 'test' (its evaluation).
  """
  new_workdir = not epath.Path(workdir_lib.absolute(workdir)).exists()
  held = False   # a run refused by another's lock leaves that run's new workdir alone
  try:
    # Before anything in the workdir is read or written: a second run would resume from this
    # one's checkpoints while it trains and write every metrics row twice.
    with workdir_lock.hold(workdir_lib.absolute(workdir), is_main=jax.process_index() == 0,
                           several_processes=jax.process_count() > 1) as lock:
      held = True
      # A process that loses a peer ends at once: it lets the workdir go first (a gs:// lease
      # would otherwise block the relaunch for minutes).
      with peers.cleanup(lock and lock.release), preemption.Notice() as notice:
        return _train(config, workdir, notice)
  except Exception:
    if new_workdir and held and jax.process_index() == 0:
      _remove_stub(workdir_lib.absolute(workdir))
    raise


def _remove_stub(workdir: str) -> None:
  """Removes a workdir this run created and that holds nothing but its lock file and empty
  folders (it failed before writing a config, a metric or a checkpoint)."""
  if '://' in workdir or not os.path.isdir(workdir):
    return
  for root, _, names in os.walk(workdir):
    if any(name != workdir_lock.LOCK_FILE or root != workdir for name in names):
      return
  shutil.rmtree(workdir, ignore_errors=True)


def _has_checkpoints(workdir: str) -> bool:
  directory = epath.Path(workdir_lib.checkpoint_dir(workdir))
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _train(config: ml_collections.ConfigDict, workdir: str,
           notice: preemption.Notice) -> dict[str, Any]:
  # Every download the run needs, before the data scan and the model: offline, one message.
  entry.check_downloads(config, weights=not _has_checkpoints(workdir))
  run = _Run.create(config, workdir, notice)
  state, progress, setup = _restore_or_initialise(run)
  # Only now that the checkpoint (if any) fits: a refused resume must leave the config that
  # eval and predict read for that checkpoint as it was.
  workdir_lib.save_config(config, run.workdir, run.is_main)
  run.writer.write_hparams(workdir_lib.config_dict(config))
  last_eval = None
  while True:
    if not progress.phase_done:
      state, phase_eval = _run_phase(run, state, progress, setup)
      last_eval = phase_eval or last_eval
    following = _next_phase(run, state, progress)
    if following is None:
      break
    state, progress, setup = following
  run.ckpts.wait()
  step = int(jax.device_get(state['step']))
  if last_eval is None:
    last_eval = run.evaluator(optim.inference_params(state), state['batch_stats'])
  result = evaluation.report(last_eval, run.class_names, step, run.workdir, run.is_main,
                             split=run.data.validation)
  result['stop_reason'] = progress.stop_reason
  pictures.write_eval_pictures(run.data, last_eval, run.class_names, step, run.workdir,
                               is_main=run.is_main)
  if run.data.test_split:
    result['test'] = _final_test(run, state, step, result)
  if run.is_main:
    for path in metrics_lib.plot_history(metrics_lib.read_rows(run.workdir), run.workdir):
      logging.info('Wrote %s', path)
  run.writer.close()
  run.ckpts.close()
  if run.is_main:   # the last line of the log: where to look at the run
    run_report.write_and_log(run.workdir)
  return result
