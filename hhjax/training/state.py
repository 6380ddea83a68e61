"""The training state: built at step 0, or restored from a checkpoint into the same shape.

Precedence, as big_vision writes it down: a checkpoint in the workdir, then
config.model.pretrained, then random init (`hhjax.training.restore`, then `initialise`). The
state's fields are described in `hhjax.training.steps`.
"""

import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import optax

from hhjax import sharding
from hhjax.training import steps
from hhjax.weights import pretrained

PyTree = Any


def _dummy_images(image_size: int, batch: int = 1) -> jax.Array:
  return jnp.zeros((batch, image_size, image_size, 3), jnp.float32)


def init_variables(model, image_size: int, seed: int) -> PyTree:
  """Random initial `{'params', 'batch_stats'}` (Keras initialisers) for images of `image_size`.

  The init key uses the 'rbg' generator (XLA's RngBitGenerator): on CPU it compiles about
  3x faster than threefry for the hundreds of parameter arrays, and the output is replicated,
  so every device computes the same values. Dropout keeps threefry, whose bits do not depend
  on how the batch is sharded.
  """
  init_rng = jax.random.key(seed, impl='rbg')
  variables = model.init({'params': init_rng}, _dummy_images(int(image_size)), train=False)
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


def abstract_variables(model, image_size: int) -> PyTree:
  """Shapes and dtypes of the model's variables, without computing them."""
  return jax.eval_shape(functools.partial(init_variables, model, image_size, 0))


def abstract_state(model, image_size: int, seed: int, tx: optax.GradientTransformation,
                   mesh: jax.sharding.Mesh) -> PyTree:
  """The state's shapes, dtypes and (replicated) shardings, for a restore."""
  variables = abstract_variables(model, image_size)
  state = jax.eval_shape(lambda v: build_state(v, tx, seed), variables)
  repl = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)


def initialise(model, image_size: int, seed: int, tx: optax.GradientTransformation,
               mesh: jax.sharding.Mesh, *, pretrained_weights: str | None, cut: str) -> PyTree:
  """The state at step 0: the backbone from `pretrained_weights` (what config.model.pretrained
  names, up to `cut`) if given, else random init."""
  repl = sharding.replicated(mesh)
  variables = jax.jit(functools.partial(init_variables, model, image_size, seed),
                      out_shardings=repl)()
  if pretrained_weights:
    variables = replicate(pretrained.load_backbone(
        variables, pretrained_weights, cut, backbone=getattr(model, 'backbone', None)), repl)
  else:
    logging.info('No pretrained weights (config.model.pretrained=None): random init.')
  return jax.jit(lambda v: build_state(v, tx, seed), out_shardings=repl)(variables)


def from_variables(variables: PyTree, tx: optax.GradientTransformation, seed: int,
                   mesh: jax.sharding.Mesh) -> PyTree:
  """The state at step 0 of a phase with optimizer `tx`, from given variables (numpy or jax)."""
  repl = sharding.replicated(mesh)
  variables = replicate({'params': variables['params'],
                         'batch_stats': variables['batch_stats']}, repl)
  return jax.jit(lambda v: build_state(v, tx, seed), out_shardings=repl)(variables)
