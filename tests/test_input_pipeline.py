"""The input pipeline: decoding, folders and bad files, determinism, resume, sharding, eval."""

import dataclasses
import io
import json
import logging
import os
import pathlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import default
from hhjax import errors
from hhjax import preview
from hhjax.data import bad_files
from hhjax.data import decode
from hhjax.data import pipeline
from hhjax.data import sources
from hhjax.data import spec as data_spec
from hhjax.data import streams


def _spec(config):
  """What the input pipeline reads of `config`."""
  return data_spec.DataSpec.from_config(config)


def _image_fields(config):
  """config.data's image_size, resize_method and preprocessing: what decoding one image reads."""
  return config.data.image_size, config.data.resize_method, config.data.preprocessing


SIZE = 16  # Small images where the test is about wiring.


def _config(**data):
  config = default.get_config()
  config.batch_size = 4
  config.data.image_size = SIZE
  for key, value in data.items():
    config.data[key] = value
  return config


def _fake_config(num_train=10, num_eval=7, **data):
  config = _config(source='fake', **data)
  config.data.fake.num_train_examples = num_train
  config.data.fake.num_eval_examples = num_eval
  return config


def _take(ds, n):
  return list(ds.take(n).as_numpy_iterator())


# ----------------------------------------------------------------------------- decoding

_RNG = np.random.default_rng(0)
_RGB = _RNG.integers(0, 256, (12, 18, 3), dtype=np.uint8)
_SMOOTH = np.stack(list(np.meshgrid(np.linspace(0, 255, 18), np.linspace(40, 200, 12))) +
                   [np.full((12, 18), 90.0)], axis=-1).astype(np.uint8)
_GRAY16 = _RNG.integers(0, 65536, (12, 18)).astype(np.uint16)
_RGB16 = _RNG.integers(0, 65536, (12, 18, 3)).astype(np.uint16)


def _pil_bytes(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _animated_gif():
  frames = [Image.fromarray(_RGB).convert('P'), Image.fromarray(255 - _RGB).convert('P')]
  buffer = io.BytesIO()
  frames[0].save(buffer, 'GIF', save_all=True, append_images=frames[1:])
  return buffer.getvalue()


def _as_rgb(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def _formats():
  """name -> (file bytes, expected RGB uint8, tolerance in levels)."""
  rgba = np.dstack([_RGB, _RNG.integers(0, 256, (12, 18), dtype=np.uint8)])
  palette_trns = Image.fromarray(_RGB).convert('P')
  cases = {
      'rgb.png': _pil_bytes(Image.fromarray(_RGB), 'PNG'),
      'rgba.png': _pil_bytes(Image.fromarray(rgba), 'PNG'),
      'gray.png': _pil_bytes(Image.fromarray(_RGB[..., 0]), 'PNG'),
      'gray_alpha.png': _pil_bytes(Image.fromarray(_RGB[..., :2], 'LA'), 'PNG'),
      'palette.png': _pil_bytes(Image.fromarray(_RGB).convert('P'), 'PNG'),
      'palette_transparency.png': _pil_bytes(palette_trns, 'PNG', transparency=0),
      'gray16.png': _pil_bytes(Image.fromarray(_GRAY16), 'PNG'),
      'rgb16.png': tf.io.encode_png(_RGB16).numpy(),
      'rgba16.png': tf.io.encode_png(np.dstack([_RGB16, _RGB16[..., :1]])).numpy(),
      'rgb.jpg': _pil_bytes(Image.fromarray(_SMOOTH), 'JPEG', quality=95),
      'gray.jpeg': _pil_bytes(Image.fromarray(_SMOOTH[..., 0]), 'JPEG', quality=95),
      'cmyk.jpg': _pil_bytes(Image.fromarray(_SMOOTH).convert('CMYK'), 'JPEG', quality=95),
      'rgb.bmp': _pil_bytes(Image.fromarray(_RGB), 'BMP'),
      'rgba.bmp': _pil_bytes(Image.fromarray(rgba), 'BMP'),
      'gray.bmp': _pil_bytes(Image.fromarray(_RGB[..., 0]), 'BMP'),
      'palette.bmp': _pil_bytes(Image.fromarray(_RGB).convert('P'), 'BMP'),
      'palette.gif': _pil_bytes(Image.fromarray(_RGB).convert('P'), 'GIF'),
      'animated.gif': _animated_gif(),
      'rgb.webp': _pil_bytes(Image.fromarray(_RGB), 'WEBP', lossless=True),
  }
  expected = {}
  for name, data in cases.items():
    if name == 'gray16.png':
      # The high byte: within one level of v / 257.
      expected[name] = (np.repeat((_GRAY16 >> 8)[..., None], 3, -1).astype(np.uint8), 0)
    elif name.startswith(('rgb16', 'rgba16')):
      expected[name] = ((_RGB16 >> 8).astype(np.uint8), 0)
    elif name == 'cmyk.jpg':  # libjpeg and PIL convert CMYK to RGB slightly differently.
      expected[name] = (_as_rgb(data), 3)
    else:  # PIL's convert('RGB') is what Keras's load_img does: drop alpha, expand palette.
      expected[name] = (_as_rgb(data), 0)
  return {name: (data,) + expected[name] for name, data in cases.items()}


FORMATS = _formats()


@pytest.mark.parametrize('name', list(FORMATS))
def test_every_format_decodes_to_rgb_uint8(name):
  data, expected, tolerance = FORMATS[name]
  image = decode.decode_image(tf.constant(data)).numpy()
  assert image.dtype == np.uint8 and image.shape == expected.shape
  assert np.abs(image.astype(int) - expected).max() <= tolerance


def test_sixteen_bit_png_is_scaled_not_clipped():
  image = decode.decode_image(tf.constant(FORMATS['gray16.png'][0])).numpy()
  assert np.abs(image[..., 0] - _GRAY16 / 257).max() < 1


def test_nearest_resize_picks_the_pixels_keras_load_img_picks(tmp_path):
  from tf_keras.utils import load_img  # pylint: disable=g-import-not-at-top
  for shape, size in (((300, 300), 150), ((97, 131), 50)):
    path = tmp_path / f'{shape[0]}x{shape[1]}.png'
    Image.fromarray(_RNG.integers(0, 256, shape + (3,), dtype=np.uint8)).save(path)
    keras = np.asarray(load_img(path, target_size=(size, size), interpolation='nearest'))
    ours = decode.resize(
        decode.decode_image(tf.io.read_file(str(path))), size, 'nearest').numpy()
    np.testing.assert_array_equal(ours, keras)


def test_preprocessing_maps_pixels_to_the_documented_ranges():
  pixels = tf.constant([0.0, 127.5, 255.0])
  np.testing.assert_allclose(decode.normalize(pixels, 'inception'), [-1, 0, 1])
  np.testing.assert_allclose(decode.normalize(pixels, 'rescale'), [0, 0.5, 1])
  with pytest.raises(ValueError, match="preprocessing must be one of .*'torch'"):
    decode.normalize(pixels, 'torch')



def test_normalize_is_the_written_out_formulas_bit_for_bit():
  # Every whole level, and fractional values as resizing and augmentation give.
  pixels = tf.constant(np.concatenate([np.arange(256), np.linspace(0, 255, 1001)]), tf.float32)
  for name, written_out in (('inception', pixels / 127.5 - 1.0), ('rescale', pixels / 255.0)):
    np.testing.assert_array_equal(decode.normalize(pixels, name).numpy().view(np.uint32),
                                  written_out.numpy().view(np.uint32))


# ----------------------------------------------------------------------------- folders


def _write(path: pathlib.Path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def _small_png(seed):
  rng = np.random.default_rng(seed)
  return _pil_bytes(Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)), 'PNG')


def _make_folder(root: pathlib.Path, counts=None):
  """root/<split>/<class>/*.png with counts {(split, class): n}."""
  counts = counts or {('train', 'cats'): 5, ('train', 'dogs'): 6,
                      ('validation', 'cats'): 3, ('validation', 'dogs'): 2}
  for k, ((split, cls), n) in enumerate(counts.items()):
    for i in range(n):
      _write(root / split / cls / f'{i:03d}.png', _small_png(100 * k + i))
  return root


def _folder_config(root, **data):
  return _config(source='folder', dir=str(root), eval_split='validation', **data)


def test_folder_of_every_format_is_read_whole(tmp_path):
  for k, (name, (data, _, _)) in enumerate(FORMATS.items()):
    _write(tmp_path / 'train' / ('a' if k % 2 else 'b') / name, data)
    _write(tmp_path / 'validation' / ('a' if k % 2 else 'b') / name, data)
  _write(tmp_path / 'train' / 'a' / '.DS_Store', b'\0\0\0\1Bud1')  # OS metadata: ignored.
  config = _folder_config(tmp_path)
  info = pipeline.dataset_info(_spec(config))
  assert info.class_names == ('a', 'b')
  assert info.num_examples == {'train': len(FORMATS), 'validation': len(FORMATS)}
  batches = list(pipeline.create_dataset(
      _spec(config), 'validation', process_count=1, process_index=0).as_numpy_iterator())
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == len(FORMATS)
  labels = np.concatenate([b['label'] for b in batches])[mask]
  assert (labels == 0).sum() == len(FORMATS) // 2  # files in 'a' (odd k)


BAD_FILES = {
    'zero_bytes.png': b'',
    'truncated.png': _small_png(1)[:200],
    'truncated.jpg': _pil_bytes(Image.fromarray(_RGB), 'JPEG')[:300],
    'text.png': b'this is not a picture\n',
    'notes.txt': b'labels were checked by hand\n',
    'noise.gif': bytes(range(256)) * 4,
    'unsupported.tiff': _pil_bytes(Image.fromarray(_RGB), 'TIFF'),
    'one_bit.bmp': _pil_bytes(Image.fromarray(_RGB[..., 0] > 128), 'BMP'),
}


def _folder_with_bad_files(root):
  _make_folder(root)
  for k, (name, data) in enumerate(BAD_FILES.items()):
    _write(root / ('train' if k % 2 else 'validation') / 'cats' / name, data)
  return root


def test_bad_files_are_reported_by_path_before_anything_runs(tmp_path):
  config = _folder_config(_folder_with_bad_files(tmp_path))
  with pytest.raises(errors.DataError) as raised:
    pipeline.dataset_info(_spec(config))
  message = str(raised.value)
  assert f'{len(BAD_FILES)} file(s)' in message
  for name in BAD_FILES:
    assert name in message
  assert 'zero_bytes.png: empty file (0 bytes)' in message
  assert 'one_bit.bmp: 1-bit BMP' in message
  assert 'unsupported.tiff: Unknown image file format' in message
  assert "bad_files='skip'" in message
  with pytest.raises(ValueError, match='truncated.png'):
    pipeline.create_dataset(_spec(config), 'train', process_count=1, process_index=0)


def test_skipping_bad_files_warns_with_their_count(tmp_path, caplog):
  config = _folder_config(_folder_with_bad_files(tmp_path), bad_files='skip')
  with caplog.at_level(logging.WARNING, logger='absl'):
    info = pipeline.dataset_info(_spec(config))
  assert f'Skipping {len(BAD_FILES)} file(s)' in caplog.text
  assert 'truncated.jpg' in caplog.text
  assert info.num_examples == {'train': 11, 'validation': 5}  # the good ones only
  batches = list(pipeline.create_dataset(
      _spec(config), 'validation', process_count=1, process_index=0).as_numpy_iterator())
  assert sum(b['mask'].sum() for b in batches) == 5


@pytest.mark.parametrize('layout, expected, error', [
    ('missing_root', r'does not exist', errors.DataNotFoundError),
    ('missing_split', r"No folder for split 'validation'.*holds \['train'\]",
     errors.DataNotFoundError),
    ('no_class_folders', r"found 0 class folder\(s\) \[\] and 2 other file\(s\)",
     errors.DataError),
    ('one_class', r"found 1 class folder\(s\) \['cats'\]", errors.DataError),
    ('different_classes', r"'train' has \['cats', 'dogs'\], 'validation' has \['cats', 'cows'\]",
     errors.DataError),
    ('empty_split', r'holds no files: its class folders \[.cats., .dogs.\] are empty',
     errors.DataError),
    ('empty_class', r"Class folder\(s\) \['dogs'\] in .*validation hold no readable images",
     errors.DataError),
])
def test_broken_layouts_fail_at_once_saying_what_was_found(tmp_path, layout, expected, error):
  root = tmp_path / 'data'
  if layout != 'missing_root':
    _make_folder(root, {('train', 'cats'): 2, ('train', 'dogs'): 2})
  if layout == 'no_class_folders':
    _write(root / 'validation' / 'a.png', _small_png(0))
    _write(root / 'validation' / 'b.png', _small_png(1))
  elif layout == 'one_class':
    _make_folder(root, {('validation', 'cats'): 2})
  elif layout == 'different_classes':
    _make_folder(root, {('validation', 'cats'): 2, ('validation', 'cows'): 2})
  elif layout == 'empty_split':
    (root / 'validation' / 'cats').mkdir(parents=True)
    (root / 'validation' / 'dogs').mkdir(parents=True)
  elif layout == 'empty_class':
    _make_folder(root, {('validation', 'cats'): 2})
    (root / 'validation' / 'dogs').mkdir(parents=True)
  with pytest.raises(error, match=expected):
    pipeline.dataset_info(_spec(_folder_config(root)))



@pytest.mark.parametrize('field, value', [
    ('source', 'hdf5'), ('resize_method', 'bicubic'), ('preprocessing', 'torch'),
    ('image_dtype', 'float16'), ('bad_files', 'ignore'),
])
def test_unknown_config_values_are_config_errors_naming_the_field(tmp_path, field, value):
  config = _folder_config(_make_folder(tmp_path))
  config.data[field] = value
  expected = rf"config\.data\.{field} must be one of .*'{value}'"
  with pytest.raises(errors.ConfigError, match=expected):
    pipeline.create_dataset(_spec(config), 'train', process_count=1, process_index=0)


def test_the_spec_of_an_older_config_gives_absent_fields_their_defaults():
  tree = default.get_config().to_dict()   # as a workdir's config.json holds it
  del tree['data']['image_dtype'], tree['data']['cache_decoded'], tree['data']['augment']['cval']
  tree['data']['augment']['zoom_range'] = [0.8, 1.2]
  spec = data_spec.DataSpec.from_config(tree)
  assert (spec.image_dtype, spec.cache_decoded, spec.augment.cval) == ('float32', False, 0.0)
  assert spec.augment.zoom_range == (0.8, 1.2)
  assert spec.eval_batch_size == spec.batch_size == tree['batch_size']   # eval_batch_size None
  assert dataclasses.replace(spec, image_size=75).image_size == 75


def test_a_source_name_without_an_implementation_reads_nothing():
  assert sources.SOURCES == data_spec.SOURCES
  unknown = dataclasses.replace(_spec(_fake_config()), source='hdf5')
  expected = r"config\.data\.source must be one of \('tfds', 'folder', 'fake'\), got 'hdf5'"
  with pytest.raises(errors.ConfigError, match=expected):
    sources.table(unknown, 'train')
  with pytest.raises(errors.ConfigError, match=expected):
    sources.sizes_and_class_names(unknown)


# ----------------------------------------------------------------------------- files one by one


def test_load_image_gives_the_eval_input_or_names_the_file(tmp_path):
  config = _config()
  good, bad = tmp_path / 'good.png', tmp_path / 'bad.png'
  _write(good, _small_png(0))
  _write(bad, b'this is not a picture\n')
  image = decode.load_image(str(good), *_image_fields(config))
  assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.float32
  np.testing.assert_array_equal(
      image, decode.preprocess_image(tf.io.read_file(str(good)), *_image_fields(config)).numpy())
  with pytest.raises(errors.DataError, match=r'bad\.png: not a readable image \(.+\)\.$'):
    decode.load_image(str(bad), *_image_fields(config))
  with pytest.raises(errors.DataNotFoundError, match=r'missing\.png: no such file'):
    decode.load_image(str(tmp_path / 'missing.png'), *_image_fields(config))


def test_readable_files_follow_the_bad_files_policy(tmp_path, caplog):
  good = [tmp_path / 'a.png', tmp_path / 'b.png']
  for k, path in enumerate(good):
    _write(path, _small_png(k))
  bad = [tmp_path / f'empty_{k:02d}.png' for k in range(22)]
  for path in bad:
    _write(path, b'')
  files = [str(p) for p in [good[0]] + bad + [good[1]]]
  with pytest.raises(errors.DataError) as raised:
    bad_files.readable_files(files, 'error')
  message = str(raised.value)
  assert message.startswith('22 of the 24 files given to --images are not readable images')
  assert 'empty_00.png: empty file (0 bytes)' in message and 'empty_20.png' not in message
  assert '  ... and 2 more' in message and "config.data.bad_files='skip'" in message
  with caplog.at_level(logging.WARNING, logger='absl'):
    assert bad_files.readable_files(files, 'skip') == [str(p) for p in good]
  assert 'Skipping 22 file(s)' in caplog.text
  with pytest.raises(errors.DataNotFoundError, match='None of the files given to --images'):
    bad_files.readable_files([str(p) for p in bad], 'skip')
  with pytest.raises(errors.ConfigError, match="bad_files must be one of .*'ignore'"):
    bad_files.readable_files(files, 'ignore')


# ----------------------------------------------------------------------------- streams


def test_training_batches_have_the_contract_shapes_and_types():
  config = _fake_config()
  batch = _take(pipeline.create_dataset(_spec(config), 'train'), 1)[0]  # jax's process layout
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (4, SIZE, SIZE, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1


def test_same_seed_and_step_give_the_same_batch_with_any_parallelism():
  one = _take(pipeline.create_dataset(_spec(_fake_config(num_parallel_calls=1)), 'train',
                                      process_count=1, process_index=0), 4)
  many = _take(pipeline.create_dataset(_spec(_fake_config(num_parallel_calls=3)), 'train',
                                       process_count=1, process_index=0), 4)
  for a, b in zip(one, many):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other_seed = _fake_config()
  other_seed.seed = 1
  other = _take(pipeline.create_dataset(_spec(other_seed), 'train', process_count=1,
                                        process_index=0), 1)
  assert not np.array_equal(other[0]['image'], one[0]['image'])


@pytest.mark.parametrize('start_step', [1, 3, 7])
def test_start_step_equals_dropping_the_first_batches(start_step):
  # 10 examples, batch 4: batches straddle epoch boundaries; step 7 starts in epoch 2.
  config = _fake_config(num_train=10)
  full = _take(pipeline.create_dataset(_spec(config), 'train', process_count=1,
                                       process_index=0), start_step + 3)
  resumed = _take(pipeline.create_dataset(_spec(config), 'train', start_step=start_step,
                                          process_count=1, process_index=0), 3)
  for a, b in zip(full[start_step:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_start_step_skips_without_reading_skipped_files(tmp_path):
  # Step 1000 of 6 files in batches of 4 lies 666 epochs in. Deleting every file that step
  # 1000 does not use proves the 4,000 skipped examples were never read or decoded.
  root = _make_folder(tmp_path, {('train', 'a'): 3, ('train', 'b'): 3,
                                 ('validation', 'a'): 1, ('validation', 'b'): 1})
  config = _folder_config(root)
  config.data.augment.enabled = False
  table_order = sorted((root / 'train').rglob('*.png'))  # class folders, then file names
  used = [int(i) for _, i in streams.train_index_stream(
      6, config.seed, 4, start_step=1000).take(4)]
  assert len(set(used)) < 6, 'some file must be unused for the test to mean anything'
  ds = pipeline.create_dataset(_spec(config), 'train', start_step=1000, process_count=1,
                               process_index=0)
  for i, path in enumerate(table_order):
    if i not in used:
      path.unlink()
  batch = next(ds.as_numpy_iterator())
  for image, i in zip(batch['image'], used):
    expected = decode.preprocess_image(tf.io.read_file(str(table_order[i])),
                                       *_image_fields(config))
    np.testing.assert_array_equal(image, expected.numpy())


def test_every_epoch_is_a_fresh_permutation():
  n = 9
  indices = [int(i) for _, i in streams.train_index_stream(n, 0, 3).take(3 * n)]
  epochs = [indices[k * n:(k + 1) * n] for k in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(n))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_processes_decode_disjoint_shares_of_each_global_batch():
  config = _fake_config(num_train=10)
  config.batch_size = 6
  single = _take(pipeline.create_dataset(_spec(config), 'train', process_count=1,
                                         process_index=0), 5)
  shares = [_take(pipeline.create_dataset(_spec(config), 'train', process_count=3,
                                          process_index=i), 5) for i in range(3)]
  for step, whole in enumerate(single):
    parts = [share[step] for share in shares]
    assert all(part['image'].shape[0] == 2 for part in parts)
    np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])
    np.testing.assert_array_equal(np.concatenate([p['label'] for p in parts]), whole['label'])
  # Over an epoch the processes read disjoint parts of the split that together cover it.
  seen = [
      {int(i) for p, i in streams.train_index_stream(
          10, 0, 6, process_index=k, process_count=3).take(20)} for k in range(3)]
  positions = [
      [int(p) for p, i in streams.train_index_stream(
          10, 0, 6, process_index=k, process_count=3).take(10)] for k in range(3)]
  assert not set(positions[0]) & set(positions[1]) and not set(positions[1]) & set(positions[2])
  assert set().union(*seen) == set(range(10))


def test_batch_size_must_divide_over_processes():
  with pytest.raises(ValueError, match='global batch size 4 must divide evenly over 3'):
    pipeline.create_dataset(_spec(_fake_config()), 'train', process_count=3, process_index=0)


@pytest.mark.parametrize('process_count', [1, 2])
def test_evaluation_sees_every_example_exactly_once(process_count):
  config = _fake_config(num_eval=7)
  info = pipeline.dataset_info(_spec(config))
  assert info.num_examples == {'train': 10, 'test': 7}
  seen = []
  for index in range(process_count):
    batches = list(pipeline.create_dataset(
        _spec(config), 'test', process_count=process_count,
        process_index=index).as_numpy_iterator())
    assert len(batches) == 2  # ceil(7 / 4): every process runs the same number of steps.
    for batch in batches:
      assert batch['image'].shape[0] == 4 // process_count
      seen.extend(image.tobytes() for image in batch['image'][batch['mask']])
  assert len(seen) == 7 and len(set(seen)) == 7
  reference = list(pipeline.create_dataset(_spec(config), 'test', process_count=1,
                                           process_index=0).as_numpy_iterator())
  assert set(seen) == {im.tobytes() for b in reference for im in b['image'][b['mask']]}


def test_tfds_source_under_mock_data(monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # mock_data serves records without preparing the dataset: no download, so no network check
  # (tests/test_offline_tfds.py covers that check).
  monkeypatch.setattr(sources, '_network_problem', lambda url: None)
  config = _config(source='tfds')
  with tfds.testing.mock_data(num_examples=5):
    info = pipeline.dataset_info(_spec(config))
    assert info.num_examples == {'train': 5, 'test': 5}
    assert info.class_names == ('horses', 'humans')
    train = _take(pipeline.create_dataset(_spec(config), 'train', process_count=1,
                                          process_index=0), 3)
    test = list(pipeline.create_dataset(_spec(config), 'test', process_count=1,
                                        process_index=0).as_numpy_iterator())
  assert train[2]['image'].shape == (4, SIZE, SIZE, 3)
  assert set(np.concatenate([b['label'] for b in train])) <= {0, 1}
  assert [int(b['mask'].sum()) for b in test] == [4, 1]


def test_tfds_without_network_says_what_to_use_instead(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def offline(*args, **kwargs):
    raise ConnectionError('no route to host')
  # The builder's own download_and_prepare runs up to the network (so a missing dependency on
  # that path fails this test); only the download itself is cut off.
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', offline)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract', offline)
  # The quick check before a download finds the host; the download itself then fails.
  monkeypatch.setattr(sources, '_network_problem', lambda url: None)
  with pytest.raises(errors.DatasetDownloadError, match=r"(?s)no route to host.*source='folder'"):
    pipeline.create_dataset(_spec(_config(source='tfds', dir=str(tmp_path))), 'train',
                            process_count=1, process_index=0)


def test_preview_writes_a_grid_with_class_names(tmp_path):
  root = _make_folder(tmp_path / 'data')
  path = preview.preview_data(_folder_config(root), str(tmp_path / 'work'), num_images=8,
                              columns=4)
  assert path == str(tmp_path / 'work' / 'preview_data.png')
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.width > 300 and image.height > 200


def test_cached_decoding_gives_the_same_batches(tmp_path):
  root = _make_folder(tmp_path)
  plain = _folder_config(root)
  cached = _folder_config(root, cache_decoded=True)
  for split, steps in (('train', 4), ('validation', 2)):
    a = _take(pipeline.create_dataset(_spec(plain), split, process_count=1, process_index=0),
              steps)
    b = _take(pipeline.create_dataset(_spec(cached), split, process_count=1, process_index=0),
              steps)
    for x, y in zip(a, b):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])


# ----------------------------------------------------------------------------- real images


@pytest.fixture(scope='module')
def real_config(real_data_dir):
  config = default.get_config()
  config.data.source = 'folder'
  config.data.dir = str(real_data_dir)
  config.data.eval_split = 'validation'
  return config


def test_real_folder_sizes_and_class_names(real_config):
  info = pipeline.dataset_info(_spec(real_config))
  assert info.class_names == ('horses', 'humans')
  assert info.num_examples == {'train': 1027, 'validation': 256}


def test_real_train_epoch_is_a_permutation_with_folder_labels(real_config):
  config = real_config.copy_and_resolve_references()
  config.data.augment.enabled = False
  config.batch_size = 79  # 1027 = 13 x 79: epoch 0 is exactly 13 steps.
  batches = _take(pipeline.create_dataset(_spec(config), 'train', process_count=1,
                                          process_index=0), 13)
  labels = np.concatenate([b['label'] for b in batches])
  assert (labels == 0).sum() == 500 and (labels == 1).sum() == 527
  images = np.concatenate([b['image'] for b in batches])
  assert images.shape == (1027, 150, 150, 3) and images.dtype == np.float32
  assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.9
  assert len({image.tobytes() for image in images}) == 1027


def test_real_validation_pass_sees_each_image_once_with_its_folder_label(real_config,
                                                                         real_data_dir):
  batches = list(pipeline.create_dataset(_spec(real_config), 'validation', process_count=1,
                                         process_index=0).as_numpy_iterator())
  assert len(batches) == 13 and batches[0]['image'].shape == (20, 150, 150, 3)
  assert int(sum(b['mask'].sum() for b in batches)) == 256
  seen = {}
  for batch in batches:
    for image, label in zip(batch['image'][batch['mask']], batch['label'][batch['mask']]):
      seen[image.tobytes()] = int(label)
  expected = {}
  for label, name in enumerate(('horses', 'humans')):
    for path in sorted((real_data_dir / 'validation' / name).iterdir()):
      image = decode.preprocess_image(tf.io.read_file(str(path)),
                                      *_image_fields(real_config))
      expected[image.numpy().tobytes()] = label
  assert len(expected) == 256
  assert seen == expected



@pytest.mark.parametrize('preprocessing', ['inception', 'rescale'])
def test_uint8_batches_are_the_float_batches_before_normalisation(tmp_path, preprocessing):
  # Nearest resizing, no augmentation: whole grey levels, so uint8 loses nothing and the
  # device-side normalisation gives the float pipeline's values bit for bit.
  from hhjax.model import preprocessing as preprocessing_lib  # pylint: disable=g-import-not-at-top
  root = _make_folder(tmp_path)
  common = dict(resize_method='nearest', preprocessing=preprocessing)
  as_float = _folder_config(root, **common)
  as_uint8 = _folder_config(root, image_dtype='uint8', **common)
  for config in (as_float, as_uint8):
    config.data.augment.enabled = False
  for split in ('train', 'validation'):
    f = _take(pipeline.create_dataset(_spec(as_float), split, process_count=1, process_index=0), 2)
    u = _take(pipeline.create_dataset(_spec(as_uint8), split, process_count=1, process_index=0), 2)
    for a, b in zip(f, u):
      assert b['image'].dtype == np.uint8 and a['image'].dtype == np.float32
      keep = a.get('mask', np.ones(len(a['label']), bool))  # padding is zeros in either dtype
      np.testing.assert_array_equal(b.get('mask', keep), keep)
      on_device = np.asarray(preprocessing_lib.normalize_images(b['image'], preprocessing))
      np.testing.assert_array_equal(on_device[keep], a['image'][keep])
      np.testing.assert_array_equal(a['label'], b['label'])


def test_uint8_batches_round_augmented_pixels_to_whole_levels():
  as_float = _fake_config(preprocessing='rescale')
  as_uint8 = _fake_config(preprocessing='rescale', image_dtype='uint8')
  f = _take(pipeline.create_dataset(_spec(as_float), 'train', process_count=1, process_index=0), 1)
  u = _take(pipeline.create_dataset(_spec(as_uint8), 'train', process_count=1, process_index=0), 1)
  np.testing.assert_allclose(u[0]['image'].astype(np.float32), f[0]['image'] * 255.0, atol=0.5001)


def test_unknown_image_dtype_is_refused():
  with pytest.raises(ValueError, match='image_dtype'):
    pipeline.create_dataset(_spec(_fake_config(image_dtype='float16')), 'train')


def test_folder_links_are_followed_once_and_loops_are_skipped_by_name(tmp_path, caplog):
  root = _make_folder(tmp_path / 'data')
  cats, dogs = root / 'train' / 'cats', root / 'train' / 'dogs'
  (cats / 'loop').symlink_to('..')                  # back up to the split: dogs as cats
  (cats / 'self').symlink_to('.')
  (dogs / 'deeper').mkdir()
  _write(dogs / 'deeper' / 'extra.png', _small_png(999))
  (dogs / 'again').symlink_to('deeper')             # the same real folder twice
  (root / 'validation' / 'cats' / 'root').symlink_to('../..')
  config = _folder_config(root)
  with caplog.at_level(logging.WARNING, logger='absl'):
    info = pipeline.dataset_info(_spec(config))
  assert info.num_examples == {'train': 5 + 6 + 1, 'validation': 5}
  table = sources.table(_spec(config), 'train')
  names = [pathlib.Path(p).relative_to(root / 'train').as_posix() for p in table.keys]
  assert [n for n, label in zip(names, table.labels) if label == 0] == [
      f'cats/{i:03d}.png' for i in range(5)]
  assert 'Skipped 3 folder link(s)' in caplog.text and 'Skipped 1 folder link(s)' in caplog.text
  assert f'{cats}/loop -> {root}/train' in caplog.text


def test_a_resume_on_changed_training_files_is_refused_unless_allowed(tmp_path, caplog):
  from hhjax import data_listing  # pylint: disable=g-import-not-at-top
  root = _make_folder(tmp_path / 'data')
  config = _folder_config(root)
  workdir = tmp_path / 'run'
  data_listing.check_training_data(config, str(workdir))   # a run's start: recorded
  listing = json.loads((workdir / 'data_listing.json').read_text())
  assert listing['folder'] == f'{root}/train' and len(listing['files']) == 11
  assert listing['files']['cats/000.png'] == (root / 'train/cats/000.png').stat().st_size
  (workdir / 'checkpoints' / '4').mkdir(parents=True)      # as a run killed at step 4 leaves it
  data_listing.check_training_data(config, str(workdir))   # the same files: resumes
  for i in range(4):
    _write(root / 'train' / 'dogs' / f'new{i}.png', _small_png(500 + i))
  (root / 'train' / 'cats' / '001.png').unlink()
  _write(root / 'train' / 'cats' / '002.png', _small_png(777) + b'\0' * 10)
  _write(root / 'validation' / 'cats' / 'extra.png', _small_png(778))   # not training's
  with pytest.raises(errors.DataError) as raised:
    data_listing.check_training_data(config, str(workdir))
  message = str(raised.value)
  assert message.startswith(
      f'The training files in {root}/train changed since this run started (4 added '
      '(dogs/new0.png, dogs/new1.png, dogs/new2.png, ...); 1 removed (cats/001.png); 1 changed '
      'size (cats/002.png); 11 then, 14 now)')
  assert 'run again with --allow_data_change' in message and '\n' not in message
  with caplog.at_level(logging.WARNING, logger='absl'):
    data_listing.check_training_data(config, str(workdir), allow_change=True)
  assert 'going on with them as they are now (--allow_data_change)' in caplog.text
  data_listing.check_training_data(config, str(workdir))   # recorded as they are now
  assert len(json.loads((workdir / 'data_listing.json').read_text())['files']) == 14


def test_a_file_corrupted_in_place_with_its_size_and_time_kept_is_named(tmp_path):
  root = _make_folder(tmp_path / 'data')
  config = _folder_config(root)
  assert pipeline.dataset_info(_spec(config)).num_examples['train'] == 11   # checked: all decode
  victim = root / 'train' / 'dogs' / '003.png'
  data, stat = victim.read_bytes(), victim.stat()
  victim.write_bytes(data[:60] + bytes(len(data) - 60))   # same size: garbage past the header
  os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  ds = pipeline.create_dataset(_spec(config), 'train', process_count=1, process_index=0)
  with pytest.raises(tf.errors.InvalidArgumentError) as raised:
    for _ in ds.take(10):
      pass
  error = sources.changed_file_error(_spec(config), raised.value)
  message = str(error)
  assert message.startswith(f'1 file(s) of {root}/train no longer decode, though they did when '
                            f'checked (changed in place with their size and modification time '
                            f'kept): {victim}: ')
  assert '--bad_files=skip' in message
  assert sources.changed_file_error(_spec(config), ValueError('something else')) is None
  bad_files._CHECKED.clear()   # a later run: its verdicts come from the verdict file
  with pytest.raises(errors.DataError, match=f'{victim}'):
    pipeline.dataset_info(_spec(config))


def test_listings_that_differ_between_processes_are_told_apart_by_count_bytes_or_names():
  same = {'files': 8, 'bytes': 5120, 'names': 1, 'sizes': 2}
  assert bad_files._listing_differences([same, dict(same)]) == []
  resized = dict(same, bytes=5130, sizes=3)
  renamed = dict(same, names=4)
  assert bad_files._listing_differences([same, resized, renamed]) == [
      'process 1 lists 8 files of 5,130 bytes, process 0 8 files of 5,120 bytes',
      'process 2 lists 8 files of 5,120 bytes, process 0 8 files of 5,120 bytes (other names or '
      'sizes)']
