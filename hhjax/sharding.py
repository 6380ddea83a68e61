"""Device mesh and shardings: data parallelism over every device of every process.

One mesh axis, 'data'. Batches are split along it; parameters and optimizer state are
replicated. `jax.jit` with these shardings does the rest (no pmap).
"""

from collections.abc import Mapping
import os

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from hhjax import compat
from hhjax import errors
from hhjax import peers

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when this process is one of several.

  Recognises a launch by hand (JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID in each process), SLURM and Open MPI launches with more than one task, and
  Cloud TPU VMs (a slice of one host or several), where `jax.distributed.initialize()` finds
  the coordinator by itself. Then watches the other processes (hhjax.peers): a lost one stops
  this one within HHJAX_PEER_TIMEOUT_S seconds; JAX's own heartbeat timeout, twice that, is the
  backstop.

  On CPU, JAX 0.10 runs cross-process collectives over Gloo (TCP) by default
  (jax_cpu_collectives_implementation='gloo'), so nothing needs selecting here.
  """
  env = os.environ
  several = (
      'JAX_COORDINATOR_ADDRESS' in env
      or int(env.get('JAX_NUM_PROCESSES', '1')) > 1
      or int(env.get('SLURM_NTASKS', '1')) > 1
      or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
      or len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1
      # A Cloud TPU VM lists its slice's hosts in the metadata server, not always in the
      # environment: JAX reads them there. With one host it is a run of one process.
      or compat.on_cloud_tpu_vm())
  if several:
    # JAX reads JAX_COORDINATOR_ADDRESS itself, but not the process count and id.
    kwargs = {}
    if 'JAX_NUM_PROCESSES' in env:
      kwargs['num_processes'] = int(env['JAX_NUM_PROCESSES'])
    if 'JAX_PROCESS_ID' in env:
      kwargs['process_id'] = int(env['JAX_PROCESS_ID'])
    timeout = peers.timeout_s()
    # Backstops to hhjax.peers: JAX aborts a process whose peers stop beating, and bounds the
    # wait for all processes at exit (its defaults: 100 and 300 s).
    jax.distributed.initialize(heartbeat_timeout_seconds=int(2 * timeout + 1),
                               shutdown_timeout_seconds=int(2 * timeout + 1), **kwargs)
    peers.start()
    logging.info('Process %d of %d, %d local / %d global devices.', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh() -> Mesh:
  """A 1-D mesh over all devices, axis 'data'."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, name: str = 'config.batch_size') -> None:
  """A global batch must split evenly over devices and processes."""
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch <= 0 or global_batch % devices:
    raise errors.ConfigError(
        f'{name}={global_batch} does not divide by the {devices} devices in use: each device '
        f'takes an equal share of the batch. Use a multiple of {devices}, e.g. '
        f'{name}={max(devices, global_batch // devices * devices)}.')
  if global_batch % processes:
    raise errors.ConfigError(
        f'{name}={global_batch} does not divide by the {processes} processes: each process '
        f'feeds an equal share of the batch. Use a multiple of {processes}.')


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's share of a batch into global arrays sharded along 'data'."""
  sharding = data_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
