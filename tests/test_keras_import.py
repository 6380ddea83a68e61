"""Reading Keras files: names not trusted, every failure explained, downloads cached, orbax."""

import hashlib
import pathlib
import random
import re
import socket
import subprocess
import sys
import urllib.error

import h5py
import jax
import numpy as np
import pytest

from hhjax import errors
from hhjax.errors import KerasWeightsError, WeightsDownloadError
from hhjax.weights import keras_h5
from hhjax.weights import official
from hhjax.weights import pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1]


def assert_same_variables(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope='module')
def notop(keras_notop_h5):
  return keras_h5.load_h5(keras_notop_h5)


def decode(values) -> list[str]:
  return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def rewrite(src: pathlib.Path, dst: pathlib.Path, *, rename=lambda name: name,
            layer_names=None, change=None) -> pathlib.Path:
  """Copies a weights-only Keras file through h5py, renaming layers and editing arrays.

  Layer groups are written in shuffled order: only the `layer_names` attribute orders them.
  """
  with h5py.File(src, 'r') as f_in, h5py.File(dst, 'w') as f_out:
    for key, value in f_in.attrs.items():
      f_out.attrs[key] = value
    names = decode(f_in.attrs['layer_names'])
    names = layer_names(names) if layer_names else names
    shuffled = list(names)
    random.Random(0).shuffle(shuffled)
    for name in shuffled:
      new = rename(name)
      group = f_out.create_group(new)
      weight_names = []
      for weight_name in decode(f_in[name].attrs['weight_names']):
        layer_part, rest = weight_name.split('/', 1)
        new_weight_name = f'{rename(layer_part)}/{rest}'
        value = np.asarray(f_in[name][weight_name])
        group[new_weight_name] = change(name, weight_name, value) if change else value
        weight_names.append(new_weight_name.encode())
      group.attrs['weight_names'] = np.array(weight_names, dtype='S')
    f_out.attrs['layer_names'] = np.array([rename(n).encode() for n in names], dtype='S')
  return dst


def one_indexed(name: str) -> str:
  """Keras 2.0's names, the official files': conv2d -> conv2d_1, conv2d_1 -> conv2d_2, ..."""
  match = re.fullmatch(r'(conv2d|batch_normalization|activation|max_pooling2d|'
                       r'average_pooling2d)(?:_(\d+))?', name)
  if not match:
    return name
  return f'{match.group(1)}_{int(match.group(2) or 0) + 1}'


# --------------------------------------------------------------------------------- reading


def test_file_renamed_to_official_one_indexed_style_loads_the_same(keras_notop_h5, notop,
                                                                    tmp_path):
  path = rewrite(keras_notop_h5, tmp_path / 'official_style.h5', rename=one_indexed)
  with h5py.File(path) as f:
    assert decode(f.attrs['layer_names'])[1] == 'conv2d_1'
    assert decode(f['conv2d_1'].attrs['weight_names']) == ['conv2d_1/kernel:0']
  model, variables = keras_h5.load_h5(path)
  assert (model.final_endpoint, model.include_top) == ('mixed10', False)
  assert_same_variables(variables, notop[1])


def test_load_h5_pairs_layers_by_position_in_keras_depth_order(keras_notop_h5, notop):
  order = keras_h5.keras_layer_order()
  with h5py.File(keras_notop_h5) as f:
    names = [n for n in decode(f.attrs['layer_names']) if len(f[n].attrs['weight_names'])]
    # Depth order: after the stem, the first layer with weights is mixed0's 3x3dbl 1x1 conv.
    assert order[10] == 'mixed0/branch3x3dbl_1/conv'
    kernel = f[names[10]][decode(f[names[10]].attrs['weight_names'])[0]]
    np.testing.assert_array_equal(
        notop[1]['params']['mixed0']['branch3x3dbl_1']['conv']['kernel'], kernel)
    beta, mean, var = (np.asarray(f[names[-1]][w]) for w in
                       decode(f[names[-1]].attrs['weight_names']))
  assert order[-1] == 'mixed10/branch_pool/bn'
  bn_params = notop[1]['params']['mixed10']['branch_pool']['bn']
  bn_stats = notop[1]['batch_stats']['mixed10']['branch_pool']['bn']
  np.testing.assert_array_equal(bn_params['bias'], beta)
  np.testing.assert_array_equal(bn_stats['mean'], mean)
  np.testing.assert_array_equal(bn_stats['var'], var)


def test_missing_file_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='No Keras weights file'):
    keras_h5.load_h5(tmp_path / 'nothing.h5')


def test_non_hdf5_file_is_refused_saying_what_it_is(tmp_path):
  path = tmp_path / 'weights.h5'
  path.write_bytes(b'PK\x03\x04 a zip archive, not HDF5')
  with pytest.raises(KerasWeightsError, match=r"not an HDF5 file \(it starts with b'PK"):
    keras_h5.load_h5(path)


def test_truncated_file_is_refused_as_truncated_or_corrupt(keras_notop_h5, tmp_path):
  path = tmp_path / 'truncated.h5'
  data = keras_notop_h5.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(KerasWeightsError, match='truncated or corrupt'):
    keras_h5.load_h5(path)


def test_corrupt_file_is_refused_naming_the_layer(keras_notop_h5, tmp_path):
  with h5py.File(keras_notop_h5) as f:
    name = [n for n in decode(f.attrs['layer_names']) if len(f[n].attrs['weight_names'])][100]
    weight_name = decode(f[name].attrs['weight_names'])[0]
    header = h5py.h5o.get_info(f[name][weight_name].id).addr
  data = bytearray(keras_notop_h5.read_bytes())
  data[header:header + 64] = b'\xff' * 64  # the dataset's object header
  path = tmp_path / 'corrupt.h5'
  path.write_bytes(bytes(data))
  with pytest.raises(KerasWeightsError, match=f'corrupt: layer "{name}"'):
    keras_h5.load_h5(path)


def test_other_architecture_is_refused_at_first_mismatching_layer(tmp_path):
  import tf_keras  # pylint: disable=g-import-not-at-top
  # Starts like InceptionV3 (3x3x3x32 conv, BatchNorm without scale), then differs.
  model = tf_keras.Sequential([
      tf_keras.Input((75, 75, 3)),
      tf_keras.layers.Conv2D(32, 3, strides=2, use_bias=False, name='stem_conv'),
      tf_keras.layers.BatchNormalization(scale=False, name='stem_bn'),
      tf_keras.layers.Conv2D(16, 3, use_bias=False, name='other_conv'),
      tf_keras.layers.GlobalAveragePooling2D(),
      tf_keras.layers.Dense(10, name='classifier'),
  ])
  path = tmp_path / 'other.h5'
  model.save_weights(str(path))
  with pytest.raises(KerasWeightsError) as error:
    keras_h5.load_h5(path)
  message = str(error.value)
  assert 'does not hold Keras InceptionV3 weights' in message
  assert 'the file has 4' in message
  assert 'layer #2 "other_conv" (other_conv/kernel:0 (3, 3, 32, 16))' in message
  assert 'stem/conv_2a_3x3/conv (kernel (3, 3, 32, 32))' in message


def test_file_missing_its_last_layer_says_where_it_ends(keras_notop_h5, tmp_path):
  last_bn = keras_h5.keras_layer_order()[-1]
  with h5py.File(keras_notop_h5) as f:
    weighted = [n for n in decode(f.attrs['layer_names']) if len(f[n].attrs['weight_names'])]
  path = rewrite(keras_notop_h5, tmp_path / 'short.h5',
                 layer_names=lambda names: [n for n in names if n != weighted[-1]])
  with pytest.raises(KerasWeightsError, match=f"the file has 187. The file ends before "
                                              f"InceptionV3's layer #187, {last_bn} "):
    keras_h5.load_h5(path)


def test_negative_moving_variance_is_refused(keras_notop_h5, tmp_path):
  def negate_variances(name, weight_name, value):
    return -value if 'moving_variance' in weight_name and name.endswith('_40') else value

  path = rewrite(keras_notop_h5, tmp_path / 'negative.h5', change=negate_variances)
  with pytest.raises(KerasWeightsError, match='"batch_normalization_40".*negative moving '
                                              'variance'):
    keras_h5.load_h5(path)


def test_hdf5_file_without_legacy_layout_is_refused_with_a_way_out(tmp_path):
  import keras  # pylint: disable=g-import-not-at-top
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  path = tmp_path / 'model.weights.h5'
  model.save_weights(str(path))  # Keras 3's own format, keyed by names
  with pytest.raises(KerasWeightsError, match=r"expected the attribute \"layer_names\".*"
                                              r"Keras 3's '.weights.h5' format.*model.save"):
    keras_h5.load_h5(path)


# ---------------------------------------------------------------------- converted folders


def test_save_and_load_converted_round_trip_with_metadata(notop, tmp_path):
  model, variables = keras_h5.cut(*notop, 'mixed5')
  out = pretrained.save_converted(tmp_path / 'converted', model, variables)
  loaded_model, loaded = pretrained.load_converted(out)
  assert loaded_model == model
  assert_same_variables(loaded, variables)
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(loaded))
  with pytest.raises(FileExistsError, match='exists already'):
    pretrained.save_converted(out, model, variables)


def test_converter_command_writes_a_folder_load_pretrained_reads(keras_notop_h5, notop,
                                                                   tmp_path, capsys):
  out = tmp_path / 'inception_v3_notop'
  pretrained.main(['--h5', str(keras_notop_h5), '--out', str(out)])
  assert 'InceptionV3 up to mixed10, without top, 21,802,784 values' in capsys.readouterr().out
  model, variables = pretrained.load_pretrained(out)
  assert model == notop[0]
  assert_same_variables(variables, notop[1])
  with pytest.raises(SystemExit) as exit_:
    pretrained.main(['--h5', __file__, '--out', str(tmp_path / 'other')])
  assert exit_.value.code == errors.EXIT_USER_ERROR
  assert re.match('error: .*not an HDF5 file', capsys.readouterr().err)


def test_load_converted_refuses_other_folders(tmp_path):
  with pytest.raises(KerasWeightsError, match='not a converted weights folder'):
    pretrained.load_converted(tmp_path)


def test_load_pretrained_cuts_at_final_endpoint(keras_notop_h5):
  model, variables = pretrained.load_pretrained(keras_notop_h5, final_endpoint='mixed7')
  assert (model.final_endpoint, model.include_top) == ('mixed7', False)
  assert set(variables['params']) == {'stem'} | {f'mixed{i}' for i in range(8)}


def test_load_pretrained_unknown_spec_says_what_is_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match="expected 'imagenet' or 'imagenet_top', a Keras "
                                              r'.h5 file or a converted folder'):
    pretrained.load_pretrained(str(tmp_path / 'missing.h5'))


def test_reading_needs_neither_tensorflow_nor_keras(keras_notop_h5, tmp_path):
  script = f'''
import sys
from hhjax.weights import keras_h5
from hhjax.weights import pretrained
model, variables = keras_h5.load_h5({str(keras_notop_h5)!r})
pretrained.save_converted({str(tmp_path / 'c')!r}, model, variables)
pretrained.load_pretrained({str(tmp_path / 'c')!r})
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras'))
assert not loaded, loaded
'''
  subprocess.run([sys.executable, '-c', script], check=True, cwd=ROOT)


# ----------------------------------------------------------------- official weights, cache


def md5(path: pathlib.Path) -> str:
  return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def offline_official(monkeypatch, tmp_path, keras_notop_h5):
  """'imagenet' served from a local file:// URL, with a private cache and Keras home."""
  monkeypatch.setenv(official.CACHE_DIR_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras_home'))
  weights = official.WeightsFile(url=keras_notop_h5.as_uri(), md5=md5(keras_notop_h5),
                                 size=keras_notop_h5.stat().st_size, include_top=False)
  monkeypatch.setitem(official.OFFICIAL_WEIGHTS, 'imagenet', weights)
  return weights, tmp_path / 'cache' / 'keras' / weights.filename


def refuse(*args, **kwargs):
  raise AssertionError('must not be called')


def test_imagenet_is_downloaded_verified_once_and_reused(offline_official, notop, monkeypatch):
  weights, dest = offline_official
  opened = []
  real_urlopen = official._urlopen
  monkeypatch.setattr(official, '_urlopen',
                      lambda url, timeout: opened.append(url) or real_urlopen(url,
                                                                              timeout=timeout))
  model, variables = pretrained.load_pretrained('imagenet')
  assert opened == [weights.url]
  assert md5(dest) == weights.md5
  assert model == notop[0]
  assert_same_variables(variables, notop[1])

  # Second time: the downloaded file is read again, without the network; the download is all
  # the cache holds (no converted copy in a second format).
  monkeypatch.setattr(official, '_urlopen', refuse)
  model, again = pretrained.load_pretrained('imagenet', final_endpoint='mixed7')
  assert model.final_endpoint == 'mixed7'
  assert_same_variables(again, keras_h5.cut(*notop, 'mixed7')[1])
  assert [p.name for p in dest.parent.parent.iterdir()] == ['keras']


def test_download_without_network_fails_at_once_saying_where_to_put_the_file(
    offline_official, monkeypatch, keras_notop_h5):
  weights, dest = offline_official
  assert official.DOWNLOAD_TIMEOUT_S <= 30  # the default: short
  # A server that accepts the connection and never answers: only the timeout ends the wait.
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    url = f'http://127.0.0.1:{server.getsockname()[1]}/{weights.filename}'
    monkeypatch.setitem(official.OFFICIAL_WEIGHTS, 'imagenet',
                        official.WeightsFile(url, weights.md5, weights.size, False))
    monkeypatch.setattr(official, 'DOWNLOAD_TIMEOUT_S', 0.2)
    with pytest.raises(WeightsDownloadError) as error:
      pretrained.load_pretrained('imagenet')
  message = str(error.value)
  assert f'put it at {dest}' in message and official.CACHE_DIR_ENV in message
  assert not list(dest.parent.iterdir())  # no partial file left behind

  # Following the message works without network.
  monkeypatch.setattr(official, '_urlopen', refuse)
  dest.write_bytes(keras_notop_h5.read_bytes())
  assert pretrained.load_pretrained('imagenet')[0].final_endpoint == 'mixed10'


def test_unreachable_host_fails_with_the_hand_placement_message(offline_official, monkeypatch):
  _, dest = offline_official

  def no_network(url, timeout):
    raise urllib.error.URLError(socket.gaierror(-3, 'Temporary failure in name resolution'))

  monkeypatch.setattr(official, '_urlopen', no_network)
  with pytest.raises(WeightsDownloadError,
                     match=f'name resolution.*put it at {re.escape(str(dest))}'):
    official.fetch_official('imagenet')


def test_download_with_wrong_md5_is_refused_and_not_kept(offline_official, monkeypatch):
  weights, dest = offline_official
  monkeypatch.setitem(official.OFFICIAL_WEIGHTS, 'imagenet',
                      official.WeightsFile(weights.url, '0' * 32, weights.size, False))
  with pytest.raises(WeightsDownloadError, match=f'has MD5 {weights.md5}, expected 0000'):
    pretrained.load_pretrained('imagenet')
  assert not list(dest.parent.iterdir())


def test_hand_placed_file_with_wrong_md5_is_refused(offline_official, tmp_path):
  _, dest = offline_official
  dest.parent.mkdir(parents=True)
  dest.write_bytes(b'not the weights')
  with pytest.raises(WeightsDownloadError, match='is not the official file: its MD5'):
    pretrained.load_pretrained('imagenet')


def test_keras_own_cached_copy_is_used(offline_official, monkeypatch, keras_notop_h5, tmp_path):
  weights, _ = offline_official
  keras_copy = tmp_path / 'keras_home' / 'models' / weights.filename
  keras_copy.parent.mkdir(parents=True)
  keras_copy.write_bytes(keras_notop_h5.read_bytes())
  monkeypatch.setattr(official, '_urlopen', refuse)
  assert official.fetch_official('imagenet') == keras_copy
