"""Optimizers and freezing: Keras's optimizers in optax (keras_optim), labels from path patterns.

Freezing is data, not code: a phase lists `(regex, label)` rules over the '/'-joined parameter
paths (`backbone/mixed6/branch7x7_1/conv/kernel`, `head/hidden/kernel`); the first rule that
matches a path gives its label, and every parameter must be matched. Labels are `'train'`,
`'freeze'`, or a learning-rate multiplier: a number > 0 trains the parameter at the phase's
rate times that number (big_vision's `lr_mults`). The optimizer is an `optax.partition` over
'train'/'freeze'; the train step also uses the labels to differentiate only the trainable
parameters (see `split` / `merge`). Multipliers, and the layer decay of timm and BEiT
(`layer_decay_factors`), scale the optimizer's updates leaf by leaf
(`keras_optim.scale_by_path`).
"""

from collections.abc import Callable, Mapping, Sequence
import math
import numbers
import re
from typing import Any

from flax import traverse_util
import optax

from hhjax.training import keras_optim

TRAIN = 'train'
FREEZE = 'freeze'
LABELS = (TRAIN, FREEZE)

# A rule's label: 'train', 'freeze', or a learning-rate multiplier (a number > 0).
Label = str | float
Rules = Sequence[tuple[str, Label]]


# config.optimizer and config.<phase>.schedule, and Keras's RMSprop: see keras_optim.
OptimizerSpec = keras_optim.OptimizerSpec
ScheduleSpec = keras_optim.ScheduleSpec
keras_rmsprop = keras_optim.keras_rmsprop


def path_str(path: tuple[str, ...]) -> str:
  return '/'.join(str(k) for k in path)


def is_multiplier(label: Any) -> bool:
  """A rule label that is a learning-rate multiplier: a finite number > 0."""
  return (isinstance(label, numbers.Real) and not isinstance(label, bool)
          and math.isfinite(label) and label > 0)


def rule_label(label: Any) -> Label:
  """A rule's label as the rules hold it: a multiplier as a float, anything else as text."""
  return float(label) if is_multiplier(label) else str(label)


def _matched(params: Mapping[str, Any], rules: Rules) -> dict[tuple[str, ...], Label]:
  """Each parameter's path -> the label of the first rule whose regex matches it."""
  compiled = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'A freezing rule is a (regex, label) pair; found {rule!r}.')
    pattern, label = rule
    if label not in LABELS and not is_multiplier(label):
      raise ValueError(f'Freezing rule {tuple(rule)!r}: label must be one of {LABELS} or a '
                       f'learning-rate multiplier > 0, found {label!r}.')
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
  return labels


def param_labels(params: Mapping[str, Any], rules: Rules) -> dict[str, Any]:
  """Labels every parameter 'train' or 'freeze' by the first rule whose regex matches its path.

  Args:
    params: nested dict of parameters, e.g. `{'backbone': ..., 'head': ...}`.
    rules: `(regex, label)` pairs, tried in order with `re.search` on the '/'-joined path; a
      multiplier label trains (its factor is `lr_multipliers`').

  Returns:
    A nested dict with the structure of `params` and 'train' or 'freeze' at each leaf.

  Raises:
    ValueError: a rule has an unknown label or a bad regex, or some parameters match no rule.
  """
  return traverse_util.unflatten_dict(
      {path: FREEZE if label == FREEZE else TRAIN
       for path, label in _matched(params, rules).items()})


def layer_decay_factors(blocks: Sequence[str], decay: float) -> dict[str, float]:
  """timm's / BEiT's layer-wise decay: block -> its learning-rate factor.

  The layers are the backbone's `blocks` in order (stem first, the block at the cut last),
  then the head; layer i of L gets `decay ** (L - 1 - i)`. The head trains at the phase's rate
  (factor 1), the block at the cut at `decay`, the one before it at `decay ** 2`, and so on:
  timm's `param_groups_layer_decay`, whose last layer is the head.
  """
  n = len(blocks)
  return {block: float(decay) ** (n - i) for i, block in enumerate(blocks)}


def lr_multipliers(params: Mapping[str, Any], rules: Rules, blocks: Sequence[str] = (),
                   layer_decay: float = 1.0) -> dict | None:
  """Each parameter's learning-rate factor, or None when every trainable one's is 1.

  The factor is the multiplier of the rule that labels the parameter (1 for 'train'), times its
  block's layer-decay factor (`layer_decay_factors`; parameters outside the backbone's blocks,
  the head's, get 1). Frozen parameters get 1: they are not updated at all.
  """
  decay = layer_decay_factors(blocks, layer_decay) if layer_decay != 1.0 else {}
  factors = {}
  for path, label in _matched(params, rules).items():
    factor = float(label) if is_multiplier(label) else 1.0
    if path[0] == 'backbone' and len(path) > 1:
      factor *= decay.get(str(path[1]), 1.0)
    factors[path] = 1.0 if label == FREEZE else factor
  if all(f == 1.0 for f in factors.values()):
    return None
  return traverse_util.unflatten_dict(factors)


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
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    name: keras_optim.train_transform for name in keras_optim.OPTIMIZER_NAMES}


def make_optimizer(labels: Mapping[str, Any], learning_rate: float,
                   spec: OptimizerSpec = OptimizerSpec(),
                   schedule: ScheduleSpec = ScheduleSpec(),
                   multipliers: Mapping[str, Any] | None = None) -> optax.GradientTransformation:
  """`spec`'s optimizer on the parameters labelled 'train'; 'freeze' parameters get zero updates.

  `learning_rate` is the phase's rate, which `schedule` varies over its steps; `multipliers`
  (a tree of factors, from `lr_multipliers`) scale it per parameter: one optimizer, one state,
  one global norm. The frozen part holds no optimizer state (optax masks it out).
  """
  if spec.name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name must be one of {tuple(OPTIMIZERS)}, got '
                     f'{spec.name!r}.')
  rate = keras_optim.schedule(learning_rate, schedule)
  factors = None if multipliers is None else {
      tuple(str(k) for k in path): f
      for path, f in traverse_util.flatten_dict(multipliers).items() if f != 1.0}
  train = (OPTIMIZERS[spec.name](spec, rate) if not factors else
           OPTIMIZERS[spec.name](spec, rate, factors))
  return optax.partition({TRAIN: train, FREEZE: optax.set_to_zero()}, labels)


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
