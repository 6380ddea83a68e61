"""What a run writes for people: metrics.jsonl, TensorBoard, loss/accuracy plots, confusion matrix.

`metrics.jsonl` has one JSON object per epoch:
`{"step", "epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
"learning_rate", "time"}` and the validation metrics of hhjax.eval_metrics (`val_f1_macro`,
`val_roc_auc`, `val_ece`, `val_f1/<class>`, ...); "time" is the run's wall-clock seconds up to
that row, summed over resumes (rows written before it existed lack it).

TensorBoard (WORKDIR/tensorboard/) shows
- the same rows, one point per epoch: `train/loss`, `val/accuracy`, `val/f1_macro`, ...;
- the progress rows of hhjax.training.step_log every config.log_every_steps steps:
  `train_steps/loss`, `train_steps/accuracy`, `train_steps/learning_rate` (every number a
  progress row holds);
- the run's config as hyperparameters (the hparams plugin's table), each field '.'-joined.

metrics.jsonl is the record of the epoch rows; the progress points and the hyperparameters
live in the event files alone. On a resume the event files are rebuilt when they hold points
past the checkpoint (or miss epoch rows): epoch points from metrics.jsonl, progress points and
hyperparameters copied from the old files up to the checkpoint's step, so that a step repeated
after a checkpoint never shows twice and every step before it stays as it was.

TensorFlow is imported on first use (`_tf`): reading rows and plotting (`python -m
hhjax.compare`) need none, and it takes seconds to load.
"""

from collections.abc import Mapping, Sequence
import json
import os
import time
from typing import Any

from absl import logging
from etils import epath
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
import numpy as np

from hhjax import files

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
PROGRESS_TAGS = 'train_steps/'   # the progress rows' tags: train_steps/loss, ...
HPARAMS_TAGS = '_hparams_/'      # the hparams plugin's own tags


def _tf():
  """TensorFlow, imported on first use (see the module docstring)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf


def _scalar_metadata() -> bytes:
  # What TensorBoard's tf.summary.scalar writes: a float tensor tagged for the 'scalars'
  # plugin. Written with tf.summary.write, which is in TensorFlow itself.
  from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
  return summary_pb2.SummaryMetadata(
      plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars')
  ).SerializeToString()


def read_rows(workdir: str) -> list[dict[str, Any]]:
  """The rows of WORKDIR/metrics.jsonl (empty when absent)."""
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  return parse_rows(path.read_text(), str(path))


def parse_rows(text: str, where: str) -> list[dict[str, Any]]:
  """The JSON object rows of a metrics.jsonl text; other lines are left out with a warning.

  A line cut short (a file an older version appended to when its run was killed) or edited
  by hand is named by its number, so that a curve with a missing epoch is explained.
  """
  rows, bad = [], []
  for number, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line:
      continue
    try:
      row = json.loads(line)
    except ValueError:
      row = None
    if isinstance(row, dict):
      rows.append(row)
    else:
      bad.append(f'line {number}: {line[:40]!r}')
  if bad:
    logging.warning('Left out %d line(s) of %s that are not JSON rows (%s%s); the other %d '
                    'rows are used.', len(bad), where, '; '.join(bad[:3]),
                    '; ...' if len(bad) > 3 else '', len(rows))
  return rows


def _write_rows(workdir: str, rows: Sequence[Mapping[str, Any]]) -> None:
  # The whole (small) file is rewritten: object stores (gs://) cannot append.
  files.write_atomic(epath.Path(workdir) / METRICS_FILE,
                     ''.join(json.dumps(dict(r)) + '\n' for r in rows))


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _scalars(row: Mapping[str, Any]) -> list[tuple[str, float]]:
  """(TensorBoard tag, value) of a row: 'train/loss', 'val/accuracy', 'learning_rate', ...
  (fields that are not numbers, such as an undefined metric's None, have none)."""
  out = []
  for key, value in row.items():
    if not _is_number(value):
      continue
    if key.startswith(('train_', 'val_', 'test_')) or key == 'learning_rate':
      split, _, name = key.partition('_')
      out.append((f'{split}/{name}' if key != 'learning_rate' else 'learning_rate',
                  float(value)))
  return out


def _progress_scalars(row: Mapping[str, Any]) -> list[tuple[str, float]]:
  """(tag, value) of a progress row: 'train_steps/<field>' for each number but the step."""
  return [(PROGRESS_TAGS + key, float(value)) for key, value in row.items()
          if key != 'step' and _is_number(value)]


def _hparams(config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
  """The config's fields as hparams values ('a.b': value); lists, tuples and None as JSON."""
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      if isinstance(value, Mapping):
        visit(value, f'{prefix}{key}.')
      elif isinstance(value, (bool, int, float, str)):
        flat[f'{prefix}{key}'] = value
      else:
        flat[f'{prefix}{key}'] = json.dumps(value)

  visit(config, '')
  return flat


def _event_files(workdir: str) -> list[str]:
  return sorted(_tf().io.gfile.glob(os.path.join(workdir, TENSORBOARD_DIR, 'events.out.tfevents.*')))


def _tensorboard_events(workdir: str) -> tuple[list[tuple[str, int, Any]], bool]:
  """((tag, step, Summary.Value) of every point in WORKDIR/tensorboard, in file order; whether
  every file read to its end). A record cut short by a killed run ends its file's points."""
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  tf = _tf()
  points, whole = [], True
  for path in _event_files(workdir):
    try:
      for record in tf.data.TFRecordDataset(path):
        event = event_pb2.Event.FromString(record.numpy())
        points += [(v.tag, int(event.step), v) for v in event.summary.value]
    except tf.errors.OpError:
      whole = False
  return points, whole


class MetricsWriter:
  """Adds epoch rows to metrics.jsonl and TensorBoard (only where `enabled`).

  Each row gets "time": seconds since this writer was made (the run's start), plus the time of
  the last row kept by `truncate_after` when a run resumes.
  """

  def __init__(self, workdir: str, enabled: bool = True, start: float | None = None):
    """`start`: the run's start as `time.monotonic()` (default: now)."""
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    self._start = time.monotonic() if start is None else start
    self._time_before = 0.0   # a resumed run's time up to its last kept row
    self._has_hparams = None  # whether the event files hold the hyperparameters (None: unread)

  def truncate_after(self, step: int) -> None:
    """Drops rows past `step`: a resumed run rewrites what followed its checkpoint.

    TensorBoard's events are brought in line with the rows kept (rebuilt when they differ:
    event files cannot be cut), so each step keeps one point per tag: the epoch points of the
    rows kept, and the progress points and hyperparameters up to `step`.
    """
    if not self.enabled:
      return
    rows = read_rows(self.workdir)
    kept = [r for r in rows if r.get('step', 0) <= step]
    self._time_before = float(kept[-1].get('time', 0.0)) if kept else 0.0
    if kept != rows:
      _write_rows(self.workdir, kept)
    points, whole = _tensorboard_events(self.workdir)
    copied = {}   # (tag, step) -> the last Summary.Value of each progress point and hparams
    for tag, at, value in points:
      if tag.startswith(HPARAMS_TAGS) or (tag.startswith(PROGRESS_TAGS) and at <= step):
        copied[(tag, at)] = value
    self._has_hparams = any(tag.startswith(HPARAMS_TAGS) for tag, _ in copied)
    want = sorted([(tag, int(r['step'])) for r in kept for tag, _ in _scalars(r)]
                  + list(copied))
    if not whole or sorted((tag, at) for tag, at, _ in points) != want:
      self._rebuild_tensorboard(kept, copied)

  def _rebuild_tensorboard(self, rows: Sequence[Mapping[str, Any]],
                           copied: Mapping[tuple[str, int], Any]) -> None:
    # The new file is complete before the old ones go: a kill in between leaves duplicates,
    # which the next resume finds and rebuilds again, rather than lost points.
    from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
    tf = _tf()
    old = _event_files(self.workdir)
    self.close()
    # In step order, as a run writes them: TensorBoard reads a step lower than the one
    # before as a restart and drops the tag's later points.
    writes = [(at, 0, tag, value) for (tag, at), value in copied.items()]
    writes += [(int(row['step']), 1, '', row) for row in rows]
    metadata = _scalar_metadata()
    for at, kind, tag, value in sorted(writes, key=lambda w: (w[0], w[1], w[2])):
      if kind == 1:
        self._write_tensorboard(value)
        continue
      with self._writer().as_default(step=at):
        if tag.startswith(PROGRESS_TAGS):   # as write_progress wrote it, the same float32
          tf.summary.write(tag, tf.constant(tf.make_ndarray(value.tensor), tf.float32),
                           metadata=metadata)
        else:
          tf.summary.experimental.write_raw_pb(
              summary_pb2.Summary(value=[value]).SerializeToString(), step=at)
    if self._tb is not None:
      self._tb.flush()
    for path in old:
      tf.io.gfile.remove(path)

  def _writer(self):
    if self._tb is None:
      self._tb = _tf().summary.create_file_writer(os.path.join(self.workdir, TENSORBOARD_DIR))
    return self._tb

  def _write_tensorboard(self, row: Mapping[str, Any]) -> None:
    tf = _tf()
    metadata = _scalar_metadata()
    with self._writer().as_default(step=int(row['step'])):
      for tag, value in _scalars(row):
        tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata)

  def write_progress(self, row: Mapping[str, Any]) -> None:
    """A progress row of hhjax.training.step_log at its 'step', flushed at once: a checkpoint
    saved after it must find it on disk, or a resume from there would miss it."""
    if not self.enabled:
      return
    tf = _tf()
    metadata = _scalar_metadata()
    with self._writer().as_default(step=int(row['step'])):
      for tag, value in _progress_scalars(row):
        tf.summary.write(tag, tf.constant(value, tf.float32), metadata=metadata)
    self._tb.flush()

  def write_hparams(self, config: Mapping[str, Any]) -> None:
    """The run's config (plain values, nested) as TensorBoard hyperparameters, unless the
    event files have them already (a resumed run keeps those of its start)."""
    if not self.enabled:
      return
    if self._has_hparams is None:
      points, _ = _tensorboard_events(self.workdir)
      self._has_hparams = any(tag.startswith(HPARAMS_TAGS) for tag, _, _ in points)
    if self._has_hparams:
      return
    from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
    with self._writer().as_default(step=0):
      hp.hparams(_hparams(config))
    self._tb.flush()
    self._has_hparams = True

  def write(self, row: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = dict(row, time=round(self._time_before + time.monotonic() - self._start, 1))
    _write_rows(self.workdir, read_rows(self.workdir) + [row])
    self._write_tensorboard(row)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _epoch_axis(ax, epochs: Sequence[int]) -> None:
  """Whole epochs only, for 1 epoch as for 1,000: half an epoch of margin, integer ticks."""
  ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
  ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins='auto', min_n_ticks=1))


def _value_axis(ax, values: Sequence[float]) -> None:
  """Plain tick labels (no offset such as `1e-5+6.93e-1`) over a span wide enough to read."""
  finite = [v for v in values if np.isfinite(v)]
  if finite and max(finite) - min(finite) < 1e-3:
    middle = (max(finite) + min(finite)) / 2
    half = max(5e-3, abs(middle) * 0.01)
    ax.set_ylim(middle - half, middle + half)
  ax.ticklabel_format(axis='y', style='plain', useOffset=False)


def _phase_markers(ax, boundaries: Sequence[float]) -> None:
  """A dotted line where fine-tuning starts, its label inside the axes on the roomier side."""
  left, right = ax.get_xlim()
  for x in boundaries:
    on_left = (x - left) / (right - left) > 0.6
    ax.axvline(x, color='gray', ls=':', lw=1)
    ax.text(x, 0.98, 'fine-tuning ' if on_left else ' fine-tuning', va='top',
            ha='right' if on_left else 'left', transform=ax.get_xaxis_transform(), fontsize=8,
            color='gray', clip_on=True)


def history_figures(rows: Sequence[Mapping[str, Any]], run: str) -> list[tuple[str, Figure]]:
  """('accuracy' | 'loss', figure) of train vs validation per epoch, titled with `run`."""
  epochs = [r['epoch'] for r in rows]
  boundaries = [r['epoch'] - 0.5 for prev, r in zip(rows, rows[1:])
                if r['phase'] != prev['phase']]
  figures = []
  for name, title in (('accuracy', 'Training and validation accuracy'),
                      ('loss', 'Training and validation loss')):
    # No pyplot: no global figure state, no GUI backend. Constrained layout keeps the legend,
    # below the axes, off the curves.
    fig = Figure(figsize=(6.4, 4.8), layout='constrained')
    ax = fig.subplots()
    marker = {'marker': 'o', 'ms': 3} if len(rows) <= 100 else {}
    train, val = [r[f'train_{name}'] for r in rows], [r[f'val_{name}'] for r in rows]
    ax.plot(epochs, train, 'r', label=f'Training {name}', **marker)
    ax.plot(epochs, val, 'b', label=f'Validation {name}', **marker)
    _epoch_axis(ax, epochs)
    _value_axis(ax, train + val)
    _phase_markers(ax, boundaries)
    ax.set_title(f'{title}\n{run}', fontsize=11)
    ax.set_xlabel('epoch')
    ax.set_ylabel(name)
    ax.grid(alpha=0.3)
    fig.legend(loc='outside lower center', ncol=2, fontsize=9, frameon=False)
    figures.append((name, fig))
  return figures


def plot_history(rows: Sequence[Mapping[str, Any]], workdir: str) -> list[str]:
  """Writes loss.png and accuracy.png (train vs validation per epoch), as the seed plots, each
  titled with the run (the workdir's name)."""
  if not rows:
    return []
  run = epath.Path(workdir).name
  return [str(files.write_png(epath.Path(workdir) / f'{name}.png', fig))
          for name, fig in history_figures(rows, run)]


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
