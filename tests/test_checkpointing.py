"""The orbax checkpoint wrapper: round trip, retention, unfinished saves, mismatches."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hhjax import checkpointing
from hhjax import compare
from hhjax import compat
from hhjax import errors
from hhjax import trees
from hhjax.training import optim


def _state(width=3, value=1.0):
  params = {'backbone': {'w': jnp.full((2, 2), value)}, 'head': {'w': jnp.full((width,), value)}}
  labels = optim.param_labels(params, [('^head/', 'train'), ('.*', 'freeze')])
  return {'step': jnp.int32(7), 'params': params,
          'opt_state': optim.make_optimizer(labels, 0.1).init(params),
          'rng': jax.random.PRNGKey(3)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def test_save_restore_round_trip_with_metadata(tmp_path):
  state = _state(value=2.5)
  with checkpointing.Checkpoints(tmp_path / 'ckpt', async_save=False) as ckpts:
    ckpts.save(7, state, {'phase': 'warmup', 'step': 7})
  with checkpointing.Checkpoints(tmp_path / 'ckpt', read_only=True) as ckpts:
    assert ckpts.latest_step() == 7
    assert ckpts.info(7) == {'phase': 'warmup', 'step': 7}
    restored = ckpts.restore(7, _abstract(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_keeps_last_few_and_the_best(tmp_path):
  state = _state()
  accuracies = {1: 0.5, 2: 0.9, 3: None, 4: 0.6, 5: 0.7, 6: None}
  with checkpointing.Checkpoints(tmp_path, keep=2) as ckpts:
    for step, acc in accuracies.items():
      ckpts.save(step, state, {'step': step},
                 metrics=None if acc is None else {'val_accuracy': acc})
    ckpts.wait()
    assert ckpts.all_steps() == [2, 5, 6]
    assert ckpts.best_step() == 2
    assert ckpts.latest_step() == 6


def test_the_best_checkpoint_and_compare_choose_the_same_of_equal_epochs(tmp_path):
  # Epochs 2 and 4 tie: retention, --checkpoint=best and compare's best epoch all take the
  # latest of them (hhjax.best), so the epoch compare names is the checkpoint that restores.
  state = _state()
  accuracies = {1: 0.5, 2: 0.9, 3: None, 4: 0.9, 5: 0.6, 6: 0.7}
  with checkpointing.Checkpoints(tmp_path, keep=2) as ckpts:
    for step, acc in accuracies.items():
      ckpts.save(step, state, {'step': step},
                 metrics=None if acc is None else {'val_accuracy': acc, 'val_loss': 1 - acc})
    ckpts.wait()
    assert ckpts.all_steps() == [4, 5, 6]   # the best kept is the one best_step names
    assert ckpts.best_step() == 4
  with checkpointing.Checkpoints(tmp_path, read_only=True) as ckpts:
    assert ckpts.best_step() == 4
  rows = [{'epoch': e, 'step': s, 'val_accuracy': a, 'val_loss': 1 - a}
          for e, (s, a) in enumerate(((s, a) for s, a in accuracies.items() if a), 1)]
  chosen = compare.summary(rows)
  assert (chosen['best_step'], chosen['best_epoch'], chosen['best_accuracy']) == (4, 3, 0.9)


def test_unfinished_save_is_ignored_and_removed(tmp_path):
  state = _state()
  with checkpointing.Checkpoints(tmp_path, async_save=False) as ckpts:
    ckpts.save(3, state, {'step': 3})
  # What a process killed during the save of step 9 leaves behind.
  partial = tmp_path / '9.orbax-checkpoint-tmp-1234567'
  shutil.copytree(tmp_path / '3', partial)
  with checkpointing.Checkpoints(tmp_path) as ckpts:
    assert ckpts.latest_step() == 3
    assert ckpts.info(ckpts.latest_step()) == {'step': 3}
    ckpts.save(4, state, {'step': 4})   # the next save finds the workdir cleaned up
    ckpts.wait()
  assert not partial.exists()


def test_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
  with checkpointing.Checkpoints(tmp_path, async_save=False) as ckpts:
    ckpts.save(1, _state(width=3), {'step': 1})
  with checkpointing.Checkpoints(tmp_path, read_only=True) as ckpts:
    with pytest.raises(errors.CheckpointMismatchError,
                       match=r'(?s)does not fit.*params\.head\.w: \(\(3,\).*\(\(5,\)'):
      ckpts.restore(1, _abstract(_state(width=5)))


def test_checkpoint_with_other_parameters_is_a_clear_error(tmp_path):
  with checkpointing.Checkpoints(tmp_path, async_save=False) as ckpts:
    ckpts.save(1, _state(), {'step': 1})
  other = _state()
  other['params']['head'] = {'v': jnp.ones(3)}
  other['opt_state'] = optim.make_optimizer(
      optim.param_labels(other['params'], [('^head/', 'train'), ('.*', 'freeze')]), 0.1
  ).init(other['params'])
  with checkpointing.Checkpoints(tmp_path, read_only=True) as ckpts:
    with pytest.raises(errors.CheckpointMismatchError,
                       match=r'(?s)in the config but not in the checkpoint:\n  .*params\.head\.v'
                             r'.*in the checkpoint but not in the config:\n  .*params\.head\.w'):
      ckpts.restore(1, _abstract(other))


def test_read_only_without_checkpoints_says_train_first(tmp_path):
  with pytest.raises(FileNotFoundError, match='train first'):
    checkpointing.Checkpoints(tmp_path / 'nothing', read_only=True)


def test_array_shapes_names_match_orbax(tmp_path):
  # The mismatch check compares our names with orbax's: an exact fit must report nothing.
  state = _state()
  with checkpointing.Checkpoints(tmp_path, async_save=False) as ckpts:
    ckpts.save(1, state, {})
    ckpts.check_fits(1, _abstract(state))
    names = trees.leaf_specs(state, '.', dtypes=True)
    optax_state_names = [k for k in names if k.startswith('opt')]
    assert optax_state_names == ['opt_state.inner_states.train.inner_state.0.nu.head.w']


def _asyncio_record(error):
  import logging  # pylint: disable=g-import-not-at-top
  return logging.LogRecord('asyncio', logging.ERROR, '/usr/lib/python3/asyncio/base_events.py',
                           1771, 'Future exception was never retrieved', None,
                           (type(error), error, None))


def test_log_filter_drops_the_leftover_errors_of_a_failed_save_and_keeps_others():
  quiet = compat._QuietOrbax()
  # TensorStore's errors reach asyncio without Python frames: known by their suffix.
  for text in ('UNKNOWN: Error writing local file "/w/d/892e": Failed to write 760422 bytes to '
               "file 6: File too large [os_error_code='27']",
               'NOT_FOUND: Error opening "zarr" driver: Metadata at "a/.zarray" does not exist '
               "[tensorstore_spec='{}']"):
    assert not quiet.filter(_asyncio_record(ValueError(text)))
  assert quiet.filter(_asyncio_record(ValueError('a bug in a task of our own')))


def test_unraisable_hook_drops_orbax_coroutines_collected_after_a_failure_and_passes_others():
  import types  # pylint: disable=g-import-not-at-top
  passed = []
  hook = compat._QuietClosedLoops(passed.append)
  scope = {}   # a coroutine function as if defined in orbax's package
  exec(compile('async def read(): pass', '/site-packages/orbax/checkpoint/x.py', 'exec'), scope)
  read = scope['read']()
  try:
    hook(types.SimpleNamespace(object=read, exc_value=Exception('reading array index'),
                               exc_traceback=None))
  finally:
    read.close()
  assert not passed
  other = types.SimpleNamespace(object=None, exc_value=ValueError('ours'), exc_traceback=None)
  hook(other)
  assert passed == [other]
