"""Shared test fixtures."""

import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The real horses-or-humans images; present in CI, absent on a fresh user machine.
SHARED_DATA = pathlib.Path(
    os.environ.get('HHJAX_SHARED_DATA', ROOT.parent / 'shared' / 'data' / 'horse-or-human'))


@pytest.fixture(autouse=True, scope='session')
def private_cache_dir(tmp_path_factory) -> pathlib.Path:
  """The tests' own $HHJAX_CACHE_DIR (image-check verdicts, downloads): never the user's."""
  path = tmp_path_factory.mktemp('hhjax_cache')
  previous = os.environ.get('HHJAX_CACHE_DIR')
  os.environ['HHJAX_CACHE_DIR'] = str(path)
  yield path
  if previous is None:
    os.environ.pop('HHJAX_CACHE_DIR', None)
  else:
    os.environ['HHJAX_CACHE_DIR'] = previous


@pytest.fixture(scope='session')
def jax_cache_dir(tmp_path_factory) -> pathlib.Path:
  """One JAX compilation cache for every main.py the tests start: the smoke config's steps
  compile once for the whole session instead of once per test module."""
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='session')
def env(jax_cache_dir) -> dict[str, str]:
  """The environment of the main.py processes the tests start: CPU, the shared compilation
  cache, no XLA flags of the caller's. Files that need another override this fixture."""
  # Every compilation kept, however short: JAX keeps only those over 1 s by default, and on an
  # idle machine the smoke config's eval step compiles in less, so whether a later process
  # loads it would depend on the machine's load.
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(jax_cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env.pop('XLA_FLAGS', None)
  return env


@pytest.fixture(scope='session')
def real_data_dir() -> pathlib.Path:
  """The shared horse-or-human folder (read-only); skips when it is absent."""
  if not (SHARED_DATA / 'train').is_dir():
    pytest.skip(f'real images not found at {SHARED_DATA} (optional resource)')
  return SHARED_DATA


@pytest.fixture(scope='session')
def keras_notop_h5(tmp_path_factory) -> pathlib.Path:
  """A tf_keras InceptionV3 without top (150x150) with random weights, BatchNorm statistics
  included, saved with `save_weights`: the official notop file's layout. Read-only for tests."""
  from keras_reference import save_tf_keras_weights  # pylint: disable=g-import-not-at-top
  return save_tf_keras_weights(tmp_path_factory.mktemp('keras') / 'inception_v3_notop.h5')


# The files whose tests take longest (seconds of one worker, measured with --durations=0),
# longest first. `pytest -n 2` (pytest.ini: --dist loadfile --no-loadscope-reorder) hands whole
# files to the workers in collection order: starting with these leaves the short ones to even
# out the two workers' ends, instead of one long file starting last. Only the order of the
# files changes; an outdated list costs time, never a result.
LONGEST_FILES = (
    'test_multihost.py',
    'test_train_resume.py',
    'test_workdir_faults.py',
    'test_multihost_faults.py',
    'test_main.py',
    'test_train_sharding.py',
    'test_keras_fit_parity.py',
    'test_train.py',
    'test_pictures.py',
    'test_feature_cache.py',
)


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep order
