"""The phases of a run (warm-up, then fine-tuning) and where a run stands between steps.

A run is a list of phases. Each has its own trainable set (freezing rules over parameter
paths), learning rate and fresh optimizer, as Keras recompiles between the tutorial's two
stages. `PhaseSetup` builds a phase's labels and optimizer once; the initial state, a restore,
the switch to the next phase and the train step all use that one object.

`Progress` is what a checkpoint records besides the arrays. It names its phase (not an index
into the config's list of phases), so a run resumed with warm-up epochs added or removed
continues in the phase it was in.
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

import optax

from hhjax import errors
from hhjax.model import classifier
from hhjax.training import losses
from hhjax.training import optim
from hhjax.training import patience as patience_lib

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stage of training with its own trainable set and learning rate."""
  name: str                       # 'warmup' or 'finetune'
  epochs: int
  learning_rate: float
  rules: tuple[tuple[str, optim.Label], ...]   # freezing rules, first match wins
  bn_train_from: str | None       # None: every BatchNorm in inference mode
  # config.<phase>.layer_decay over `blocks` (the backbone's, stem first); 1.0: none.
  layer_decay: float = 1.0
  blocks: tuple[str, ...] = ()
  # config.<phase>.early_stopping: Keras's EarlyStopping for this phase.
  stopping: patience_lib.Patience = patience_lib.Patience()
  # config.<phase>.schedule: the rate over the phase's optimizer steps (constant: learning_rate)
  schedule: optim.ScheduleSpec = optim.ScheduleSpec()


def _rules(value) -> tuple[tuple[str, optim.Label], ...] | None:
  if value is None:
    return None
  return tuple((str(p), optim.rule_label(l)) for p, l in value)


def patience_rule(value: Mapping[str, Any] | None) -> patience_lib.Patience:
  """config.<phase>.early_stopping as a Patience (absent: off)."""
  if not value:
    return patience_lib.Patience()
  baseline = value.get('baseline')
  return patience_lib.Patience(
      monitor=value.get('monitor') or None, min_delta=float(value.get('min_delta', 0.0)),
      patience=int(value.get('patience', 0)), mode=str(value.get('mode', 'auto')),
      baseline=None if baseline is None else float(baseline),
      restore_best_weights=bool(value.get('restore_best_weights', False)),
      start_from_epoch=int(value.get('start_from_epoch', 0)))


def _phase_options(phase: Mapping[str, Any], layers: Sequence[str]) -> dict[str, Any]:
  """The Phase fields of config.<phase>'s layer decay and Keras early stopping."""
  return {'layer_decay': float(phase.get('layer_decay', 1.0) or 1.0),
          'blocks': tuple(layers),
          'stopping': patience_rule(phase.get('early_stopping')),
          'schedule': optim.ScheduleSpec.from_mapping(phase.get('schedule'))}


def make_phases(warmup: Mapping[str, Any], finetune: Mapping[str, Any],
                cut: str, backbone: str | None = None) -> list[Phase]:
  """The phases asked for, in order (a phase with 0 epochs is left out).

  Args:
    warmup: config.warmup (epochs, learning_rate, param_labels, schedule).
    finetune: config.finetune (epochs, learning_rate, unfreeze_from, train_bn, param_labels,
      schedule).
    cut: the backbone's last block (config.model.cut): fine-tuning opens blocks up to it.
    backbone: config.model.backbone (None: the default, InceptionV3).
  """
  blocks = classifier.backbone_blocks(cut, backbone)
  layers = classifier.backbone_layers(cut, backbone)   # the stem too, for the layer decay
  phases = []
  if warmup['epochs'] > 0:
    rules = _rules(warmup.get('param_labels')) or (
        ('^head/', optim.TRAIN), ('^backbone/', optim.FREEZE))
    phases.append(Phase('warmup', int(warmup['epochs']), float(warmup['learning_rate']), rules,
                        None, **_phase_options(warmup, layers)))
  if finetune['epochs'] > 0:
    ft = finetune
    default_rules = tuple(optim.finetune_rules(ft['unfreeze_from'], blocks))  # checks the name
    rules = _rules(ft.get('param_labels')) or default_rules
    bn_train_from = ft['unfreeze_from'] if ft['train_bn'] else None
    if bn_train_from == 'stem':   # every block: the first one (VGG has no stem)
      bn_train_from = layers[0]
    phases.append(Phase('finetune', int(ft['epochs']), float(ft['learning_rate']), rules,
                        bn_train_from, **_phase_options(ft, layers)))
  if not phases:
    raise errors.ConfigError(
        'Nothing to train: config.warmup.epochs and config.finetune.epochs are 0.')
  return phases


@dataclasses.dataclass(frozen=True)
class PhaseSetup:
  """A phase with its parameter labels, optimizer and loss, built once.

  `multipliers` are the learning-rate factors of the trainable parameters (a tree like
  `labels`: the freezing rules' multipliers times the layer decay), None when all are 1.
  """
  phase: Phase
  labels: PyTree
  tx: optax.GradientTransformation
  loss: losses.LossSpec = losses.LossSpec()
  multipliers: PyTree | None = None


def setup(phase: Phase, params: PyTree, optimizer: optim.OptimizerSpec,
          loss: losses.LossSpec = losses.LossSpec()) -> PhaseSetup:
  """Labels `params` (arrays or shapes) by the phase's rules and builds its optimizer.

  Per-layer learning rates scale the optimizer's updates (`keras_optim.scale_by_path`); with every
  factor 1 the optimizer is the plain one, unchanged.
  """
  labels = optim.param_labels(params, phase.rules)
  multipliers = optim.lr_multipliers(params, phase.rules, phase.blocks, phase.layer_decay)
  tx = optim.make_optimizer(labels, phase.learning_rate, optimizer, phase.schedule, multipliers)
  return PhaseSetup(phase, labels, tx, loss, multipliers)


@dataclasses.dataclass
class Progress:
  """Where the run stands between steps; saved as checkpoint metadata."""
  phase: str                      # the current phase's name
  phase_start_step: int = 0
  phase_done: bool = False
  epochs_done: int = 0            # completed epochs over all phases
  stop_reason: str | None = None  # why the last phase ended early, if it did
  # The phase's Keras EarlyStopping counters (config.<phase>.early_stopping).
  patience: patience_lib.Counters = dataclasses.field(default_factory=patience_lib.Counters)
  # ReduceLROnPlateau's counters in this phase (hhjax.training.plateau), when it is on
  plateau: dict[str, Any] | None = None

  def to_metadata(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_metadata(cls, info: Mapping[str, Any]) -> 'Progress':
    """From a checkpoint's metadata (`info['progress']` and the phase name `info['phase']`).

    Checkpoints written before the phase was saved by name also hold a 'phase_index'; it
    counted the phases of the config that wrote it, so it is ignored.
    """
    saved = dict(info['progress'])
    saved.pop('phase_index', None)
    saved['phase'] = info['phase']
    saved['patience'] = patience_lib.Counters.from_dict(saved.get('patience'))
    return cls(**saved)

  def index(self, phases: Sequence[Phase]) -> int:
    return [p.name for p in phases].index(self.phase)

  def next_phase(self, phases: Sequence[Phase], step: int) -> 'Progress | None':
    """Progress at the start of the phase after this one, or None after the last."""
    i = self.index(phases) + 1
    if i == len(phases):
      return None
    return Progress(phases[i].name, phase_start_step=step, epochs_done=self.epochs_done)


def epochs_text(n: int) -> str:
  """'1 epoch', '2 epochs'."""
  return f'{n} epoch' if n == 1 else f'{n} epochs'


def heads_on_random_features(phases: Sequence[Phase], params: PyTree,
                             num_classes: int) -> list[str]:
  """Warnings for the phases that train only the head while the backbone is random and frozen.

  For a run that starts from random init: such a phase fits a head to random features, which
  keep little of a photo's content, and ends near chance on real images. One sentence each,
  with what to do instead.
  """
  warnings = []
  for phase in phases:
    trainable, _ = optim.split(params, optim.param_labels(params, phase.rules))
    if trainable.get('backbone'):
      continue
    warnings.append(
        f'Phase {phase.name} trains only the head, on a frozen backbone with random weights '
        '(config.model.pretrained=None and no checkpoint): random features keep little of a '
        f'photo, so on real images expect its {epochs_text(phase.epochs)} to end near '
        'chance '
        f'({100 / max(num_classes, 1):.0f} % for {num_classes} classes). Instead load weights '
        '(--config.model.pretrained=PATH, a local Keras .h5 or converted folder), or train '
        'the backbone too: --config.warmup.epochs=0 --config.finetune.unfreeze_from=stem '
        '(the README\'s "Offline" recipe).')
  return warnings


def reopen_for_more_epochs(progress: Progress, phase: Phase, step: int,
                           steps_per_epoch: int) -> str | None:
  """Reopens a finished phase that the config now gives more epochs; returns what to log.

  As Keras's `fit(initial_epoch=...)`: a run whose last phase ended at its epochs, started again
  with more, trains the added epochs in that phase, from the step it ended at. The checkpoint at
  a phase's end differs from one at an epoch's end inside the phase only by `phase_done`, so the
  continued run ends exactly where one given those epochs from the start would. A phase ended by
  early stopping stays done (its stop rule decided, not its epoch count). None: nothing to say.
  """
  if not progress.phase_done or progress.phase != phase.name:
    return None
  done = (step - progress.phase_start_step) // steps_per_epoch
  if phase.epochs <= done:
    return None
  if progress.stop_reason:
    return (f'Phase {phase.name} stopped early after {epochs_text(done)} '
            f'({progress.stop_reason}); it stays done: config.{phase.name}.epochs={phase.epochs} '
            'adds no epochs to an early-stopped phase (a new --workdir trains afresh).')
  if progress.patience.restored_from is not None:
    return (f'Phase {phase.name} ended after {epochs_text(done)} with the weights of step '
            f'{progress.patience.restored_from} restored (config.{phase.name}.early_stopping.'
            f'restore_best_weights); it stays done: more epochs would not continue the run '
            'that was trained (a new --workdir trains afresh).')
  progress.phase_done = False
  return (f'Phase {phase.name} ended after {epochs_text(done)}; config.{phase.name}.epochs is now '
          f'{phase.epochs}: training {phase.epochs - done} more from step {step}.')


def passed_phases_grown(progress: Progress, phases: Sequence[Phase],
                        saved_epochs: Mapping[str, int]) -> list[str]:
  """The phases before the current one that the config gives more epochs than the checkpoint's
  config did: they are over and cannot take them. One sentence per phase."""
  current = progress.index(phases)
  return [f'config.{p.name}.epochs went from {saved_epochs[p.name]} to {p.epochs}, but phase '
          f'{p.name} is over (the run is in phase {progress.phase}): the added epochs are not '
          'trained; a new --workdir trains them.'
          for p in phases[:current]
          if p.name in saved_epochs and p.epochs > int(saved_epochs[p.name])]


# config.early_stopping: the metrics of an epoch's row, and which way is better.
EARLY_STOPPING_METRICS = ('train_accuracy', 'train_loss', 'val_accuracy', 'val_loss')
EARLY_STOPPING_MODES = ('max', 'min')


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """config.early_stopping: end a phase when `metric` passes `threshold` at an epoch's end.

  A false `metric` (None, or '' from the command line) means no early stopping.
  """
  metric: str | None = None
  threshold: float = 0.999
  mode: str = 'max'        # 'max': stop above the threshold; 'min': below it


def early_stop(rule: EarlyStopping, row: Mapping[str, float]) -> str | None:
  """Why `row` (an epoch's metrics) ends the phase per `rule`, or None.

  config_checks.validate has checked the metric and the mode before the run started.
  """
  if not rule.metric:
    return None
  value, threshold = row[rule.metric], float(rule.threshold)
  above = rule.mode == 'max'
  if (above and value > threshold) or (not above and value < threshold):
    return (f'{rule.metric} = {value:.4f} {">" if above else "<"} {threshold} '
            '(config.early_stopping)')
  return None
