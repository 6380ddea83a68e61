"""Pictures of an evaluation: the confusion matrix and the misclassified images.

`--mode=eval` and the final evaluation of a training run write them beside eval.json:

    WORKDIR/confusion_matrix.png   counts and shares of each true class, class names on the axes
    WORKDIR/misclassified.png      the misclassified eval images, most confident first; when none
                                   is wrong, the least confident correct ones (the title says so)
    WORKDIR/misclassified.json     every misclassified image in that order: its name, true and
                                   predicted class, and the probability of the predicted class

An example is named by its file path (image folders) or by `split[index]` (TFDS, synthetic
data). The ranking comes from the eval pass's own probabilities; only the images shown are
decoded again.
"""

from collections.abc import Mapping, Sequence
import json
import math
import os
from typing import Any

from absl import logging
from etils import epath
from matplotlib.figure import Figure
import numpy as np

from hhjax import files
from hhjax.data import pipeline
from hhjax.data import sources
from hhjax.data import spec as data_spec

CONFUSION_FILE = 'confusion_matrix.png'
EXAMPLES_FILE = 'misclassified.png'
EXAMPLES_JSON = 'misclassified.json'

# Titles wider than this overlap their neighbours at the grid's font size.
_MAX_NAME = 22


def example_names(table: sources.Table, split: str) -> list[str]:
  """One name per row of `table`: the file path, or `split[index]` where there is no file."""
  if table.kind == 'path':
    return [str(p) for p in table.keys]
  return [f'{split}[{i}]' for i in range(table.size)]


def short_name(name: str) -> str:
  """A file's base name, shortened in the middle to fit a grid cell's title."""
  name = os.path.basename(name) or name
  if len(name) <= _MAX_NAME:
    return name
  keep = _MAX_NAME - 1
  return name[:keep // 2] + '…' + name[-(keep - keep // 2):]


def rank_examples(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, bool]:
  """The examples worth looking at first, and whether every example is classified correctly.

  Args:
    probabilities: [n, classes], per example.
    labels: [n] true classes.

  Returns:
    (indices, all_correct): the misclassified examples, most confident first; when there are
    none, every example, least confident first.
  """
  predicted = np.argmax(probabilities, axis=-1)
  confidence = probabilities[np.arange(len(predicted)), predicted]
  wrong = np.flatnonzero(predicted != labels)
  if len(wrong):
    return wrong[np.argsort(-confidence[wrong], kind='stable')], False
  return np.argsort(confidence, kind='stable'), True


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
  """The confusion matrix: each cell's count and its share of the true class (its row)."""
  matrix = np.asarray(matrix).astype(int)
  n = len(class_names)
  totals = matrix.sum(axis=1)
  shares = matrix / np.maximum(totals, 1)[:, None]
  side = 2.0 + 1.0 * n
  # No pyplot: no global state, no GUI backend. The constrained layout keeps the axis labels
  # inside the figure with the colour bar beside it.
  fig = Figure(figsize=(side + 1.6, side + 0.6), layout='constrained')
  ax = fig.subplots()
  image = ax.imshow(shares, cmap='Blues', vmin=0.0, vmax=1.0)
  font = max(6.0, 12.0 - 0.5 * n)
  for i in range(n):
    for j in range(n):
      ax.text(j, i, f'{matrix[i, j]}\n{100 * shares[i, j]:.1f} %', ha='center', va='center',
              fontsize=font, color='white' if shares[i, j] > 0.5 else 'black')
  names = [str(c) for c in class_names]
  ax.set_xticks(range(n), labels=names, rotation=30 if n > 3 else 0,
                ha='right' if n > 3 else 'center')
  ax.set_yticks(range(n), labels=[f'{c}\n({t} images)' for c, t in zip(names, totals)])
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title, fontsize=10)
  fig.colorbar(image, ax=ax, label='share of the true class', shrink=0.85)
  return fig


def grid_shape(count: int, max_columns: int) -> tuple[int, int]:
  """(columns, rows) for `count` cells, at most `max_columns` wide, with rows filled evenly
  (6 images at 5 columns: 2 rows of 3, not a row of 5 and a row of 1)."""
  rows = max(1, math.ceil(count / max(1, max_columns)))
  return max(1, math.ceil(count / rows)), rows


def plot_examples(images: np.ndarray, titles: Sequence[str], colors: Sequence[str],
                  title: str, columns: int = 5) -> Figure:
  """A grid of uint8 images [k, S, S, 3], each with its (multi-line) title."""
  columns, rows = grid_shape(len(images), columns)
  fig = Figure(figsize=(2.3 * columns, 2.7 * rows + 0.6), layout='constrained')
  for k, (image, text, color) in enumerate(zip(images, titles, colors)):
    ax = fig.add_subplot(rows, columns, k + 1)
    ax.imshow(image)
    ax.set_title(text, fontsize=8.5, color=color)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():   # a thin frame: white backgrounds would run together
      spine.set_color('lightgray')
  if not len(images):
    fig.text(0.5, 0.5, 'no images', ha='center', va='center')
  fig.suptitle(title, fontsize=10)
  return fig


def _source_name(data: data_spec.DataSpec) -> str:
  """The data's name for titles: the image folder's name, the TFDS name, or 'fake'."""
  if data.source == 'folder':
    return os.path.basename(os.path.normpath(data.dir))
  return data.name if data.source == 'tfds' else data.source


def _grid_title(split: str, step: int, shown: int, wrong: int, count: int,
                all_correct: bool) -> str:
  if all_correct:
    title = (f'No {split} image is misclassified at step {step}: the {shown} least '
             'confident correct ones')
  else:
    title = (f'Misclassified {split} images at step {step}, most confident first: '
             f'{shown} of {wrong} wrong (of {count})')
  return (title + "\n(each image: its name, true class, predicted class and that class's "
          'probability)')


def _listing(order, names, labels, predicted, confidence, class_names) -> list[dict[str, Any]]:
  """misclassified.json's rows, in `order`."""
  return [{'name': names[i], 'true': str(class_names[labels[i]]),
           'predicted': str(class_names[predicted[i]]), 'probability': float(confidence[i])}
          for i in order]


def write_eval_pictures(data: data_spec.DataSpec, result: Mapping[str, Any],
                        class_names: Sequence[str], step: int, workdir: str, *,
                        is_main: bool = True, max_images: int = 20,
                        columns: int = 5, split: str | None = None) -> list[str]:
  """Writes the confusion matrix, the misclassified grid and its list into `workdir`.

  Args:
    data: the run's data (which split, and how to decode its images).
    result: an `evaluation.Evaluator` result ('confusion', 'accuracy', 'count', and per example
      'probabilities' in the split's table order).
    class_names: in label order.
    step: the evaluated checkpoint's step, for the titles.
    workdir: the folder to write into (the workdir, beside eval.json, or another
      evaluation's folder).
    is_main: whether this process draws and writes (process 0); the others only take part in
      listing the split.
    max_images: how many images the grid shows.
    columns: images per row of the grid.
    split: the evaluated split (default: the validation split, data.validation).

  Returns:
    The paths written (none when the split no longer matches the evaluation).
  """
  split = data.validation if split is None else split
  # Every process lists the split: with several processes, checking an image folder is a
  # collective step (hhjax.data.bad_files) that all of them must take. Only `is_main` draws.
  table = sources.table(data, split)
  if not is_main:
    return []
  probabilities = np.asarray(result['probabilities'])
  if table.size != len(probabilities):
    logging.warning('No evaluation pictures: %s now holds %d images, the evaluation saw %d.',
                    split, table.size, len(probabilities))
    return []
  names = example_names(table, split)
  labels = np.asarray(table.labels)
  predicted = np.argmax(probabilities, axis=-1)
  confidence = probabilities[np.arange(len(predicted)), predicted]
  order, all_correct = rank_examples(probabilities, labels)
  directory = epath.Path(workdir)
  paths = []

  fig = plot_confusion(result['confusion'], class_names,
                       f'Confusion matrix: {_source_name(data)} / {split}, step {step}\n'
                       f'accuracy {result["accuracy"]:.4f} on {result["count"]} images')
  paths.append(files.write_png(directory / CONFUSION_FILE, fig))

  shown = [int(i) for i in order[:max_images]]
  titles = [f'{short_name(names[i])}\ntrue: {class_names[labels[i]]}\n'
            f'predicted: {class_names[predicted[i]]} {confidence[i]:.3f}' for i in shown]
  fig = plot_examples(pipeline.eval_pixels(table, data, shown), titles,
                      ['darkgreen' if all_correct else 'firebrick'] * len(shown),
                      _grid_title(split, step, len(shown), len(order), len(labels), all_correct),
                      columns)
  paths.append(files.write_png(directory / EXAMPLES_FILE, fig))
  wrong = [] if all_correct else order
  paths.append(files.write_atomic(directory / EXAMPLES_JSON, json.dumps({
      'step': step, 'split': split, 'count': len(labels),
      'class_names': [str(c) for c in class_names],
      'misclassified': _listing(wrong, names, labels, predicted, confidence, class_names)},
      indent=2)))
  for path in paths:
    logging.info('Wrote %s', path)
  return [str(p) for p in paths]


CALIBRATION_FILE = 'calibration.png'


def plot_calibration(calibration: Mapping[str, Any], title: str) -> Figure:
  """The reliability diagram of `hhjax.eval_metrics.calibration`: each bin's accuracy against
  its confidence, the diagonal a perfectly calibrated model lies on, and below, the examples
  per bin."""
  lower, upper = np.asarray(calibration['lower']), np.asarray(calibration['upper'])
  count = np.asarray(calibration['count'])
  filled = count > 0
  accuracy = np.array([a if a is not None else 0.0 for a in calibration['accuracy']])
  confidence = np.array([c if c is not None else 0.0 for c in calibration['confidence']])
  width = upper - lower
  fig = Figure(figsize=(5.6, 6.4), layout='constrained')
  top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
  top.bar(lower[filled], accuracy[filled], width=width[filled], align='edge',
          color='tab:blue', edgecolor='white', label='accuracy of the bin')
  # The gap between a bin's accuracy and its mean confidence, hatched over or above the bar.
  low = np.minimum(accuracy, confidence)
  top.bar(lower[filled], np.abs(confidence - accuracy)[filled], bottom=low[filled],
          width=width[filled], align='edge', fill=False, hatch='//', edgecolor='tab:red',
          lw=0.8, label='gap to its mean confidence')
  top.plot([0, 1], [0, 1], color='gray', ls='--', lw=1, label='perfect calibration')
  top.set_xlim(0, 1)
  top.set_ylim(0, 1)
  top.set_ylabel('accuracy')
  top.set_title(f'{title}\nECE {calibration["ece"]:.4f} over {calibration["bins"]} '
                f'{calibration["binning"]}', fontsize=10)
  top.legend(loc='upper left', fontsize=8, frameon=False)
  top.grid(alpha=0.3)
  bottom.bar(lower, count, width=width, align='edge', color='gray', edgecolor='white')
  bottom.set_xlabel('confidence (probability of the predicted class)')
  bottom.set_ylabel('examples')
  return fig
