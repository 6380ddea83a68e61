"""One device and eight (fake CPU) devices train to the same parameters, with the augmentation
applied on the devices, inside the sharded train step."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter: XLA_FLAGS must be set before JAX starts.
SCRIPT = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from configs import smoke
from hhjax import checkpointing
from hhjax import errors
from hhjax import train

workdir, out = sys.argv[2], sys.argv[3]
config = smoke.get_config()
config.model.cut = 'mixed0'
config.model.hidden = 8
config.steps_per_epoch = 3
config.warmup.epochs = 0                 # fine-tuning only: backward pass and BatchNorm updates
config.finetune.epochs = 1
config.finetune.learning_rate = 1e-3
config.finetune.unfreeze_from = 'mixed0'
config.finetune.train_bn = True          # batch statistics over the global, sharded batch
config.data.fake.num_eval_examples = 8
config.data.augment.on = 'device'        # each device augments its shard of the batch

errors = []
if jax.device_count() > 1:
  config.batch_size = 12
  try:
    train.train_and_evaluate(config, workdir + '_bad')
  except ValueError as e:
    errors.append(str(e))
config.batch_size = 8
result = train.train_and_evaluate(config, workdir)
with checkpointing.Checkpoints(workdir + '/checkpoints', read_only=True) as ckpts:
  state = ckpts.restore_arrays(ckpts.latest_step())
leaves = jax.tree_util.tree_flatten_with_path(
    {'params': state['params'], 'batch_stats': state['batch_stats']})[0]
np.savez(out, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
print(json.dumps({'devices': jax.device_count(), 'errors': errors,
                  'accuracy': result['accuracy']}))
'''


def _run(tmp_path, devices):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  out = tmp_path / f'{devices}.npz'
  proc = subprocess.run(
      [sys.executable, '-c', SCRIPT, str(ROOT), str(tmp_path / f'w{devices}'), str(out)],
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report['devices'] == devices
  return report, dict(np.load(out))


def test_eight_devices_train_like_one(tmp_path):
  one, params_one = _run(tmp_path, 1)
  eight, params_eight = _run(tmp_path, 8)
  # A batch of 12 does not split over 8 devices: a clear error, before any work.
  assert not one['errors']
  assert len(eight['errors']) == 1 and 'does not divide by the 8 devices' in eight['errors'][0]
  assert params_one.keys() == params_eight.keys()
  worst = max(float(np.max(np.abs(params_eight[k] - params_one[k]))) for k in params_one)
  print('max |8 devices - 1 device| =', worst)
  for key in params_one:
    np.testing.assert_allclose(params_eight[key], params_one[key], rtol=1e-4, atol=1e-6,
                               err_msg=key)


def test_launch_by_hand_passes_process_count_and_id_to_jax(monkeypatch):
  # JAX reads JAX_COORDINATOR_ADDRESS by itself, but not JAX_NUM_PROCESSES / JAX_PROCESS_ID.
  from hhjax import sharding  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(sharding.jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))
  for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:12345')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  monkeypatch.delenv('HHJAX_PEER_TIMEOUT_S', raising=False)
  sharding.maybe_initialize_distributed()
  # Plus JAX's heartbeat and shutdown timeouts, twice hhjax.peers' 60 s (backstops).
  assert calls == [{'num_processes': 2, 'process_id': 1, 'heartbeat_timeout_seconds': 121,
                    'shutdown_timeout_seconds': 121}]
