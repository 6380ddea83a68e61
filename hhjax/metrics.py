"""What a run writes for people: metrics.jsonl, TensorBoard, loss/accuracy plots, confusion matrix.

`metrics.jsonl` has one JSON object per epoch:
`{"step", "epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy", ...}`.
"""

from collections.abc import Mapping, Sequence
import io
import json
import logging
import os
from typing import Any

from etils import epath
import numpy as np

METRICS_FILE = 'metrics.jsonl'


def _scalar_metadata() -> bytes:
  # What TensorBoard's tf.summary.scalar writes: a float tensor tagged for the 'scalars'
  # plugin. Written with tf.summary.write, which is in TensorFlow itself, so logging needs no
  # `tensorboard` package (viewing does).
  from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars')
  ).SerializeToString()


class _QuietOrbax(logging.Filter):
  """Drops orbax's per-save INFO lines and its warnings about expected situations."""

  _EXPECTED = ('Requested `tracked_metric`', 'CheckpointManagerOptions.read_only=True',
               'Given directory is read only')

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return False
    return not str(record.msg).startswith(self._EXPECTED)


def quiet_orbax() -> None:
  """Keeps the training log readable: orbax logs a dozen lines per checkpoint."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  for target in (absl_logging.get_absl_handler(), logging.getLogger('absl')):
    if not any(isinstance(f, _QuietOrbax) for f in target.filters):
      target.addFilter(_QuietOrbax())


def read_rows(workdir: str) -> list[dict[str, Any]]:
  """The rows of WORKDIR/metrics.jsonl (empty when absent)."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    line = line.strip()
    if line:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # A line cut short by a killed run.
  return rows


def _write_rows(workdir: str, rows: Sequence[Mapping[str, Any]]) -> None:
  # The whole (small) file is rewritten through a temporary name: no half-written file after a
  # kill, and it works on object stores (gs://), which cannot append.
  path = epath.Path(workdir) / METRICS_FILE
  tmp = path.parent / (METRICS_FILE + '.tmp')
  tmp.write_text(''.join(json.dumps(dict(r)) + '\n' for r in rows))
  tmp.replace(path)


class MetricsWriter:
  """Adds epoch rows to metrics.jsonl and TensorBoard (only where `enabled`)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None

  def truncate_after(self, step: int) -> None:
    """Drops rows past `step`: a resumed run rewrites what followed its checkpoint."""
    if not self.enabled:
      return
    rows = read_rows(self.workdir)
    kept = [r for r in rows if r.get('step', 0) <= step]
    if kept != rows:
      _write_rows(self.workdir, kept)

  def _writer(self):
    if self._tb is None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(os.path.join(self.workdir, 'tensorboard'))
    return self._tb

  def write(self, row: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    _write_rows(self.workdir, read_rows(self.workdir) + [dict(row)])
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    metadata = _scalar_metadata()
    with self._writer().as_default(step=int(row['step'])):
      for key, value in row.items():
        if key.startswith(('train_', 'val_')) or key == 'learning_rate':
          split, _, name = key.partition('_')
          tag = f'{split}/{name}' if key != 'learning_rate' else 'learning_rate'
          tf.summary.write(tag, tf.constant(float(value), tf.float32), metadata=metadata)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def plot_history(rows: Sequence[Mapping[str, Any]], workdir: str) -> list[str]:
  """Writes loss.png and accuracy.png (train vs validation per epoch), as the seed plots."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  if not rows:
    return []
  epochs = [r['epoch'] for r in rows]
  boundaries = [r['epoch'] - 0.5 for prev, r in zip(rows, rows[1:])
                if r['phase'] != prev['phase']]
  paths = []
  for name, title in (('accuracy', 'Training and validation accuracy'),
                      ('loss', 'Training and validation loss')):
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(epochs, [r[f'train_{name}'] for r in rows], 'r', marker='o', ms=3,
            label=f'Training {name}')
    ax.plot(epochs, [r[f'val_{name}'] for r in rows], 'b', marker='o', ms=3,
            label=f'Validation {name}')
    for x in boundaries:
      ax.axvline(x, color='gray', ls=':', lw=1)
      ax.text(x, ax.get_ylim()[1], ' fine-tuning', va='top', ha='left', fontsize=8,
              color='gray')
    ax.set_title(title)
    ax.set_xlabel('epoch')
    ax.set_ylabel(name)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    plt.close(fig)
    path = epath.Path(workdir) / f'{name}.png'
    path.write_bytes(buffer.getvalue())
    paths.append(str(path))
  return paths


def format_confusion(matrix: np.ndarray, class_names: Sequence[str]) -> str:
  """A text confusion matrix: rows are true classes, columns predicted ones."""
  matrix = np.asarray(matrix).astype(int)
  names = [str(n) for n in class_names]
  corner = 'true \\ predicted'
  first = max([len(n) for n in names] + [len(corner)]) + 2
  width = max([len(n) for n in names] + [len(str(matrix.max()))]) + 2
  lines = [corner.ljust(first) + ''.join(n.rjust(width) for n in names)]
  for name, row in zip(names, matrix):
    lines.append(name.ljust(first) + ''.join(str(v).rjust(width) for v in row))
  return '\n'.join(lines)
