"""hhjax command line: train, evaluate, predict and preview data.

    python main.py --config=configs/smoke.py --workdir=/tmp/hhjax/smoke
"""

import os

# TensorFlow feeds the input pipeline on the host only: keep it off the accelerators.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'preview_data'],
                  'What to do.')
flags.DEFINE_multi_string('images', [], 'For --mode=predict: image files, folders or globs.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
  raise app.UsageError('training is not wired up yet')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
