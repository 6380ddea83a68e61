"""TensorBoard as hhjax.metrics writes it: progress points every few steps, epoch points, the
config as hyperparameters, and a resume that leaves exactly the points of an uninterrupted run.
The event files are read back with TensorBoard's own EventAccumulator."""

import glob
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
import tensorflow as tf

from hhjax import metrics

CONFIG = {'batch_size': 4, 'model': {'cut': 'mixed0', 'pretrained': None},
          'warmup': {'param_labels': [['^head/', 'train']], 'learning_rate': 0.01},
          'data': {'augment': {'enabled': True}}}


def _progress(step):
  return {'step': step, 'loss': 1.0 / step, 'accuracy': step / 100.0, 'learning_rate': 0.01}


def _epoch(step):
  return {'step': step, 'epoch': step // 10, 'phase': 'warmup', 'train_loss': 0.5 / step,
          'train_accuracy': 0.5, 'val_loss': 0.25, 'val_accuracy': 0.75, 'val_f1_macro': 0.7,
          'val_roc_auc': None, 'learning_rate': 0.01}


def _run(workdir, start, end, resume_from=None):
  """Steps start+1..end as the training loop writes them: a progress row every 5 steps, an
  epoch row every 10; a resume first truncates after its checkpoint."""
  writer = metrics.MetricsWriter(str(workdir))
  writer.truncate_after(resume_from or 0)
  writer.write_hparams(CONFIG)
  for step in range(start + 1, end + 1):
    if step % 5 == 0:
      writer.write_progress(_progress(step))
    if step % 10 == 0:
      writer.write(_epoch(step))
  return writer


def _points(workdir):
  """(tag, step, value) of every point in the event files, sorted; duplicates kept."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      out += [(v.tag, event.step, tf.make_ndarray(v.tensor).tolist())
              for v in event.summary.value]
  return sorted(out)


def _accumulator(workdir):
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, 'tensorboard'),
                                           size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return acc


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  _run(workdir, 0, 30).close()
  return workdir


def test_progress_points_every_few_steps_and_epoch_points_per_epoch(uninterrupted):
  acc = _accumulator(str(uninterrupted))
  for tag in ('train_steps/loss', 'train_steps/accuracy', 'train_steps/learning_rate'):
    assert [e.step for e in acc.Tensors(tag)] == [5, 10, 15, 20, 25, 30]
  loss = [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors('train_steps/loss')]
  np.testing.assert_allclose(loss, [1 / s for s in (5, 10, 15, 20, 25, 30)], rtol=1e-6)
  for tag in ('train/loss', 'val/accuracy', 'val/f1_macro', 'learning_rate'):
    assert [e.step for e in acc.Tensors(tag)] == [10, 20, 30]
  assert 'val/roc_auc' not in acc.Tags()['tensors']   # undefined: no point, no crash
  assert acc.SummaryMetadata('train_steps/loss').plugin_data.plugin_name == 'scalars'


def test_the_config_is_written_once_as_hyperparameters(uninterrupted):
  acc = _accumulator(str(uninterrupted))
  content = acc.PluginTagToContent('hparams')
  assert list(content) == ['_hparams_/session_start_info']
  data = plugin_data_pb2.HParamsPluginData.FromString(content['_hparams_/session_start_info'])
  hparams = {k: v for k, v in data.session_start_info.hparams.items()}
  assert hparams['batch_size'].number_value == 4
  assert hparams['model.cut'].string_value == 'mixed0'
  assert hparams['data.augment.enabled'].bool_value is True
  assert hparams['model.pretrained'].string_value == 'null'
  assert hparams['warmup.param_labels'].string_value == '[["^head/", "train"]]'
  assert len(acc.Tensors('_hparams_/session_start_info')) == 1


def test_a_resume_leaves_exactly_the_points_of_an_uninterrupted_run(tmp_path, uninterrupted):
  # Killed at step 27 after a checkpoint at step 15: its points past 15 are written again.
  _run(tmp_path, 0, 27)   # never closed, as a killed run
  _run(tmp_path, 15, 30, resume_from=15).close()
  assert _points(tmp_path) == _points(uninterrupted)


def test_a_resume_after_a_record_cut_short_keeps_the_points_before_it(tmp_path, uninterrupted):
  _run(tmp_path, 0, 20).close()
  (path,) = glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
  with open(path, 'ab') as f:   # half a record, as a kill in the middle of a write leaves
    f.write(b'\x30\x00\x00\x00\x00\x00\x00\x00\x12')
  _run(tmp_path, 20, 30, resume_from=20).close()
  assert _points(tmp_path) == _points(uninterrupted)


def test_a_resume_with_nothing_past_its_checkpoint_rewrites_nothing(tmp_path):
  _run(tmp_path, 0, 20).close()
  before = glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*'))
  metrics.MetricsWriter(str(tmp_path)).truncate_after(20)
  assert glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*')) == before
