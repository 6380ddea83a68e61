"""Data at scale: folder verdicts kept between runs and shared by processes; TFDS records read
on demand, giving the same batches as the in-memory path."""

import io
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import default
from hhjax import errors
from hhjax.data import bad_files
from hhjax.data import check_cache
from hhjax.data import pipeline
from hhjax.data import records
from hhjax.data import spec as data_spec
from hhjax.data import streams


def _spec(config):
  """What the input pipeline reads of `config`."""
  return data_spec.DataSpec.from_config(config)


ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 16  # Small images: the tests are about which files and records are read.


def _image(seed: int, fmt: str = 'PNG', shape=(20, 24)) -> bytes:
  rng = np.random.default_rng(seed)
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, shape + (3,), dtype=np.uint8)).save(buffer, fmt)
  return buffer.getvalue()


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def _folder(root: pathlib.Path, per_class=None) -> pathlib.Path:
  """root/<split>/<class>/NNN.png; per_class {split: n} images in each of two classes."""
  for split, n in (per_class or {'train': 3, 'validation': 2}).items():
    for c, name in enumerate(('cats', 'dogs')):
      for i in range(n):
        _write(root / split / name / f'{i:03d}.png', _image(1000 * c + 100 * len(split) + i))
  return root


def _config(**data):
  config = default.get_config()
  config.batch_size = 4
  config.data.image_size = SIZE
  config.data.validation_split, config.data.test_split = 'validation', None
  for key, value in data.items():
    config.data[key] = value
  return config


@pytest.fixture
def decoded(monkeypatch):
  """The files the check decodes, in a process that knows no verdicts yet (as a new run)."""
  paths = []
  decode_all = bad_files._decode_all  # pylint: disable=protected-access

  def counting(todo, *args, **kwargs):
    paths.extend(todo)
    return decode_all(todo, *args, **kwargs)
  monkeypatch.setattr(bad_files, '_decode_all', counting)
  monkeypatch.setattr(bad_files, '_CHECKED', {})
  return paths


def _new_run(monkeypatch, decoded):
  """Forgets what this process knows, as a process of a new run would."""
  monkeypatch.setattr(bad_files, '_CHECKED', {})
  decoded.clear()


# ----------------------------------------------------------------------------- folder verdicts


def test_a_new_run_decodes_no_file_of_an_unchanged_folder(tmp_path, monkeypatch, decoded,
                                                          caplog):
  root = _folder(tmp_path / 'data')
  config = _config(source='folder', dir=str(root))
  data_files = sorted(root.rglob('*'))
  monkeypatch.setattr(bad_files, 'PROGRESS_EVERY_S', 0.0)
  with caplog.at_level(logging.INFO, logger='absl'):
    info = pipeline.dataset_info(_spec(config))
  assert len(decoded) == 10
  assert 'files/s, ETA' in caplog.text  # a check that decodes says how far it is
  assert sorted(root.rglob('*')) == data_files, 'nothing may be written into the data folder'
  verdicts = check_cache.path_for(str(root / 'train'))
  assert verdicts.is_file()
  assert verdicts.is_relative_to(os.environ['HHJAX_CACHE_DIR'])

  _new_run(monkeypatch, decoded)
  assert pipeline.dataset_info(_spec(config)) == info
  first = next(pipeline.create_dataset(_spec(config), 'train', process_count=1,
                                       process_index=0).as_numpy_iterator())
  assert decoded == [] and first['image'].shape == (4, SIZE, SIZE, 3)


def test_changed_files_are_checked_again_and_one_turned_bad_is_caught(tmp_path, monkeypatch,
                                                                      decoded):
  root = _folder(tmp_path / 'data')
  config = _config(source='folder', dir=str(root))
  assert pipeline.dataset_info(_spec(config)).num_examples == {'train': 6, 'validation': 4}
  changed = _write(root / 'train' / 'cats' / '000.png', _image(7, shape=(30, 30)))
  broken = root / 'train' / 'dogs' / '001.png'
  _write(broken, broken.read_bytes()[:100])

  _new_run(monkeypatch, decoded)
  with pytest.raises(errors.DataError, match=r'1 file\(s\).*\n.*dogs/001.png: '):
    pipeline.dataset_info(_spec(config))
  assert sorted(decoded) == sorted([str(changed), str(broken)])
  # The bad verdict is kept too: skipping it costs no decoding, and it is never read.
  _new_run(monkeypatch, decoded)
  skip = _config(source='folder', dir=str(root), bad_files='skip')
  assert pipeline.dataset_info(_spec(skip)).num_examples == {'train': 5, 'validation': 4}
  assert decoded == []


def test_an_unusable_verdict_file_means_checking_again(tmp_path, monkeypatch, decoded, caplog):
  root = _folder(tmp_path / 'data')
  config = _config(source='folder', dir=str(root))
  pipeline.dataset_info(_spec(config))
  check_cache.path_for(str(root / 'train')).write_text('{"format": 1, "files": {"trunc')
  _new_run(monkeypatch, decoded)
  with caplog.at_level(logging.WARNING, logger='absl'):
    pipeline.dataset_info(_spec(config))
  assert len(decoded) == 6 and 'Ignoring the image-check verdicts' in caplog.text


# Runs in two fresh interpreters joined by jax.distributed over a loopback coordinator.
TWO_PROCESSES = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
from configs import default
from hhjax import sharding
from hhjax.data import bad_files, pipeline, spec
sharding.maybe_initialize_distributed()
decoded = []
decode_all = bad_files._decode_all
def counting(todo, *args, **kwargs):
  decoded.extend(todo)
  return decode_all(todo, *args, **kwargs)
bad_files._decode_all = counting
config = default.get_config()
config.data.source, config.data.dir = 'folder', sys.argv[2]
config.data.validation_split, config.data.bad_files = 'validation', 'skip'
config.data.test_split = None
info = pipeline.dataset_info(spec.DataSpec.from_config(config))
bad = sorted(p for p, (_, reason) in bad_files._CHECKED.items() if reason)
print(json.dumps({'decoded': decoded, 'sizes': info.num_examples, 'bad': bad}))
'''


def test_two_processes_each_decode_their_share_and_agree_on_every_verdict(tmp_path):
  root = _folder(tmp_path / 'data', {'train': 5, 'validation': 2})
  _write(root / 'train' / 'cats' / 'empty.png', b'')
  _write(root / 'validation' / 'dogs' / 'text.jpg', b'not a picture')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, '-c', TWO_PROCESSES, str(ROOT), str(root)],
      env=dict(os.environ, JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i)),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  reports = []
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    reports.append(json.loads(out.strip().splitlines()[-1]))
  shares = [set(r['decoded']) for r in reports]
  assert not shares[0] & shares[1]
  for split in ('train', 'validation'):   # each split is shared out on its own
    files = {str(p) for p in (root / split).rglob('*') if p.is_file()}
    assert (shares[0] | shares[1]) & files == files
    assert sorted(len(s & files) for s in shares) == [len(files) // 2, -(-len(files) // 2)]
  assert reports[0]['sizes'] == reports[1]['sizes'] == {'train': 10, 'validation': 4}
  expected = sorted([str(root / 'train' / 'cats' / 'empty.png'),
                     str(root / 'validation' / 'dogs' / 'text.jpg')])
  assert reports[0]['bad'] == reports[1]['bad'] == expected


# ----------------------------------------------------------------------------- TFDS records


@pytest.fixture(scope='module')
def tfds_dirs(tmp_path_factory):
  """A tiny TFDS dataset of our own, prepared as TFRecord and as ArrayRecord."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  splits = {'train': 10, 'test': 7}

  class HhjaxTestImages(tfds.core.GeneratorBasedBuilder):
    """Random pictures of two classes, PNG and JPEG, of several sizes."""
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(),
          'label': tfds.features.ClassLabel(names=('cats', 'dogs'))}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in splits}

    def _generate_examples(self, split):
      for i in range(splits[split]):
        data = _image(len(split) * 100 + i, 'PNG' if i % 3 else 'JPEG', (18 + i, 30 - i))
        yield i, {'image': data, 'label': (i * 7 + len(split)) % 2}

  dirs = {}
  for file_format in ('tfrecord', 'array_record'):
    dirs[file_format] = str(tmp_path_factory.mktemp(file_format))
    HhjaxTestImages(data_dir=dirs[file_format]).download_and_prepare(file_format=file_format)
  return dirs


def _tfds_config(data_dir, **data):
  data = {'validation_split': 'test', 'test_split': None, **data}
  return _config(source='tfds', name='hhjax_test_images', dir=data_dir, num_parallel_calls=2,
                 **data)


def _batches(config, split, steps=None, **kwargs):
  ds = pipeline.create_dataset(_spec(config), split, process_count=1, process_index=0, **kwargs)
  return list((ds.take(steps) if steps else ds).as_numpy_iterator())


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_tfds_records_give_the_in_memory_batches_and_resume_exactly(tfds_dirs, caplog):
  on_demand = _tfds_config(tfds_dirs['array_record'])
  in_memory = _tfds_config(tfds_dirs['tfrecord'])
  assert pipeline.sources.table(_spec(on_demand), 'train').kind == 'records'
  with caplog.at_level(logging.INFO, logger='absl'):
    assert pipeline.sources.table(_spec(in_memory), 'train').kind == 'bytes'
  assert 'without random access: holding split' in caplog.text
  assert pipeline.dataset_info(_spec(on_demand)) == pipeline.dataset_info(_spec(in_memory))
  whole = _batches(on_demand, 'train', 7)   # 10 examples, batch 4: steps cross epochs
  _assert_same(whole, _batches(in_memory, 'train', 7))
  _assert_same(whole[5:], _batches(on_demand, 'train', 2, start_step=5))
  evaluation = _batches(on_demand, 'test')
  _assert_same(evaluation, _batches(in_memory, 'test'))
  assert sum(int(b['mask'].sum()) for b in evaluation) == 7
  cached = _tfds_config(tfds_dirs['array_record'], cache_decoded=True)
  _assert_same(whole[:3], _batches(cached, 'train', 3))


def test_a_held_out_validation_of_records_is_that_of_the_same_split_in_memory(tfds_dirs):
  # Records carry their labels: every label is read to stratify, then the held-out share and
  # the training split's rest are read record by record, as the in-memory split gives them.
  held = dict(validation_split=None, validation_fraction=0.3, test_split='test')
  on_demand = _tfds_config(tfds_dirs['array_record'], **held)
  in_memory = _tfds_config(tfds_dirs['tfrecord'], **held)
  share = _spec(on_demand).validation
  table = pipeline.sources.table(_spec(on_demand), share)
  assert table.kind == 'records' and table.rows is not None
  assert pipeline.dataset_info(_spec(on_demand)) == pipeline.dataset_info(_spec(in_memory))
  assert pipeline.dataset_info(_spec(on_demand)).num_examples == {
      'train': 6, share: 4, 'test': 7}   # 5 of each class: 1.5 rounds to 2
  for split in (share, 'train'):
    _assert_same(_batches(on_demand, split, training=False),
                 _batches(in_memory, split, training=False))
  _assert_same(_batches(on_demand, 'train', 3), _batches(in_memory, 'train', 3))


def test_each_process_reads_only_the_records_of_its_share(tfds_dirs, monkeypatch):
  read = []
  get = records.Records._get  # pylint: disable=protected-access

  def counting(self, index):
    read.append(int(index))
    return get(self, index)
  monkeypatch.setattr(records.Records, '_get', counting)
  config = _tfds_config(tfds_dirs['array_record'])
  pipeline.dataset_info(_spec(config))
  ds = pipeline.create_dataset(_spec(config), 'train', start_step=1000, process_count=1,
                               process_index=0)
  assert read == [], 'sizes, start-up and a resume read no record'
  next(ds.as_numpy_iterator())
  shares = []
  for index in range(2):
    read.clear()
    list(pipeline.create_dataset(_spec(config), 'test', process_count=2,
                                 process_index=index).as_numpy_iterator())
    expected = [int(i) for _, i, valid in streams.eval_index_stream(
        7, 4, process_index=index, process_count=2) if valid]
    assert sorted(read) == sorted(expected)
    shares.append(set(read))
  assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(7))
