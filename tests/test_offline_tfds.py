"""A TFDS dataset without network: the run says so within seconds, with what to do instead; a
dataset already prepared in config.data.dir never touches the network."""

import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import smoke
from hhjax import errors
from hhjax.data import sources
from hhjax.data import spec as data_spec


def _spec(config):
  """What the input pipeline reads of `config`."""
  return data_spec.DataSpec.from_config(config)


ROOT = pathlib.Path(__file__).resolve().parents[1]


class HhjaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Eight 8x8 images in two classes, prepared from memory; says it downloads from GCS."""
  VERSION = tfds.core.Version('1.0.0')
  # What a real dataset's checksums file gives: the host the network check would try.
  url_infos = {'https://storage.googleapis.com/hhjax-test/tiny.zip': None}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'label': tfds.features.ClassLabel(names=['dark', 'bright'])}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(6), 'test': self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'image': np.full((8, 8, 3), 200 * (i % 2), np.uint8), 'label': i % 2}


def _tiny_config(data_dir):
  config = smoke.get_config()
  config.data.source = 'tfds'
  config.data.name = 'hhjax_tiny_images'
  config.data.dir = str(data_dir)
  # The tiny dataset has a train and a test split only: test validates, as it did before
  # validation and test were apart.
  config.data.validation_split, config.data.test_split = 'test', None
  return config


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_default_config_without_network_says_what_to_do_within_seconds(tmp_path):
  # The fault, whatever this machine's network: all HTTPS goes through a proxy that refuses.
  proxy = f'http://127.0.0.1:{_closed_port()}'
  env = dict(os.environ, JAX_PLATFORMS='cpu', https_proxy=proxy, HTTPS_PROXY=proxy,
             HHJAX_CACHE_DIR=str(tmp_path / 'cache'), KERAS_HOME=str(tmp_path / 'keras'))
  for name in ('no_proxy', 'NO_PROXY'):
    env.pop(name, None)
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, str(ROOT / 'main.py'), '--config=configs/default.py',
       f'--workdir={tmp_path / "run"}', f'--config.data.dir={tmp_path / "tfds"}'],
      env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
  seconds = time.monotonic() - start
  assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr and 'Retrying' not in proc.stderr
  # Nor TFDS's warning about the version folder it has not made (hhjax.compat).
  assert 'Variant folder' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: Cannot download the TFDS dataset 'horses_or_humans'")
  # Both downloads in one message, each with the flags that avoid it, before the data scan.
  for needle in ('no network', f'127.0.0.1:{proxy.rsplit(":", 1)[1]} unreachable',
                 '--config.data.source=folder', 'tfds build horses_or_humans',
                 f'into {tmp_path / "tfds"}/', 'and the official ImageNet weights',
                 '--config.model.pretrained=PATH'):
    assert needle in last
  assert 'training images' not in proc.stderr   # stopped before the data scan
  assert seconds < 30, seconds   # mostly imports; TFDS's retries took 210 s


def test_network_check_gives_up_after_its_timeout(monkeypatch):
  answer = threading.Event()

  def hang(*args, **kwargs):   # a name lookup that answers only when the test is over
    answer.wait(30)
    raise OSError('too late')
  monkeypatch.setattr(socket, 'create_connection', hang)
  start = time.monotonic()
  try:
    problem = sources._network_problem('https://storage.googleapis.com/x.zip', timeout=0.5)
  finally:
    answer.set()
  assert time.monotonic() - start < 2
  assert problem == 'storage.googleapis.com:443: no answer within 0.5 s'


def test_prepared_dataset_never_checks_the_network(tmp_path, monkeypatch):
  checks = []
  monkeypatch.setattr(sources, '_network_problem',
                      lambda url, **kwargs: checks.append(url) or 'unreachable (injected)')
  config = _tiny_config(tmp_path)
  with pytest.raises(errors.DatasetDownloadError, match='unreachable \\(injected\\)'):
    sources.table(_spec(config), 'train')   # not prepared yet: checked, and refused at once
  assert checks == ['https://storage.googleapis.com/hhjax-test/tiny.zip']

  tfds.builder('hhjax_tiny_images', data_dir=str(tmp_path)).download_and_prepare()
  checks.clear()
  sizes, names = sources.sizes_and_class_names(_spec(config))
  table = sources.table(_spec(config), 'train')
  assert (sizes, names, table.size) == ({'train': 6, 'test': 2}, ('dark', 'bright'), 6)
  assert not checks


def _offline(monkeypatch, tmp_path):
  """No network (every check answers unreachable) and empty weights caches; returns the checks."""
  checks = []
  monkeypatch.setattr(sources, '_network_problem',
                      lambda url, **kwargs: checks.append(url) or 'unreachable (injected)')
  monkeypatch.setenv('HHJAX_CACHE_DIR', str(tmp_path / 'cache'))
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
  return checks


def test_every_download_is_checked_before_the_data_scan_in_one_message(tmp_path, monkeypatch):
  from hhjax import train  # pylint: disable=g-import-not-at-top
  from hhjax.data import pipeline  # pylint: disable=g-import-not-at-top
  checks = _offline(monkeypatch, tmp_path)
  monkeypatch.setattr(pipeline, 'dataset_info', lambda *a: pytest.fail('the data was scanned'))
  config = _tiny_config(tmp_path / 'tfds')
  config.model.pretrained = 'imagenet'
  with pytest.raises(errors.DatasetDownloadError) as raised:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(raised.value)
  assert '\n' not in message and message.startswith(
      "Cannot download the TFDS dataset 'hhjax_tiny_images' (not prepared in "
      f"{tmp_path / 'tfds'}) and the official ImageNet weights "
      "(inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5, "
      "config.model.pretrained='imagenet'): no network (unreachable (injected)). Instead of "
      "the TFDS dataset 'hhjax_tiny_images': train on an image folder")
  assert not (tmp_path / 'run').exists()   # a failed run leaves no stub workdir
  for needle in ('--config.data.source=folder', '--config.model.pretrained=PATH',
                 str(tmp_path / 'cache' / 'keras' /
                     'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5')):
    assert needle in message
  assert checks == ['https://storage.googleapis.com/hhjax-test/tiny.zip']   # one per host

  # The weights alone (an image folder): the weights' error, naming the flag, also at once.
  config.data.source = 'fake'
  with pytest.raises(errors.WeightsDownloadError, match=r'--config\.model\.pretrained=PATH'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_cached_weights_and_a_prepared_dataset_need_no_network(tmp_path, monkeypatch):
  from hhjax import entry  # pylint: disable=g-import-not-at-top
  checks = _offline(monkeypatch, tmp_path)
  tfds.builder('hhjax_tiny_images', data_dir=str(tmp_path / 'tfds')).download_and_prepare()
  config = _tiny_config(tmp_path / 'tfds')
  config.model.pretrained = 'imagenet'
  cached = (tmp_path / 'keras' / 'models' /
            'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5')
  cached.parent.mkdir(parents=True)
  cached.write_bytes(b'Keras\'s own copy')   # looked at only; its MD5 is checked when read
  entry.check_downloads(config)
  config.model.pretrained = 'imagenet_top'
  entry.check_downloads(config, weights=False)   # a resumed run reads its checkpoint
  assert not checks
