"""Optimizers and freezing: Keras's optimizers in optax (keras_optim), labels from path patterns.

Freezing is data, not code: a phase lists `(regex, label)` rules over the '/'-joined parameter
paths (`backbone/mixed6/branch7x7_1/conv/kernel`, `head/hidden/kernel`); the first rule that
matches a path gives its label, and every parameter must be matched. Labels are `'train'` and
`'freeze'`. The optimizer is an `optax.partition` over those labels; the train step also uses
the labels to differentiate only the trainable parameters (see `split` / `merge`).
"""

from collections.abc import Callable, Mapping, Sequence
import re
from typing import Any

from flax import traverse_util
import optax

from hhjax.training import keras_optim

TRAIN = 'train'
FREEZE = 'freeze'
LABELS = (TRAIN, FREEZE)

Rules = Sequence[tuple[str, str]]


# config.optimizer and config.<phase>.schedule, and Keras's RMSprop: see keras_optim.
OptimizerSpec = keras_optim.OptimizerSpec
ScheduleSpec = keras_optim.ScheduleSpec
keras_rmsprop = keras_optim.keras_rmsprop


def path_str(path: tuple[str, ...]) -> str:
  return '/'.join(str(k) for k in path)


def param_labels(params: Mapping[str, Any], rules: Rules) -> dict[str, Any]:
  """Labels every parameter with the first rule whose regex matches its path.

  Args:
    params: nested dict of parameters, e.g. `{'backbone': ..., 'head': ...}`.
    rules: `(regex, label)` pairs, tried in order with `re.search` on the '/'-joined path.

  Returns:
    A nested dict with the structure of `params` and a label string at each leaf.

  Raises:
    ValueError: a rule has an unknown label or a bad regex, or some parameters match no rule.
  """
  compiled = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'A freezing rule is a (regex, label) pair; found {rule!r}.')
    pattern, label = rule
    if label not in LABELS:
      raise ValueError(f'Freezing rule {tuple(rule)!r}: label must be one of {LABELS}, '
                       f'found {label!r}.')
    try:
      compiled.append((re.compile(pattern), label))
    except re.error as e:
      raise ValueError(f'Freezing rule {tuple(rule)!r}: bad regex ({e}).') from e
  flat = traverse_util.flatten_dict(params)
  labels, uncovered = {}, []
  for path in flat:
    name = path_str(path)
    label = next((lab for regex, lab in compiled if regex.search(name)), None)
    if label is None:
      uncovered.append(name)
    labels[path] = label
  if uncovered:
    shown = '\n  '.join(uncovered[:10])
    more = f'\n  ... and {len(uncovered) - 10} more' if len(uncovered) > 10 else ''
    raise ValueError(
        f'{len(uncovered)} parameters match no freezing rule; every parameter needs a label. '
        f'Rules: {[tuple(r) for r in rules]}. Uncovered:\n  {shown}{more}\n'
        "Add a catch-all rule such as ('^backbone/', 'freeze').")
  return traverse_util.unflatten_dict(labels)


def finetune_rules(unfreeze_from: str, endpoints: Sequence[str]) -> list[tuple[str, str]]:
  """Rules that train the head and the backbone blocks from `unfreeze_from` on.

  Args:
    unfreeze_from: 'stem' (the whole backbone) or a block name in `endpoints`.
    endpoints: the backbone's blocks in order, up to its cut (e.g. 'mixed0' ... 'mixed7').
  """
  if unfreeze_from == 'stem':
    return [('^head/', TRAIN), ('^backbone/', TRAIN)]
  if unfreeze_from not in endpoints:
    raise ValueError(
        f'config.finetune.unfreeze_from={unfreeze_from!r} is not a block of this backbone; '
        f"choose 'stem' or one of {list(endpoints)} (the backbone is cut at {endpoints[-1]!r}).")
  opened = endpoints[list(endpoints).index(unfreeze_from):]
  return [('^head/', TRAIN), (f"^backbone/({'|'.join(opened)})/", TRAIN),
          ('^backbone/', FREEZE)]


# config.optimizer.name -> the optimizer it builds (Keras 3's update rules, keras_optim); RMSprop
# is the one the recipe uses. The only place a name is looked up, so an unknown name can only
# be an error.
OPTIMIZERS: dict[str, Callable[[OptimizerSpec, float | optax.Schedule],
                               optax.GradientTransformation]] = {
    name: keras_optim.train_transform for name in keras_optim.OPTIMIZER_NAMES}


def make_optimizer(labels: Mapping[str, Any], learning_rate: float,
                   spec: OptimizerSpec = OptimizerSpec(),
                   schedule: ScheduleSpec = ScheduleSpec()) -> optax.GradientTransformation:
  """`spec`'s optimizer on the parameters labelled 'train'; 'freeze' parameters get zero updates.

  `learning_rate` is the phase's rate, which `schedule` varies over its steps. The frozen part
  holds no optimizer state (optax masks it out).
  """
  if spec.name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name must be one of {tuple(OPTIMIZERS)}, got '
                     f'{spec.name!r}.')
  rate = keras_optim.schedule(learning_rate, schedule)
  return optax.partition(
      {TRAIN: OPTIMIZERS[spec.name](spec, rate), FREEZE: optax.set_to_zero()}, labels)


def inference_params(state: Mapping[str, Any]) -> dict:
  """The parameters to evaluate, predict and export with: the EMA of the trainable ones when
  config.optimizer.use_ema keeps one (the frozen ones as they are), else `state['params']`."""
  averaged = keras_optim.ema_params(state.get('opt_state'), state['params'])
  return state['params'] if averaged is None else averaged


def split(tree: Mapping[str, Any], labels: Mapping[str, Any]) -> tuple[dict, dict]:
  """Splits a tree shaped like `labels` into (trainable, frozen) nested dicts.

  Each half keeps only its own leaves, so `jax.grad` with respect to the trainable half builds no
  backward pass for the frozen one.
  """
  flat = traverse_util.flatten_dict(tree)
  flat_labels = traverse_util.flatten_dict(labels)
  trainable = {k: v for k, v in flat.items() if flat_labels[k] == TRAIN}
  frozen = {k: v for k, v in flat.items() if flat_labels[k] != TRAIN}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(*trees: Mapping[str, Any]) -> dict:
  """Inverse of `split`: the union of nested dicts with disjoint leaves."""
  flat = {}
  for tree in trees:
    flat.update(traverse_util.flatten_dict(tree))
  return traverse_util.unflatten_dict(flat)


def count(tree: Mapping[str, Any]) -> int:
  """Number of scalars in a tree of arrays."""
  return sum(int(v.size) for v in traverse_util.flatten_dict(tree).values())
