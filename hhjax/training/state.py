"""The training state: built at step 0, or restored from a checkpoint into the same shape.

Precedence, as big_vision writes it down: a checkpoint in the workdir, then
config.model.pretrained, then random init (`initialise` / `restore`). The state's fields are
described in `hhjax.training.steps`.
"""

from collections.abc import Mapping, Sequence
import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from hhjax import checkpointing
from hhjax import errors
from hhjax import sharding
from hhjax import trees
from hhjax import workdir as workdir_lib
from hhjax.training import phases as phases_lib
from hhjax.training import steps
from hhjax.weights import pretrained

PyTree = Any


def _dummy_images(config: ml_collections.ConfigDict, batch: int = 1) -> jax.Array:
  size = int(config.data.image_size)
  return jnp.zeros((batch, size, size, 3), jnp.float32)


def init_variables(model, config: ml_collections.ConfigDict) -> PyTree:
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
      'metrics': steps.zero_metrics(),
      'nonfinite_step': jnp.full((), -1, jnp.int32),
  }


def replicate(tree: PyTree, repl: jax.sharding.Sharding) -> PyTree:
  """`tree` replicated on every device, through host memory.

  In a run of several processes, `jax.device_put` of an array that sits on one local device
  builds a global array whose shards orbax cannot save; from numpy it builds a proper one.
  """
  return jax.device_put(jax.device_get(tree), repl)


def abstract_variables(model, config: ml_collections.ConfigDict) -> PyTree:
  """Shapes and dtypes of the model's variables, without computing them."""
  return jax.eval_shape(functools.partial(init_variables, model, config))


def abstract_state(model, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh) -> PyTree:
  """The state's shapes, dtypes and (replicated) shardings, for a restore."""
  variables = abstract_variables(model, config)
  state = jax.eval_shape(lambda v: build_state(v, tx, config.seed), variables)
  repl = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)


def pretrained_spec(config: ml_collections.ConfigDict) -> str | None:
  """config.model.pretrained, with the command line's `None` (a string there) meaning none."""
  spec = config.model.get('pretrained')
  if spec is None or str(spec).strip().lower() in ('', 'none', 'null'):
    return None
  return str(spec)


def initialise(model, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh) -> PyTree:
  """The state at step 0: pretrained backbone if the config names one, else random init."""
  repl = sharding.replicated(mesh)
  variables = jax.jit(functools.partial(init_variables, model, config), out_shardings=repl)()
  spec = pretrained_spec(config)
  if spec:
    variables = replicate(pretrained.load_backbone(variables, spec, config.model.cut), repl)
  else:
    logging.info('No pretrained weights (config.model.pretrained=None): random init.')
  return jax.jit(lambda v: build_state(v, tx, config.seed), out_shardings=repl)(variables)


def from_variables(variables: PyTree, tx: optax.GradientTransformation,
                   config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> PyTree:
  """The state at step 0 of a phase with optimizer `tx`, from given variables (numpy or jax)."""
  repl = sharding.replicated(mesh)
  variables = replicate({'params': variables['params'],
                         'batch_stats': variables['batch_stats']}, repl)
  return jax.jit(lambda v: build_state(v, tx, config.seed), out_shardings=repl)(variables)


def _model_hint(saved_config: Mapping[str, Any] | None,
                config: ml_collections.ConfigDict) -> str:
  """The model fields that differ from those the checkpoint was written with, as text."""
  if not saved_config:
    return ''
  diffs = [d for d in workdir_lib.config_differences(saved_config.get('model', {}),
                                                     workdir_lib.config_dict(config.model))
           if not d.startswith('pretrained')]
  saved_size = saved_config.get('data', {}).get('image_size')
  if saved_size != config.data.image_size:
    diffs.append(f'data.image_size: checkpoint {saved_size}, now {config.data.image_size}')
  if not diffs:
    return ''
  return 'The checkpoint was written with another model config:\n  ' + '\n  '.join(
      f'config.{d}' if d.startswith('data.') else f'config.model.{d}' for d in diffs) + '\n'


def saved_phase(ckpts: checkpointing.Checkpoints, step: int,
                phases: Sequence[phases_lib.Phase]) -> phases_lib.Phase:
  """The phase the checkpoint at `step` was written in; an error if the config lacks it."""
  name = ckpts.info(step).get('phase')
  names = [p.name for p in phases]
  if name not in names:
    raise errors.CheckpointMismatchError(
        f'The checkpoint at step {step} was written in phase {name!r}, which the current '
        f'config does not have (phases: {names}).')
  return phases[names.index(name)]


def restore(ckpts: checkpointing.Checkpoints, step: int, model,
            config: ml_collections.ConfigDict, setup: phases_lib.PhaseSetup,
            mesh: jax.sharding.Mesh) -> tuple[PyTree, dict[str, Any]]:
  """Restores the full state saved at `step` (written in `setup.phase`).

  Returns:
    (state, the checkpoint's metadata).
  """
  info = ckpts.info(step)
  hint = _model_hint(info.get('config'), config)
  state = ckpts.restore(step, abstract_state(model, config, setup.tx, mesh), hint)
  return state, info


def restore_variables(ckpts: checkpointing.Checkpoints, step: int, model,
                      config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> PyTree:
  """The variables (`params`, `batch_stats`) saved at `step`, checked against the model's.

  For a checkpoint at step 0 (what --mode=import_keras writes): nothing has trained yet, so its
  optimizer state is a fresh one of whichever phase it names and is not read; the weights alone
  start any config's first phase.
  """
  arrays = ckpts.restore_arrays(step)
  variables = {'params': arrays['params'], 'batch_stats': arrays.get('batch_stats') or {}}
  problem = trees.describe_differences(
      trees.leaf_specs(variables), trees.leaf_specs(abstract_variables(model, config)),
      got_name='the checkpoint', want_name='the config')
  if problem:
    hint = _model_hint(ckpts.info(step).get('config'), config)
    raise errors.CheckpointMismatchError(
        f'The checkpoint at {ckpts.directory}/{step} does not fit the current config.\n'
        f'{hint}{problem}\nUse the config the checkpoint was written with, or another --workdir.')
  return replicate(variables, sharding.replicated(mesh))
