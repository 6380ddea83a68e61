"""hhjax command line: train, evaluate, predict and preview data.

    python main.py --config=configs/smoke.py --workdir=/tmp/hhjax/smoke            # train + eval
    python main.py --workdir=/tmp/hhjax/smoke --mode=eval                           # evaluate
    python main.py --workdir=/tmp/hhjax/smoke --mode=predict --images=DIR_OR_GLOB   # classify
    python main.py --config=configs/default.py --workdir=W --mode=preview_data      # see inputs

Running the same train command again resumes from the last checkpoint in --workdir. For eval
and predict, --config is optional: the config the run saved in the workdir is used.
"""

import os
import sys

# TensorFlow feeds the input pipeline on the host only: keep it off the accelerators.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Training configuration file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'preview_data'],
                  'What to do.')
flags.DEFINE_multi_string('images', [], 'For --mode=predict: image files, folders or globs.')
flags.DEFINE_enum('checkpoint', 'latest', ['latest', 'best'],
                  'For eval and predict: the latest checkpoint or the best by validation '
                  'accuracy.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.config is None and FLAGS.mode in ('train', 'preview_data'):
    raise app.UsageError(f'--mode={FLAGS.mode} needs --config=configs/....py')
  if FLAGS.mode == 'predict' and not FLAGS.images:
    raise app.UsageError('--mode=predict needs --images=FILE_FOLDER_OR_GLOB (repeatable).')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')

  from hhjax import sharding  # pylint: disable=g-import-not-at-top
  sharding.maybe_initialize_distributed()
  from hhjax import train  # pylint: disable=g-import-not-at-top

  config = FLAGS.config if FLAGS.config is not None else train.load_config(FLAGS.workdir)

  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      train.evaluate(config, FLAGS.workdir, checkpoint=FLAGS.checkpoint)
    elif FLAGS.mode == 'predict':
      train.predict(config, FLAGS.workdir, FLAGS.images, checkpoint=FLAGS.checkpoint)
    elif FLAGS.mode == 'preview_data':
      from hhjax import preview  # pylint: disable=g-import-not-at-top
      path = preview.preview_data(config, FLAGS.workdir)
      logging.info('Wrote %s', path)
      print(path)
  except train.NonFiniteLossError as e:
    logging.error('%s', e)
    sys.exit(1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
