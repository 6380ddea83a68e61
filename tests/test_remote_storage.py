"""Data, predict's files and weights on storage other than the local disk.

Everything a run reads goes through tf.io.gfile or etils.epath, so gs:// works as a local path
does. TensorFlow's in-memory file system `ram://` stands in for gs:// here (no network): it is
reached only through tf.io.gfile, as gs:// is, and a call that slips back to os.* or open()
fails on it. Orbax writes checkpoints through TensorStore, which has no ram://, so the workdir
stays local; gs:// workdirs go through the same epath calls as local ones.
"""

import configs.smoke as smoke
import pytest
import tensorflow as tf

from hhjax import errors
from hhjax import predict
from hhjax import train
from hhjax.data import bad_files
from hhjax.weights import pretrained

ROOT = 'ram://hhjax-test/horse-or-human'
PER_CLASS = {'train': 4, 'validation': 2}


@pytest.fixture(scope='module')
def remote_folder(real_data_dir):
  """A few real images per split and class, copied to ram:// (with a dot file to ignore)."""
  for split, count in PER_CLASS.items():
    for cls in ('horses', 'humans'):
      local = real_data_dir / split / cls
      target = f'{ROOT}/{split}/{cls}'
      tf.io.gfile.makedirs(target)
      for path in sorted(local.iterdir())[:count]:
        tf.io.gfile.copy(str(path), f'{target}/{path.name}', overwrite=True)
      with tf.io.gfile.GFile(f'{target}/.DS_Store', 'wb') as f:
        f.write(b'metadata, not an image')
  return ROOT


def _config(data_dir):
  config = smoke.get_config()
  config.data.source = 'folder'
  config.data.dir = data_dir
  config.data.validation_split, config.data.test_split = 'validation', None
  config.steps_per_epoch = 2
  config.warmup.epochs = 1
  config.finetune.epochs = 0
  config.model.hidden = 8
  return config


def test_training_and_predict_read_an_image_folder_through_gfile(remote_folder, tmp_path):
  config = _config(remote_folder)
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 2
  assert result['count'] == 2 * PER_CLASS['validation']   # the dot files were left out
  assert result['class_names'] == ['horses', 'humans']

  folder = predict.predict(config, str(tmp_path / 'run'), [f'{remote_folder}/validation'])
  pattern = predict.predict(config, str(tmp_path / 'run'),
                            [f'{remote_folder}/validation/humans/*.png'])
  assert len(folder) == 2 * PER_CLASS['validation']
  assert all(path.startswith(f'{remote_folder}/validation/') for path, _, _ in folder)
  assert [p for p, _, _ in pattern] == [p for p, _, _ in folder if '/humans/' in p]
  assert all(cls in ('horses', 'humans') and 0.5 <= prob <= 1 for _, cls, prob in folder)


def test_bad_files_on_remote_storage_get_their_reason():
  empty, text = 'ram://hhjax-test/bad/empty.png', 'ram://hhjax-test/bad/notes.jpg'
  tf.io.gfile.makedirs('ram://hhjax-test/bad')
  with tf.io.gfile.GFile(empty, 'wb') as f:
    f.write(b'')
  with tf.io.gfile.GFile(text, 'wb') as f:
    f.write(b'not an image at all')
  bad = bad_files.check_image_files([empty, text, 'ram://hhjax-test/bad/missing.png'])
  assert bad[empty] == 'empty file (0 bytes)'
  assert text in bad and bad['ram://hhjax-test/bad/missing.png'].startswith('cannot read')


def test_pretrained_weights_are_read_from_a_url():
  url = 'ram://hhjax-test/weights/inception_v3_notop.h5'
  tf.io.gfile.makedirs('ram://hhjax-test/weights')
  with tf.io.gfile.GFile(url, 'wb') as f:
    f.write(b'not HDF5 either')
  # Reaching the HDF5 check means the file was read; the message names the URL, not a copy.
  with pytest.raises(errors.KerasWeightsError, match=f'{url} is not an HDF5 file'):
    pretrained.load_pretrained(url)
  with pytest.raises(errors.DataNotFoundError, match='nothing exists there'):
    pretrained.load_pretrained('ram://hhjax-test/weights/missing.h5')
