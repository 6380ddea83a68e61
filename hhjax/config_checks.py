"""Every config field checked once, before any work starts.

`main.py` calls `validate` right after it has the config (a configs/*.py file with overrides,
or the config.json a run saved in its workdir) and before TensorFlow and the library load. A
mistyped value then fails within seconds with a message that names the field, the value and
what is allowed, instead of minutes later in the input pipeline or the training loop, or never
(an early_stopping.mode other than 'max'/'min' used to mean "never stop").

Each allowed set is defined once. The model's and the optimizer's sets are read from the
modules that use them (those import jax, flax and optax, not TensorFlow), so those modules
must not import this one. The input pipeline's sets are read from hhjax.data.spec, which
defines them beside the fields they constrain without importing TensorFlow. The training
loop's sets are defined here, because hhjax.training.loop imports orbax: it reads them from
here.

Fields absent from a config are skipped: a workdir written by an older version may lack them.
"""

from collections.abc import Callable, Mapping
import dataclasses
import math
import numbers
import re
from typing import Any

import ml_collections

from hhjax import errors
from hhjax import eval_metrics
from hhjax.data import spec as data_spec
from hhjax.model import classifier
from hhjax.model import backbones
from hhjax.model import lowering
from hhjax.model import preprocessing
from hhjax.training import losses
from hhjax.training import keras_optim
from hhjax.training import optim
from hhjax.training import patience
from hhjax.training import phases
from hhjax.training import plateau

# config.speed fields read by lowering.parse_switch: the model's rewrites, then the cache.
SPEED_SWITCHES = tuple(f.name for f in dataclasses.fields(lowering.Lowering)) + (
    'cache_features',)

# A config from configs/*.py, or one loaded from a workdir's config.json.
Config = ml_collections.ConfigDict | Mapping[str, Any]

_MISSING = object()


@dataclasses.dataclass(frozen=True)
class _Rule:
  """A test of one field's value, and the words that say what passes it."""
  test: Callable[[Any], bool]
  allowed: str


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  """A real number, NaN excluded (it fails every comparison, so no range can hold it)."""
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and not math.isnan(value))


def _integer(minimum: int) -> _Rule:
  return _Rule(lambda v: _is_int(v) and v >= minimum, f'an integer >= {minimum}')


def _number(low: float, high: float | None = None, *, low_open: bool = False) -> _Rule:
  """A number >= low (> low if `low_open`), and < high if given."""
  if high is not None:
    return _Rule(lambda v: _is_number(v) and low <= v < high, f'a number in [{low}, {high})')
  if low_open:
    return _Rule(lambda v: _is_number(v) and v > low, f'a number > {low}')
  return _Rule(lambda v: _is_number(v) and v >= low, f'a number >= {low}')


def _one_of(values: tuple[str, ...]) -> _Rule:
  return _Rule(lambda v: isinstance(v, str) and v in values,
               'one of ' + ', '.join(repr(v) for v in values))


def _optional(rule: _Rule) -> _Rule:
  return _Rule(lambda v: v is None or rule.test(v), f'None or {rule.allowed}')


def _zoom_ok(value: Any) -> bool:
  # Keras: z means zooms in [1 - z, 1 + z]; a pair is [lower, upper]. Zooms must be positive.
  if _is_number(value):
    return 0 <= value < 1
  return (isinstance(value, (list, tuple)) and len(value) == 2
          and all(_is_number(z) for z in value) and 0 < value[0] <= value[1])


def _pair(low: float, high: float | None, words: str) -> _Rule:
  """A pair [lower, upper] of numbers with low < lower <= upper (<= high if given)."""
  def test(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(_is_number(v) for v in value) and low < value[0] <= value[1]
            and (high is None or value[1] <= high))
  bound = f'<= {high}' if high is not None else ''
  return _Rule(test, f'a pair [lower, upper] with {low} < lower <= upper {bound} ({words})'
               .replace('  ', ' '))


def _erase_value_ok(value: Any) -> bool:
  if value == data_spec.ERASE_RANDOM:
    return True
  try:
    return 0 <= float(value) <= 255
  except (TypeError, ValueError):
    return False


def _class_weight_ok(value: Any) -> bool:
  if value is None or value in ('', losses.BALANCED):
    return True
  try:
    losses.parse_mapping(value)
  except ValueError:
    return False
  return True


_BOOL = _Rule(lambda v: isinstance(v, bool), 'True or False')
_NUMBER = _Rule(_is_number, 'a number')
_RANGE = _number(0)
_LEARNING_RATE = _number(0, low_open=True)
_PROBABILITY = _Rule(lambda v: _is_number(v) and 0 <= v <= 1, 'a number in [0, 1]')
# Beta(alpha, alpha)'s parameter, or 0 for off.
_ALPHA = _Rule(lambda v: _is_number(v) and 0 <= v < math.inf, 'a finite number >= 0 (0: off)')

# The fields whose value alone decides; cross-field rules are in `_check_relations`.
RULES: dict[str, _Rule] = {
    'seed': _Rule(_is_int, 'an integer'),
    'batch_size': _integer(1),
    'eval_batch_size': _optional(_integer(1)),
    'steps_per_epoch': _optional(_integer(1)),
    'log_every_steps': _integer(0),
    'checkpoint_every_steps': _integer(0),
    'keep_checkpoints': _integer(1),
    'data.source': _one_of(data_spec.SOURCES),
    'data.image_size': _integer(min(b.min_size for b in backbones.BACKBONES.values())),
    'data.resize_method': _one_of(data_spec.RESIZE_METHODS),
    'data.preprocessing': _one_of(preprocessing.NAMES),
    'data.image_dtype': _one_of(data_spec.IMAGE_DTYPES),
    'data.bad_files': _one_of(data_spec.BAD_FILES),
    'data.cache_decoded': _BOOL,
    'data.validation_fraction': _number(0, 1),
    'data.num_parallel_calls': _optional(_integer(1)),
    'data.fake.num_train_examples': _integer(1),
    'data.fake.num_eval_examples': _integer(1),
    'data.fake.num_classes': _integer(2),
    'data.augment.enabled': _BOOL,
    'data.augment.rotation_range': _RANGE,
    'data.augment.width_shift_range': _RANGE,
    'data.augment.height_shift_range': _RANGE,
    'data.augment.shear_range': _RANGE,
    'data.augment.zoom_range': _Rule(
        _zoom_ok, 'a number z in [0, 1) (zooms in [1 - z, 1 + z]) or a pair [lower, upper] '
        'with 0 < lower <= upper'),
    'data.augment.horizontal_flip': _BOOL,
    'data.augment.vertical_flip': _BOOL,
    'data.augment.fill_mode': _one_of(data_spec.FILL_MODES),
    'data.augment.cval': _NUMBER,
    'data.augment.on': _one_of(data_spec.AUGMENT_ON),
    'data.crop.random_resized_crop': _BOOL,
    'data.crop.scale': _pair(0, 1, "the box's area over the image's"),
    'data.crop.ratio': _pair(0, None, "the box's width over its height"),
    'data.crop.eval_fraction': _optional(_Rule(lambda v: _is_number(v) and 0 < v <= 1,
                                               'a number in (0, 1]')),
    'data.random_erasing.probability': _Rule(lambda v: _is_number(v) and 0 <= v <= 1,
                                             'a number in [0, 1]'),
    'data.random_erasing.scale': _pair(0, 1, "the box's area over the image's"),
    'data.random_erasing.ratio': _pair(0, None, "the box's height over its width"),
    'data.random_erasing.value': _Rule(
        _erase_value_ok, f'a grey level in [0, 255] or {data_spec.ERASE_RANDOM!r}'),
    'data.mix.mixup_alpha': _ALPHA,
    'data.mix.cutmix_alpha': _ALPHA,
    'data.mix.prob': _PROBABILITY,
    'data.mix.switch_prob': _PROBABILITY,
    'model.backbone': _one_of(backbones.NAMES),
    'model.head': _one_of(classifier.HEADS),
    'model.hidden': _integer(0),
    'model.dropout': _number(0, 1),
    'model.drop_connect_rate': _optional(_number(0, 1)),
    'speed.compute_dtype': _optional(_one_of(tuple(lowering.COMPUTE_DTYPES))),
    'speed.cache_features_max_mb': _number(0, low_open=True),
    'optimizer.name': _one_of(tuple(optim.OPTIMIZERS)),
    'optimizer.rho': _number(0, 1),
    'optimizer.epsilon': _number(0, low_open=True),
    'optimizer.momentum': _Rule(lambda v: _is_number(v) and 0 <= v <= 1, 'a number in [0, 1]'),
    'optimizer.nesterov': _BOOL,
    'optimizer.beta_1': _number(0, 1),
    'optimizer.beta_2': _number(0, 1),
    'optimizer.weight_decay': _optional(_number(0)),
    'optimizer.amsgrad': _BOOL,
    'optimizer.global_clipnorm': _optional(_number(0, low_open=True)),
    'optimizer.clipnorm': _optional(_number(0, low_open=True)),
    'optimizer.clipvalue': _optional(_number(0, low_open=True)),
    # Keras: None, or at least 2 micro-batches per update.
    'optimizer.gradient_accumulation_steps': _optional(_integer(2)),
    'optimizer.use_ema': _BOOL,
    'optimizer.ema_momentum': _Rule(lambda v: _is_number(v) and 0 <= v <= 1,
                                    'a number in [0, 1]'),
    'optimizer.ema_overwrite_frequency': _optional(_integer(1)),
    'reduce_lr_on_plateau.monitor': _Rule(
        lambda v: not v or (isinstance(v, str) and v in plateau.METRICS),
        'None or ' + _one_of(plateau.METRICS).allowed),
    'reduce_lr_on_plateau.factor': _number(0, 1),   # Keras refuses a factor >= 1
    'reduce_lr_on_plateau.patience': _integer(0),
    'reduce_lr_on_plateau.min_delta': _number(0),
    'reduce_lr_on_plateau.cooldown': _integer(0),
    'reduce_lr_on_plateau.min_lr': _number(0),
    'warmup.epochs': _integer(0),
    'warmup.learning_rate': _LEARNING_RATE,
    'finetune.epochs': _integer(0),
    'finetune.learning_rate': _LEARNING_RATE,
    'finetune.train_bn': _BOOL,
    # The loop reads any false value ('' from the command line too) as "no early stopping".
    'early_stopping.metric': _Rule(
        lambda v: not v or (isinstance(v, str) and v in phases.EARLY_STOPPING_METRICS),
        'None or ' + _one_of(phases.EARLY_STOPPING_METRICS).allowed),
    'early_stopping.mode': _one_of(phases.EARLY_STOPPING_MODES),
    'early_stopping.threshold': _NUMBER,
    'loss.label_smoothing': _number(0, 1),
    'loss.class_weight': _Rule(
        _class_weight_ok, f"None, {losses.BALANCED!r}, or a mapping {{class name or index: "
        "weight >= 0}} (or 'name=weight,...')"),
    'eval.top_k': _Rule(lambda v: isinstance(v, (list, tuple))
                        and all(_is_int(k) and k >= 1 for k in v),
                        'a list of integers >= 1, e.g. (5,)'),
    'eval.threshold': _one_of(eval_metrics.THRESHOLD_RULES),
    'eval.calibration_bins': _integer(1),
}
# Each phase's per-layer learning rates and Keras early stopping.
for _phase in ('warmup', 'finetune'):
  RULES.update({
      f'{_phase}.layer_decay': _Rule(lambda v: _is_number(v) and 0 < v <= 1,
                                     'a number in (0, 1] (1: no layer decay)'),
      f'{_phase}.early_stopping.monitor': _Rule(
          lambda v: not v or (isinstance(v, str) and v in phases.EARLY_STOPPING_METRICS),
          'None or ' + _one_of(phases.EARLY_STOPPING_METRICS).allowed),
      f'{_phase}.early_stopping.min_delta': _number(0),
      f'{_phase}.early_stopping.patience': _integer(0),
      f'{_phase}.early_stopping.mode': _one_of(patience.MODES),
      f'{_phase}.early_stopping.baseline': _optional(_NUMBER),
      f'{_phase}.early_stopping.restore_best_weights': _BOOL,
      f'{_phase}.early_stopping.start_from_epoch': _integer(0),
  })


# config.<phase>.schedule's fields (boundaries and values: `_check_schedule`).
SCHEDULE_RULES: dict[str, _Rule] = {
    'name': _one_of(keras_optim.SCHEDULES),
    'decay_steps': _integer(1),
    'alpha': _Rule(lambda v: _is_number(v) and 0 <= v <= 1, 'a number in [0, 1]'),
    'warmup_target': _optional(_number(0)),
    'warmup_steps': _integer(0),
    'decay_rate': _number(0, low_open=True),
    'staircase': _BOOL,
}
for _phase in ('warmup', 'finetune'):
  RULES.update({f'{_phase}.schedule.{k}': rule for k, rule in SCHEDULE_RULES.items()})


def _lookup(config: Any, path: str) -> Any:
  """The value at a '.'-joined path, or _MISSING where the config lacks it."""
  node = config
  for key in path.split('.'):
    try:
      node = node[key]
    except (KeyError, IndexError, TypeError, AttributeError):
      return _MISSING
  return node


def _problem(path: str, value: Any, allowed: str) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()   # a mapping's repr on one line
  return f'config.{path} = {value!r}: must be {allowed}.'


def _check_rules(config: Any, found: list[str]) -> None:
  for path, rule in RULES.items():
    value = _lookup(config, path)
    if value is not _MISSING and not rule.test(value):
      found.append(_problem(path, value, rule.allowed))
  for name in SPEED_SWITCHES:
    value = _lookup(config, f'speed.{name}')
    if value is not _MISSING:
      try:
        lowering.parse_switch(value, name=f'config.speed.{name}')
      except errors.ConfigError as e:
        found.append(str(e))


def _check_param_labels(config: Any, phase: str, found: list[str]) -> None:
  """Each freezing rule a (regex, label) pair with a regex that compiles and a known label."""
  path = f'{phase}.param_labels'
  rules = _lookup(config, path)
  if rules is _MISSING or rules is None:
    return
  labels = (', '.join(repr(label) for label in optim.LABELS)
            + ' or a learning-rate multiplier > 0')
  if not isinstance(rules, (list, tuple)):
    found.append(_problem(path, rules, f'a list of (regex, label) pairs, label one of {labels}'))
    return
  for i, rule in enumerate(rules):
    if (not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str)
        or not (rule[1] in optim.LABELS or optim.is_multiplier(rule[1]))):
      found.append(_problem(f'{path}[{i}]', rule, f'a (regex, label) pair, label one of {labels}'))
      continue
    try:
      re.compile(rule[0])
    except re.error as e:
      found.append(_problem(f'{path}[{i}]', rule, f'a valid regex ({e})'))


def _check_weight_decay_exclude(config: Any, found: list[str]) -> None:
  path = 'optimizer.weight_decay_exclude'
  patterns = _lookup(config, path)
  if patterns is _MISSING or patterns is None:
    return
  if not isinstance(patterns, (list, tuple)):
    found.append(_problem(path, patterns, "a list of regexes over parameter paths, e.g. "
                          "('bias',)"))
    return
  for i, pattern in enumerate(patterns):
    if not isinstance(pattern, str):
      found.append(_problem(f'{path}[{i}]', pattern, 'a regex (a string)'))
      continue
    try:
      re.compile(pattern)
    except re.error as e:
      found.append(_problem(f'{path}[{i}]', pattern, f'a valid regex ({e})'))


def _check_schedule(config: Any, phase: str, found: list[str]) -> None:
  """A schedule's boundaries (increasing step numbers) and values (rates > 0), one more value
  than boundaries for a piecewise schedule."""
  path = f'{phase}.schedule'
  boundaries = _lookup(config, f'{path}.boundaries')
  values = _lookup(config, f'{path}.values')
  if boundaries is not _MISSING and not (
      isinstance(boundaries, (list, tuple)) and all(_is_int(b) and b >= 0 for b in boundaries)
      and all(a < b for a, b in zip(boundaries, boundaries[1:]))):
    found.append(_problem(f'{path}.boundaries', boundaries,
                          'a list of increasing step numbers >= 0'))
    return
  if values is not _MISSING and not (
      isinstance(values, (list, tuple)) and all(_is_number(v) and v > 0 for v in values)):
    found.append(_problem(f'{path}.values', values, 'a list of learning rates > 0'))
    return
  if (_lookup(config, f'{path}.name') == 'piecewise'
      and (boundaries is _MISSING or values is _MISSING
           or len(values) != len(boundaries) + 1)):
    n = 1 + (0 if boundaries is _MISSING else len(boundaries))
    found.append(_problem(f'{path}.values', None if values is _MISSING else values,
                          f'{n} learning rates (one more than config.{path}.boundaries) for a '
                          'piecewise schedule'))


def _check_splits(config: Any, found: list[str]) -> None:
  """Training, validation and test: named apart, validation named or held out."""
  if _lookup(config, 'data.validation_split') is _MISSING:
    return   # a config.json written before validation and test were apart (eval_split)
  eval_split = _lookup(config, 'data.eval_split')
  if eval_split not in (None, '', _MISSING):
    found.append(
        f'config.data.eval_split = {eval_split!r}: replaced by config.data.validation_split (the '
        'split that chooses: early stopping, the best checkpoint) and config.data.test_split '
        '(reported once training ends, never chosen on). For an image folder with train/ and '
        'validation/: --config.data.validation_split=validation --config.data.test_split=None; '
        'to keep choosing and reporting on one split as before, set validation_split to it and '
        'test_split=None.')
  train = _lookup(config, 'data.train_split')
  validation = _lookup(config, 'data.validation_split') or None
  test = _lookup(config, 'data.test_split') or None
  fraction = _lookup(config, 'data.validation_fraction')
  if validation is None and _is_number(fraction) and fraction == 0:   # the rule: in [0, 1)
    found.append(_problem('data.validation_fraction', fraction,
                          'in (0, 1) when config.data.validation_split is None (the share of '
                          'the training split held out for validation)'))
  if validation is not None and validation == train:
    found.append(_problem('data.validation_split', validation,
                          f'another split than config.data.train_split ({train!r}), or None to '
                          'hold out config.data.validation_fraction of it'))
  if test is not None and test == train:
    found.append(_problem('data.test_split', test,
                          f'another split than config.data.train_split ({train!r}), or None'))
  if test is not None and test == validation:
    found.append(_problem(
        'data.test_split', test,
        'another split than config.data.validation_split, or None: the split that chooses '
        'cannot also give the reported result (configs/seed_keras.py validates on test and '
        'sets test_split=None)'))


def _check_relations(config: Any, found: list[str]) -> None:
  """The rules that involve more than one field."""
  _check_splits(config, found)
  if _lookup(config, 'data.source') == 'folder' and _lookup(config, 'data.dir') in (None, ''):
    found.append(_problem('data.dir', _lookup(config, 'data.dir'),
                          "the image folder's root when config.data.source='folder'"))

  epochs = {phase: _lookup(config, f'{phase}.epochs') for phase in ('warmup', 'finetune')}
  given = {phase: n for phase, n in epochs.items() if n is not _MISSING}
  if given and all(_is_int(n) for n in given.values()) and not any(
      n > 0 for n in given.values()):
    found.append(' and '.join(f'config.{phase}.epochs = {n!r}' for phase, n in given.items())
                 + ': nothing to train; at least one phase needs epochs > 0.')

  # Keras's optimizers take one of the three clippings, and amsgrad in Adam and AdamW only.
  clips = [name for name in ('global_clipnorm', 'clipnorm', 'clipvalue')
           if _lookup(config, f'optimizer.{name}') not in (_MISSING, None)]
  if len(clips) > 1:
    found.append(' and '.join(f'config.optimizer.{name} = {_lookup(config, "optimizer." + name)!r}'
                              for name in clips)
                 + ': only one of global_clipnorm, clipnorm and clipvalue may be set (as in '
                 'Keras); set the others to None.')
  if _lookup(config, 'optimizer.amsgrad') is True and _lookup(
      config, 'optimizer.name') not in ('adam', 'adamw', _MISSING):
    found.append(_problem('optimizer.amsgrad', True,
                          "False unless config.optimizer.name is 'adam' or 'adamw' (Keras's "
                          'amsgrad is theirs)'))

  # Keras's ReduceLROnPlateau sets the optimizer's rate, which a schedule does not allow.
  monitor = _lookup(config, 'reduce_lr_on_plateau.monitor')
  if monitor and monitor is not _MISSING:
    for phase in ('warmup', 'finetune'):
      name = _lookup(config, f'{phase}.schedule.name')
      if name not in (_MISSING, 'constant'):
        found.append(_problem(f'{phase}.schedule.name', name,
                              "'constant' while config.reduce_lr_on_plateau.monitor is set "
                              '(the plateau rule sets the rate a schedule would)'))

  _check_mix(config, found)

  # The cut, the image size and where fine-tuning starts are the backbone's.
  name = _lookup(config, 'model.backbone')
  name = backbones.DEFAULT if name is _MISSING else name
  if name not in backbones.BACKBONES:
    return   # Named by the rule of model.backbone.
  backbone = backbones.get(name)
  size = _lookup(config, 'data.image_size')
  if _is_int(size) and not size >= backbone.min_size:
    found.append(_problem('data.image_size', size,
                          f'an integer >= {backbone.min_size} ({backbone.keras_name})'))
  rate = _lookup(config, 'model.drop_connect_rate')
  if backbone.drop_connect_rate is None and _is_number(rate) and 0 <= rate < 1:
    found.append(_problem('model.drop_connect_rate', rate,
                          f'None ({backbone.keras_name} has no drop-connect)'))
  endpoints = ', '.join(repr(e) for e in backbone.endpoints)
  cut = _lookup(config, 'model.cut')
  if cut is not _MISSING and cut not in backbone.endpoints:
    found.append(_problem('model.cut', cut, f'an endpoint of {backbone.keras_name}: {endpoints}'))
  start = _lookup(config, 'finetune.unfreeze_from')
  if start is _MISSING:
    return
  if start != 'stem' and start not in backbone.endpoints:
    found.append(_problem('finetune.unfreeze_from', start,
                          f"'stem' or an endpoint of {backbone.keras_name}: {endpoints}"))
    return
  # Fine-tuning opens blocks of the backbone, so only blocks up to the cut.
  finetune_epochs = epochs['finetune']
  if (cut in backbone.endpoints and start != 'stem' and _is_int(finetune_epochs)
      and finetune_epochs > 0):
    blocks = backbone.endpoints_to(cut)
    if start not in blocks:
      found.append(_problem(
          'finetune.unfreeze_from', start,
          f"'stem' or a block up to config.model.cut = {cut!r}: "
          + ', '.join(repr(b) for b in blocks)))


def _check_mix(config: Any, found: list[str]) -> None:
  """Mixing happens in the train step, on images: a cache of features cannot be mixed."""
  alphas = [_lookup(config, f'data.mix.{name}') for name in ('mixup_alpha', 'cutmix_alpha')]
  prob = _lookup(config, 'data.mix.prob')
  if not (any(_is_number(a) and a > 0 for a in alphas)
          and (prob is _MISSING or (_is_number(prob) and prob > 0))):
    return
  switch = _lookup(config, 'speed.cache_features')
  try:
    mode = lowering.parse_switch(switch) if switch is not _MISSING else 'off'
  except errors.ConfigError:
    return   # named by the rule of speed.cache_features
  if mode == 'on':
    found.append(_problem('speed.cache_features', switch,
                          "'auto' or 'off' while config.data.mix mixes batches (mixup_alpha or "
                          'cutmix_alpha > 0): the train step mixes images, and cached features '
                          'cannot be mixed'))


def problems(config: Config) -> list[str]:
  """One line per bad field of `config` (empty: it is valid); see `validate`."""
  found = []
  _check_rules(config, found)
  for phase in ('warmup', 'finetune'):
    _check_param_labels(config, phase, found)
    _check_schedule(config, phase, found)
  _check_weight_decay_exclude(config, found)
  _check_relations(config, found)
  return found


def validate(config: Config) -> None:
  """Raises ConfigError naming every field of `config` whose value is not allowed.

  Args:
    config: a ConfigDict from configs/*.py, or one loaded from a workdir's config.json (plain
      values, lists for tuples); fields it lacks are skipped.

  Raises:
    errors.ConfigError: one line per bad field, each with the field, its value and what is
      allowed.
  """
  found = problems(config)
  if len(found) == 1:
    raise errors.ConfigError(found[0])
  if found:
    raise errors.ConfigError(f'{len(found)} config fields have bad values:\n  '
                             + '\n  '.join(found))
