"""Which faster lowerings the model uses: the config.speed switches, resolved per backend.

The rewrites themselves live in `fast_convs` and `fast_pools`; `ConvBN` and the pools in
`inception` read a `Lowering` to pick them. GPU and TPU compilers handle 'VALID' and 1x1
convolutions well, so 'auto' turns the CPU rewrites on for the CPU backend only.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hhjax import errors

SWITCH_VALUES = ('auto', 'on', 'off')
_ON = ('on', 'true', 'yes', '1')
_OFF = ('off', 'false', 'no', '0')


def parse_switch(value: Any, name: str = 'switch') -> str:
  """A config switch ('auto', 'on'/'off', True/False, None) as 'auto', 'on' or 'off'.

  The one parser for every on/off/auto field (config.speed.*): None means 'auto'.
  """
  if isinstance(value, (bool, np.bool_)):
    return 'on' if value else 'off'
  if value is None:
    return 'auto'
  if isinstance(value, str):
    lower = value.lower()
    if lower == 'auto':
      return 'auto'
    if lower in _ON:
      return 'on'
    if lower in _OFF:
      return 'off'
  raise errors.ConfigError(f'{name} must be "auto", "on", "off", True or False; found {value!r}.')


def resolve_switch(value: Any, *, name: str = 'switch', backend: str | None = None) -> bool:
  """Turns a config switch ('auto', 'on'/'off', True/False, None) into a bool.

  'auto' (and None) means on for the CPU backend and off elsewhere: the CPU rewrites
  help XLA:CPU and are unmeasured elsewhere.

  Args:
    value: the config value.
    name: the config field, for the error message.
    backend: the JAX backend name; defaults to `jax.default_backend()`.

  Returns:
    Whether the rewrite is on.
  """
  mode = parse_switch(value, name)
  if mode == 'auto':
    return (backend or jax.default_backend()) == 'cpu'
  return mode == 'on'


@dataclasses.dataclass(frozen=True)
class Lowering:
  """Which rewrites the model applies (all off: the plain Keras-order computation).

  Attributes:
    fast_convs: stride-1 'VALID' convolutions as pad + crop, 1x1 stride-1 convolutions as
      matmuls (forward bit-identical), and convolutions of the few-channel image as one
      matmul over patches (equal up to float32 summation order, like every gradient).
    fold_bn: an inference-mode BatchNorm (frozen layers, or fine-tuning with
      train_bn=False) folded into its convolution's kernel and a bias. Float32 rounding
      differs slightly (about 1e-6 relative).
    merge_1x1: the 1x1 convolutions of a block that read the block's input run as one
      convolution. Same arithmetic per output channel.
    fast_pools: the 3x3 pools and their gradients as elementwise maxima / sums of shifted
      slices instead of XLA:CPU's slow reduce_window. Max pool forward bit-identical, its
      gradient to the same first maximum of each window; average pool and the gradients
      equal up to float32 summation order.
  """
  fast_convs: bool = False
  fold_bn: bool = False
  merge_1x1: bool = False
  fast_pools: bool = False

  @classmethod
  def from_config(cls, speed: Mapping[str, Any] | None,
                  backend: str | None = None) -> 'Lowering':
    """Resolves `config.speed` ('auto' = on for the CPU backend); absent fields are off."""
    speed = speed or {}
    return cls(**{f.name: resolve_switch(speed[f.name], name=f'config.speed.{f.name}',
                                         backend=backend)
                  for f in dataclasses.fields(cls) if f.name in speed})


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str | None) -> Any:
  """config.speed.compute_dtype -> a dtype; parameters stay float32 whatever is chosen."""
  if name is None:
    return jnp.float32
  if name not in COMPUTE_DTYPES:
    raise errors.ConfigError(f'config.speed.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}; '
                     f'found {name!r}.')
  return COMPUTE_DTYPES[name]
