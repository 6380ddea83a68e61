"""Keras 3's optimizers, learning-rate schedules, EMA and ReduceLROnPlateau, from optax pieces.

    tx = train_transform(OptimizerSpec('adamw', global_clipnorm=1.0), schedule(lr, spec))

`train_transform` builds the update of the trainable parameters (hhjax.training.optim
partitions it from the frozen ones) as Keras 3's optimizer would apply it, in this order:

    1. gradient accumulation  optax.MultiSteps: the mean of `gradient_accumulation_steps`
                              micro-batches' gradients, one update every that many steps
    2. clipping               of the (accumulated) gradient, one of: global_clipnorm
                              (optax.clip_by_global_norm), clipnorm (each array's gradient
                              to that norm, `keras_clip_by_norm`), clipvalue (each element
                              to [-v, v], optax.clip)
    3. the update rule        rmsprop / sgd / adam / adamw, times the learning rate
    4. weight decay           `w -= w * weight_decay * lr` (Keras applies it to the variable
                              before the update; the gradient is already computed, so adding
                              `-lr * wd * w` to the update is the same arithmetic), masked by
                              `weight_decay_exclude`
    5. EMA                    `keras_ema`: the moving average of the parameters after the update

Where Keras and optax differ, the Keras form is used: RMSprop's epsilon inside the square root
and no bias correction (`keras_rmsprop`), Adam's epsilon added to the uncorrected
`sqrt(v)` with the bias correction folded into the step size (`scale_by_keras_adam`; with
`amsgrad`, the running maximum of that uncorrected `v`, as Keras's), and SGD's
momentum accumulating `-lr * g` (the learning rate of each past step stays in the velocity, so
a schedule changes only new contributions) rather than optax's raw-gradient trace scaled by
the current rate.

Counting: the schedule, Adam's bias correction and the EMA's "first step" count optimizer
updates within the phase (one per `gradient_accumulation_steps` micro-batches), so that an
accumulated step is one step on the N-times-larger batch. Keras counts Adam's bias correction
and the EMA that way too, but evaluates a learning-rate *schedule* at its micro-batch counter
(`optimizer._iterations`): with both accumulation and a schedule, Keras's schedule runs N times
faster than ours. Keras updates the EMA at every micro-batch (on the ones that change nothing it
still averages the unchanged weights in); `keras_ema` does the same.

A rate that changes during a phase (a schedule, or ReduceLROnPlateau) goes through
`optax.inject_hyperparams`, so the rate of the last step is in the optimizer state
(`current_learning_rate`) and ReduceLROnPlateau can set it between epochs
(`set_learning_rate`, hhjax.training.plateau); a constant rate stays a constant of the compiled step, as before.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import re
from typing import Any, NamedTuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any

OPTIMIZER_NAMES = ('rmsprop', 'sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'exponential', 'piecewise')
ADAMW_WEIGHT_DECAY = 0.004          # keras.optimizers.AdamW's default


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
  """config.optimizer: which optimizer, with its Keras arguments (the learning rate is a
  phase's).

  `weight_decay` None means none, except for 'adamw', where it means Keras's default 0.004.
  `plateau` is set when ReduceLROnPlateau may change the rate between epochs.
  """
  name: str = 'rmsprop'
  rho: float = 0.9                    # rmsprop
  epsilon: float = 1e-7               # rmsprop, adam, adamw
  momentum: float = 0.0               # sgd
  nesterov: bool = False              # sgd
  beta_1: float = 0.9                 # adam, adamw
  beta_2: float = 0.999               # adam, adamw
  amsgrad: bool = False               # adam, adamw
  weight_decay: float | None = None
  weight_decay_exclude: tuple[str, ...] = ()
  global_clipnorm: float | None = None
  clipnorm: float | None = None       # at most one of the three clippings, as in Keras
  clipvalue: float | None = None
  gradient_accumulation_steps: int | None = None
  use_ema: bool = False
  ema_momentum: float = 0.99
  ema_overwrite_frequency: int | None = None
  plateau: bool = False

  @property
  def decay(self) -> float:
    """The weight decay applied (0: none)."""
    if self.weight_decay is None:
      return ADAMW_WEIGHT_DECAY if self.name == 'adamw' else 0.0
    return float(self.weight_decay)


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  """config.<phase>.schedule: the learning rate over the phase's optimizer steps.

  constant     the phase's learning_rate throughout
  cosine       keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps, alpha,
               warmup_target, warmup_steps): with a warmup_target, linear from learning_rate to
               warmup_target over warmup_steps, then cosine from warmup_target to
               alpha * warmup_target over decay_steps
  exponential  ExponentialDecay(learning_rate, decay_steps, decay_rate, staircase)
  piecewise    PiecewiseConstantDecay(boundaries, values): values[i] for steps in
               (boundaries[i-1], boundaries[i]]; the phase's learning_rate is not used
  """
  name: str = 'constant'
  decay_steps: int = 1000
  alpha: float = 0.0
  warmup_target: float | None = None
  warmup_steps: int = 0
  decay_rate: float = 0.96
  staircase: bool = False
  boundaries: tuple[int, ...] = ()
  values: tuple[float, ...] = ()

  @classmethod
  def from_mapping(cls, block: Mapping[str, Any] | None) -> 'ScheduleSpec':
    """From a config.<phase>.schedule block (None or absent fields: the defaults)."""
    if not block:
      return cls()
    d = cls()
    get = lambda k: block.get(k, getattr(d, k))
    target = get('warmup_target')
    return cls(name=str(get('name')), decay_steps=int(get('decay_steps')),
               alpha=float(get('alpha')),
               warmup_target=None if target is None else float(target),
               warmup_steps=int(get('warmup_steps')), decay_rate=float(get('decay_rate')),
               staircase=bool(get('staircase')),
               boundaries=tuple(int(b) for b in get('boundaries')),
               values=tuple(float(v) for v in get('values')))


def schedule(learning_rate: float, spec: ScheduleSpec) -> float | optax.Schedule:
  """The phase's rate: a float for 'constant', else a function of the optimizer step."""
  if spec.name == 'constant':
    return float(learning_rate)
  if spec.name == 'cosine':
    if spec.warmup_target is None:
      return optax.cosine_decay_schedule(learning_rate, spec.decay_steps, spec.alpha)
    target = float(spec.warmup_target)
    return optax.warmup_cosine_decay_schedule(
        init_value=learning_rate, peak_value=target, warmup_steps=spec.warmup_steps,
        decay_steps=spec.warmup_steps + spec.decay_steps, end_value=target * spec.alpha)
  if spec.name == 'exponential':
    return optax.exponential_decay(learning_rate, spec.decay_steps, spec.decay_rate,
                                   staircase=spec.staircase)
  if spec.name == 'piecewise':
    return piecewise_constant(spec.boundaries, spec.values)
  raise ValueError(f'Unknown schedule {spec.name!r}; expected one of {SCHEDULES}.')


def piecewise_constant(boundaries: Sequence[int], values: Sequence[float]) -> optax.Schedule:
  """Keras's PiecewiseConstantDecay: `values[i]` while `boundaries[i-1] < step <= boundaries[i]`.

  optax's piecewise_constant_schedule multiplies scales and switches at `step >= boundary`;
  Keras switches one step later and names the values themselves.
  """
  bounds = jnp.asarray(boundaries, jnp.int32)
  rates = jnp.asarray(values, jnp.float32)

  def rate(count):
    return rates[jnp.searchsorted(bounds, count, side='left')]

  return rate


def keras_rmsprop(learning_rate: float | optax.Schedule, rho: float = 0.9,
                  epsilon: float = 1e-7) -> optax.GradientTransformation:
  """RMSprop with the semantics of `keras.optimizers.RMSprop` (no momentum, not centered).

  Keras (3 and tf_keras 2) computes `v = rho * v + (1 - rho) * g**2` with `v` starting at 0 and
  `w -= lr * g / sqrt(v + epsilon)`: epsilon inside the square root, no bias correction. optax's
  `rmsprop` has the same form but defaults to eps=1e-8; here the pieces are spelt out so the
  Keras defaults (rho 0.9, epsilon 1e-7) are the ones used.
  """
  return optax.chain(
      optax.scale_by_rms(decay=rho, eps=epsilon, initial_scale=0.0, eps_in_sqrt=True,
                         bias_correction=False),
      optax.scale_by_learning_rate(learning_rate),
  )


class ScaleByKerasAdamState(NamedTuple):
  count: jax.Array     # updates done
  mu: PyTree
  nu: PyTree


class ScaleByKerasAmsgradState(NamedTuple):
  count: jax.Array     # updates done
  mu: PyTree
  nu: PyTree
  nu_max: PyTree       # the largest `nu` so far (Keras's velocity_hat)


def scale_by_keras_adam(beta_1: float = 0.9, beta_2: float = 0.999,
                        epsilon: float = 1e-7,
                        amsgrad: bool = False) -> optax.GradientTransformation:
  """Adam's direction as `keras.optimizers.Adam` computes it (before the learning rate).

  Keras: `m += (g - m) * (1 - b1)`, `v += (g**2 - v) * (1 - b2)`, and
  `w -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + epsilon)`: epsilon is added to the
  uncorrected `sqrt(v)`. optax's `scale_by_adam` adds it to the bias-corrected one
  (`m_hat / (sqrt(v_hat) + eps)`), which differs wherever `sqrt(v)` is near epsilon and has no
  option for the Keras form, hence this transform.

  `amsgrad` (Keras's `amsgrad=True`): the denominator uses `v_hat = max(v_hat, v)`, the largest
  uncorrected `v` so far (from 0), instead of `v`; optax's `scale_by_amsgrad` has the form of
  its Adam (`m_hat / (sqrt(max v_hat) + eps)`), not Keras's. Without `amsgrad` the state is the
  one of before (checkpoints keep their layout).
  """

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    if amsgrad:
      return ScaleByKerasAmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())
    return ScaleByKerasAdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda g, m: m + (g - m) * (1 - beta_1), updates, state.mu)
    nu = jax.tree.map(lambda g, v: v + (jnp.square(g) - v) * (1 - beta_2), updates, state.nu)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    alpha = jnp.sqrt(1 - jnp.power(jnp.float32(beta_2), t)) / (
        1 - jnp.power(jnp.float32(beta_1), t))
    if amsgrad:
      nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu)
      direction = jax.tree.map(lambda m, v: m * alpha / (jnp.sqrt(v) + epsilon), mu, nu_max)
      return direction, ScaleByKerasAmsgradState(count, mu, nu, nu_max)
    direction = jax.tree.map(lambda m, v: m * alpha / (jnp.sqrt(v) + epsilon), mu, nu)
    return direction, ScaleByKerasAdamState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def keras_sgd(learning_rate, momentum: float = 0.0,
              nesterov: bool = False) -> optax.GradientTransformation:
  """`keras.optimizers.SGD`: `m = momentum * m - lr * g`, then `w += m` or, with Nesterov,
  `w += momentum * m - lr * g`.

  The velocity holds `-lr * g` (the rate enters before the momentum), which optax's `trace`
  after `scale_by_learning_rate` gives: its Nesterov output `u + momentum * t` is Keras's.
  """
  if not momentum:
    return optax.scale_by_learning_rate(learning_rate)
  return optax.chain(optax.scale_by_learning_rate(learning_rate),
                     optax.trace(decay=momentum, nesterov=nesterov))


def keras_clip_by_norm(max_norm: float) -> optax.GradientTransformation:
  """Keras's `clipnorm`: each array's gradient `g` becomes `g * c / max(||g||, c)`.

  Keras clips every variable's gradient to the norm `c` on its own (`global_clipnorm` clips
  them together, `optax.clip_by_global_norm`); optax has no per-array norm clip
  (`clip_by_block_rms` bounds the root mean square, not the norm), hence this transform,
  in Keras's order of operations.
  """
  c = float(max_norm)

  def clip(updates, params=None):
    del params

    def one(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g)))
      return g * jnp.asarray(c, g.dtype) / jnp.maximum(norm, jnp.asarray(c, g.dtype))
    return jax.tree.map(one, updates)

  return optax.stateless(clip)


def clipping(spec: OptimizerSpec) -> optax.GradientTransformation | None:
  """The gradient clipping `spec` asks for, None for none; Keras allows one of the three."""
  given = {name: getattr(spec, name) for name in ('clipnorm', 'global_clipnorm', 'clipvalue')
           if getattr(spec, name) is not None}
  if len(given) > 1:
    raise ValueError(f'Only one of config.optimizer.clipnorm, global_clipnorm and clipvalue '
                     f'can be set (as in Keras); found {given}.')
  if spec.clipnorm is not None:
    return keras_clip_by_norm(float(spec.clipnorm))
  if spec.global_clipnorm is not None:
    return optax.clip_by_global_norm(float(spec.global_clipnorm))
  if spec.clipvalue is not None:
    return optax.clip(float(spec.clipvalue))
  return None


def decay_mask(params: PyTree, exclude: Sequence[str]) -> PyTree:
  """True for each parameter that weight decay applies to: those whose '/'-joined path no
  `exclude` regex matches (re.search). Leaves that are not arrays (optax's MaskedNode for a
  partition's other parameters) get False."""
  patterns = [re.compile(p) for p in exclude]

  def decayed(path, leaf):
    if isinstance(leaf, optax.MaskedNode):
      return False
    name = '/'.join(str(k) for k in path)
    return not any(p.search(name) for p in patterns)

  return traverse_util.path_aware_map(decayed, params)


def _update_rule(spec: OptimizerSpec) -> Callable[..., optax.GradientTransformation]:
  """learning_rate -> clipping, the rule and weight decay, as one transformation."""

  def rule(learning_rate):
    parts = []
    clip = clipping(spec)
    if clip is not None:
      parts.append(clip)
    if spec.name == 'rmsprop':
      parts.append(keras_rmsprop(learning_rate, spec.rho, spec.epsilon))
    elif spec.name == 'sgd':
      parts.append(keras_sgd(learning_rate, spec.momentum, spec.nesterov))
    elif spec.name in ('adam', 'adamw'):
      parts += [scale_by_keras_adam(spec.beta_1, spec.beta_2, spec.epsilon, spec.amsgrad),
                optax.scale_by_learning_rate(learning_rate)]
    else:
      raise ValueError(f'config.optimizer.name must be one of {OPTIMIZER_NAMES}, got '
                       f'{spec.name!r}.')
    if spec.decay:
      exclude = tuple(spec.weight_decay_exclude)
      parts.append(optax.add_decayed_weights(-spec.decay * learning_rate,
                                             mask=lambda p: decay_mask(p, exclude)))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)

  return rule


def scale_by_path(factors: Mapping[tuple[str, ...], float]) -> optax.GradientTransformation:
  """Each leaf's update times its factor in `factors` ({parameter path: factor}; absent: 1).

  Looked up by path, so it works on the masked trees inside an `optax.partition` too.
  """
  def scale(updates, params=None):
    del params

    def one(path, u):
      factor = factors.get(tuple(str(getattr(k, 'key', k)) for k in path), 1.0)
      return u if factor == 1.0 else u * factor
    return jax.tree_util.tree_map_with_path(one, updates)

  return optax.stateless(scale)


def train_transform(spec: OptimizerSpec, learning_rate: float | optax.Schedule,
                    multipliers: Mapping[tuple[str, ...], float] | None = None
                    ) -> optax.GradientTransformation:
  """The update of the trainable parameters, as Keras 3's optimizer `spec` makes it.

  `multipliers` ({parameter path: factor}) are per-layer learning rates: they scale the rule's
  update (the learning rate times its direction, weight decay included), before gradient
  accumulation and the EMA see it, so that those work on the updates of the scaled rates.
  With only a constant rate and none of the options, this is the transformation of before
  (RMSprop's checkpoints keep their layout).
  """
  rule = _update_rule(spec)
  if multipliers:
    plain, factors = rule, dict(multipliers)

    def rule(learning_rate):   # pylint: disable=function-redefined
      return optax.chain(plain(learning_rate), scale_by_path(factors))
  if callable(learning_rate) or spec.plateau:
    tx = optax.inject_hyperparams(rule)(learning_rate=learning_rate)
  else:
    tx = rule(float(learning_rate))
  if spec.gradient_accumulation_steps:
    tx = optax.MultiSteps(tx, int(spec.gradient_accumulation_steps)).gradient_transformation()
  if spec.use_ema:
    tx = optax.chain(tx, keras_ema(spec.ema_momentum, spec.ema_overwrite_frequency,
                                   spec.gradient_accumulation_steps or 1))
  return tx


class KerasEmaState(NamedTuple):
  """The moving average of the trainable parameters (`ema`) and the micro-batches seen."""
  count: jax.Array
  ema: PyTree


def keras_ema(momentum: float = 0.99, overwrite_frequency: int | None = None,
              accumulation_steps: int = 1) -> optax.GradientTransformation:
  """Keras's `use_ema`: `ema = momentum * ema + (1 - momentum) * w` after every update.

  As Keras: the average starts as a copy of the weights, the first optimizer step takes the
  weights as they are (momentum 0 while `iterations == 0`), it is updated at every call, and
  with `overwrite_frequency` the weights are replaced by the average after every that many
  optimizer steps (`(iterations + 1) % frequency == 0`, `iterations` counting optimizer
  updates, i.e. micro-batches // accumulation_steps). optax's `ema` averages updates, not
  parameters, and has no overwrite; this transform sits last in the chain, where
  `params + updates` are the new weights.
  """

  def init(params):
    return KerasEmaState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.asarray, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError(optax.NO_PARAMS_MSG)
    iterations = state.count // accumulation_steps
    m = jnp.where(iterations != 0, jnp.float32(momentum), jnp.float32(0))
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    ema = jax.tree.map(lambda a, w: m * a + (1 - m) * w, state.ema, new)
    if overwrite_frequency:
      overwrite = (iterations + 1) % overwrite_frequency == 0
      updates = jax.tree.map(lambda u, a, p: jnp.where(overwrite, a - p, u), updates, ema,
                             params)
    return updates, KerasEmaState(optax.safe_increment(state.count), ema)

  return optax.GradientTransformation(init, update)


def _is_ema(x) -> bool:
  return isinstance(x, KerasEmaState)


def ema_params(opt_state: PyTree, params: Mapping[str, Any]) -> dict | None:
  """`params` with each parameter that an EMA tracks replaced by its average; None when the
  optimizer keeps no EMA. The frozen parameters (no average) are returned as they are."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_ema) if _is_ema(s)]
  if not states:
    return None
  flat = dict(traverse_util.flatten_dict(params))
  for s in states:
    for path, value in traverse_util.flatten_dict(s.ema).items():
      if not isinstance(value, optax.MaskedNode) and path in flat:
        flat[path] = value
  return traverse_util.unflatten_dict(flat)


def _is_rate(path) -> bool:
  return bool(path) and getattr(path[-1], 'key', None) == 'learning_rate'


def current_learning_rate(opt_state: PyTree) -> float | None:
  """The rate of the last update (the next one, after ReduceLROnPlateau set it), or None when
  the rate is a constant of the optimizer (not in its state)."""
  rates = [v for path, v in jax.tree_util.tree_leaves_with_path(opt_state) if _is_rate(path)]
  return float(np.asarray(jax.device_get(rates[0]))) if rates else None


def set_learning_rate(opt_state: PyTree, rate: float) -> PyTree:
  """`opt_state` with the injected learning rate set to `rate` (float32, as Keras's variable)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.asarray(rate, v.dtype) if _is_rate(path) else v, opt_state)
