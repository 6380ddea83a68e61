"""What the checkpoint of a step holds, and how it comes back: for training and inference alike.

    meta = CheckpointMeta(step, phase, progress, class_names, config)    # written with a save
    save(ckpts, state, meta, metrics)
    restored = latest(ckpts, target)         # or best(...), or restore(ckpts, step, target)

A checkpoint is the state pytree (hhjax.training.steps) plus one `CheckpointMeta`, orbax's
custom metadata as JSON: the phase it was written in (by name), where the run stood
(`Progress`), the class names and the run's config. This module is the only one that writes or
reads that record.

`restore` is the one way back, whoever asks: a step-0 checkpoint (what --mode=import_keras
writes) holds weights that start any config's first phase with a fresh optimizer; a later one
is restored whole, into the phase it names, with that phase's optimizer. The `Target` says what
the current config makes of it (model, phases, optimizer, image size, seed, mesh).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import time
from typing import Any

from absl import logging
from etils import epath
import jax

from hhjax import checkpointing
from hhjax import compat
from hhjax import errors
from hhjax import sharding
from hhjax import trees
from hhjax import workdir as workdir_lib
from hhjax.training import phases as phases_lib
from hhjax.training import state as state_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
  """The record saved beside a checkpoint's arrays.

  Attributes:
    step: the global step of the state.
    phase: the name of the phase the state was written in ('warmup', 'finetune').
    progress: where the run stood (epochs done, phase start, whether the phase is done).
    class_names: the classes, in label order.
    config: the run's config as WORKDIR/config.json holds it (plain values).
    imported_from: the Keras file a step-0 checkpoint was imported from, if it was.
  """
  step: int
  phase: str | None
  progress: phases_lib.Progress | None
  class_names: tuple[str, ...] | None
  config: Mapping[str, Any]
  imported_from: str | None = None

  def to_json(self) -> dict[str, Any]:
    out = {'phase': self.phase, 'step': self.step,
           'progress': None if self.progress is None else self.progress.to_metadata(),
           'class_names': None if self.class_names is None else list(self.class_names),
           'config': dict(self.config)}
    if self.imported_from is not None:
      out['imported_from'] = self.imported_from
    return out

  @classmethod
  def from_json(cls, info: Mapping[str, Any]) -> 'CheckpointMeta':
    """From what `to_json` wrote, or what earlier versions wrote (see Progress.from_metadata)."""
    progress = (phases_lib.Progress.from_metadata(info)
                if info.get('progress') is not None and info.get('phase') else None)
    names = info.get('class_names')
    return cls(step=int(info.get('step', 0)), phase=info.get('phase'), progress=progress,
               class_names=None if names is None else tuple(str(n) for n in names),
               config=info.get('config') or {}, imported_from=info.get('imported_from'))


def read_meta(ckpts: checkpointing.Checkpoints, step: int) -> CheckpointMeta:
  """The record saved with `step`; CheckpointDamagedError if it cannot be read."""
  return CheckpointMeta.from_json(ckpts.info(step))


def save(ckpts: checkpointing.Checkpoints, state: PyTree, meta: CheckpointMeta,
         metrics: Mapping[str, float] | None = None) -> None:
  """Saves `state` at `meta.step` with its record (and the metrics that rank the best one)."""
  ckpts.save(meta.step, state, meta.to_json(), metrics)


@dataclasses.dataclass(frozen=True)
class Target:
  """What a checkpoint is restored into, as the current config describes it.

  Attributes:
    model_for: the model for a number of classes (training passes its own model whatever the
      number; inference builds it for the checkpoint's classes).
    phases: the config's phases; a checkpoint's phase must be one of them.
    setup_for: (phase, params or their shapes) -> the phase's labels and optimizer.
    image_size: the input size the model is built for.
    seed: the run's seed (the state's dropout key).
    mesh: the device mesh; the state comes back replicated on it.
    config: the current config as config.json holds it (for the hint when a checkpoint does
      not fit).
    training: False restores a step-0 checkpoint's weights alone (no optimizer state).
  """
  model_for: Callable[[int], Any]
  phases: Sequence[phases_lib.Phase]
  setup_for: Callable[[phases_lib.Phase, PyTree], phases_lib.PhaseSetup]
  image_size: int
  seed: int
  mesh: jax.sharding.Mesh
  config: Mapping[str, Any]
  training: bool = True


@dataclasses.dataclass(frozen=True)
class Restored:
  """A checkpoint brought back: its state and record, and what it was restored into."""
  step: int
  state: PyTree
  meta: CheckpointMeta
  model: Any
  phase: phases_lib.Phase
  setup: phases_lib.PhaseSetup
  progress: phases_lib.Progress


def model_hint(saved_config: Mapping[str, Any] | None, config: Mapping[str, Any]) -> str:
  """The model fields that differ from those the checkpoint was written with, as text."""
  if not saved_config:
    return ''
  diffs = [d for d in workdir_lib.config_differences(saved_config.get('model', {}),
                                                     config.get('model', {}))
           if not d.startswith('pretrained')]
  saved_size = saved_config.get('data', {}).get('image_size')
  size = config.get('data', {}).get('image_size')
  if saved_size != size:
    diffs.append(f'data.image_size: checkpoint {saved_size}, now {size}')
  if not diffs:
    return ''
  return 'The checkpoint was written with another model config:\n  ' + '\n  '.join(
      f'config.{d}' if d.startswith('data.') else f'config.model.{d}' for d in diffs) + '\n'


def _saved_phase(meta: CheckpointMeta, phases: Sequence[phases_lib.Phase]) -> phases_lib.Phase:
  """The phase the checkpoint was written in; an error if the config lacks it."""
  names = [p.name for p in phases]
  if meta.phase not in names:
    raise errors.CheckpointMismatchError(
        f'The checkpoint at step {meta.step} was written in phase {meta.phase!r}, which the '
        f'current config does not have (phases: {names}).')
  return phases[names.index(meta.phase)]


def _variables(ckpts: checkpointing.Checkpoints, meta: CheckpointMeta, model,
               target: Target) -> PyTree:
  """The variables (`params`, `batch_stats`) saved at a step, checked against the model's.

  For a checkpoint at step 0 (what --mode=import_keras writes): nothing has trained yet, so its
  optimizer state is a fresh one of whichever phase it names and is not read; the weights alone
  start any config's first phase.
  """
  arrays = ckpts.restore_arrays(meta.step)
  variables = {'params': arrays['params'], 'batch_stats': arrays.get('batch_stats') or {}}
  problem = trees.describe_differences(
      trees.leaf_specs(variables),
      trees.leaf_specs(state_lib.abstract_variables(model, target.image_size)),
      got_name='the checkpoint', want_name='the config')
  if problem:
    hint = model_hint(meta.config, target.config)
    raise errors.CheckpointMismatchError(
        f'The checkpoint at {ckpts.directory}/{meta.step} does not fit the current config.\n'
        f'{hint}{problem}\nUse the config the checkpoint was written with, or another --workdir.')
  return state_lib.replicate(variables, sharding.replicated(target.mesh))


def restore(ckpts: checkpointing.Checkpoints, step: int, target: Target) -> Restored:
  """The checkpoint of `step`, restored into `target` (the one restore of hhjax)."""
  meta = read_meta(ckpts, step)
  model = target.model_for(len(meta.class_names or ()))
  abstract = state_lib.abstract_variables(model, target.image_size)
  if step == 0:
    # Weights and nothing trained: the current config's phases run from their start, whichever
    # phase the checkpoint was written for.
    phase = target.phases[0]
    setup = target.setup_for(phase, abstract['params'])
    state = _variables(ckpts, meta, model, target)
    if target.training:
      state = state_lib.from_variables(state, setup.tx, target.seed, target.mesh)
    return Restored(step, state, meta, model, phase, setup, phases_lib.Progress(phase.name))
  phase = _saved_phase(meta, target.phases)
  setup = target.setup_for(phase, abstract['params'])
  state = ckpts.restore(
      step, state_lib.abstract_state(model, target.image_size, target.seed, setup.tx,
                                     target.mesh),
      model_hint(meta.config, target.config))
  progress = meta.progress or phases_lib.Progress(phase.name)
  return Restored(step, state, meta, model, phase, setup, progress)


def latest(ckpts: checkpointing.Checkpoints, target: Target) -> Restored:
  """The newest checkpoint that restores whole (damaged ones are skipped with a warning)."""
  _, restored = ckpts.newest_intact(lambda step: restore(ckpts, step, target))
  return restored


def best(ckpts: checkpointing.Checkpoints, target: Target) -> Restored:
  """The best checkpoint by validation accuracy; a damaged one is an error."""
  try:
    return restore(ckpts, ckpts.best_step(), target)
  except errors.CheckpointDamagedError as e:
    raise errors.CheckpointDamagedError(
        f'{e} It is the best one (--checkpoint=best); --checkpoint=latest uses the newest '
        'checkpoint that can be read.') from None


# Eval and predict may run beside a training run, which deletes older checkpoints as it writes
# new ones: a checkpoint deleted while it is read is read again as the newest, a few times.
_READ_ATTEMPTS = 3


def _finished_steps(workdir: str) -> set[int]:
  path = epath.Path(workdir_lib.checkpoint_dir(workdir))
  return {int(p.name) for p in path.iterdir() if p.name.isdigit()} if path.is_dir() else set()


def for_inference(workdir: str, target: Target, which: str = 'latest') -> Restored:
  """The latest or best checkpoint in `workdir`, or that of a step ('160'), read-only, for
  eval, predict, explain, export.

  'latest' is the newest checkpoint that reads whole (damaged ones are skipped with a warning);
  a damaged 'best' is an error. A checkpoint that a training run beside this one deletes
  while it is read (its retention) is read again.
  """
  for _ in range(_READ_ATTEMPTS - 1):
    before = _finished_steps(workdir)
    try:
      return _read_only(workdir, target, which)
    except errors.DataNotFoundError:
      raise             # no checkpoint at all
    except Exception:  # pylint: disable=broad-except  # a vanished file fails in many ways
      time.sleep(0.5)   # a deletion under way
      gone = sorted(before - _finished_steps(workdir))
      if not gone:
        raise           # no checkpoint went away: the error is the checkpoint's own
      logging.warning('A training run deleted checkpoint(s) %s while they were read; reading '
                      'the %s one again.', gone, which)
  return _read_only(workdir, target, which)


def _step(ckpts: checkpointing.Checkpoints, target: Target, which: str,
          steps: Sequence[int]) -> Restored:
  step = int(which)
  if step not in steps:
    raise errors.DataNotFoundError(
        f'--checkpoint={which}: no checkpoint of step {step} in {ckpts.directory} (it has '
        f'steps {sorted(steps)}; older ones are removed as training keeps the last few and '
        'the best).')
  return restore(ckpts, step, target)


def _read_only(workdir: str, target: Target, which: str) -> Restored:
  compat.quiet_orbax()
  with checkpointing.Checkpoints(workdir_lib.checkpoint_dir(workdir), read_only=True) as ckpts:
    steps = ckpts.all_steps()
    if not steps:
      raise errors.DataNotFoundError(
          f'No finished checkpoint in {ckpts.directory}: train first.')
    if which == 'best':
      restored = best(ckpts, target)
    elif which == 'latest':
      restored = latest(ckpts, target)
    else:
      restored = _step(ckpts, target, which, steps)
    if restored.step == max(steps) or which != 'latest':
      logging.info('Using the checkpoint of step %d (%s) in %s.', restored.step, which,
                   ckpts.directory)
    else:
      logging.warning('Using the checkpoint of step %d in %s, the newest that can be read (the '
                      'latest, step %d, is damaged).', restored.step, ckpts.directory,
                      max(steps))
  return restored
