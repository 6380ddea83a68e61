"""Classifying image files with a trained workdir.

    python main.py --workdir=W --mode=predict --images=photos/ --images='more/*.jpg'

Images are decoded, resized and normalised as the eval split is; each line printed is
`path<TAB>class<TAB>probability of that class`.

A labelled folder, one whose subfolders are named after the model's classes (an image folder's
split: `--images=DIR/validation`), gives each image its true class: after the per-file lines
come the accuracy, each class's counts and the confusion matrix, as --mode=eval prints them.
"""

from collections.abc import Iterable, Sequence
import functools
import glob
import os

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from hhjax import compilation
from hhjax import entry
from hhjax import errors
from hhjax import files as files_lib
from hhjax import metrics as metrics_lib
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax.data import bad_files
from hhjax.data import decode
from hhjax.model import classifier


def _glob(pattern: str) -> list[str]:
  """Files matching `pattern`: locally with `**` across folders, elsewhere (gs://) as gfile does."""
  if files_lib.is_url(pattern):
    matches = tf.io.gfile.glob(pattern)
  else:
    matches = glob.glob(pattern, recursive=True)
  return [m for m in sorted(matches) if not tf.io.gfile.isdir(m)]


def expand_images(patterns: Iterable[str]) -> list[str]:
  """Files, folders (searched recursively for images) and globs, in a stable order.

  Local paths and URLs (gs://) alike, through tf.io.gfile.
  """
  files = []
  for pattern in patterns:
    if tf.io.gfile.isdir(pattern):
      for root, _, names in sorted(tf.io.gfile.walk(pattern)):
        files += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(decode.IMAGE_EXTENSIONS)]
    elif tf.io.gfile.exists(pattern):
      files.append(pattern)
    else:
      found = _glob(pattern)
      if not found:
        raise errors.DataNotFoundError(
            f'--images {pattern!r}: no such file, folder or glob match.')
      files += found
  if not files:
    raise errors.DataNotFoundError(f'No images found in {list(patterns)}.')
  return files


def true_classes(patterns: Sequence[str], files: Sequence[str],
                 class_names: Sequence[str]) -> list[str] | None:
  """Each file's true class when every pattern is a labelled folder (all its images in
  subfolders named after classes of the model); None otherwise."""
  labels = {}
  for pattern in patterns:
    if files_lib.is_url(pattern) or not os.path.isdir(pattern):
      return None
    root = os.path.abspath(pattern)
    for path in files:
      relative = os.path.relpath(os.path.abspath(path), root)
      if relative.startswith('..'):
        continue
      parts = relative.split(os.sep)
      if len(parts) < 2 or parts[0] not in class_names:
        return None   # an image outside the class subfolders: not a labelled folder
      labels[path] = parts[0]
  if not labels or set(labels) != set(files):
    return None
  return [labels[path] for path in files]


def labelled_summary(results: Sequence[tuple[str, str, float]], truth: Sequence[str],
                     class_names: Sequence[str]) -> str:
  """Accuracy, each class's counts and the confusion matrix of predictions with true classes."""
  index = {name: k for k, name in enumerate(class_names)}
  confusion = np.zeros((len(class_names), len(class_names)), np.int64)
  for (_, predicted, _), true in zip(results, truth):
    confusion[index[true], index[predicted]] += 1
  right = int(np.trace(confusion))
  lines = [f'accuracy {right / len(results):.4f} on {len(results)} labelled images '
           f'({right} right, {len(results) - right} wrong)']
  for k, name in enumerate(class_names):
    count, hit, said = int(confusion[k].sum()), int(confusion[k, k]), int(confusion[:, k].sum())
    lines.append(f'{name}: {count} images, {hit} right'
                 + (f' ({hit / count:.4f})' if count else '') + f', {said} predicted as {name}')
  lines.append('Confusion matrix (rows: true class, columns: predicted):')
  lines.append(metrics_lib.format_confusion(confusion, class_names))
  return '\n'.join(lines)


def predict(config: ml_collections.ConfigDict, workdir: str, images: Sequence[str],
            checkpoint: str = 'latest') -> list[tuple[str, str, float]]:
  """Classifies image files with the latest (or 'best') checkpoint in `workdir`.

  Returns:
    (path, class name, probability of that class) per image; process 0 also prints them and,
    for a labelled folder (see true_classes), the summary of labelled_summary.
  """
  workdir_lib.check_inference_config(config, workdir)
  files = bad_files.readable_files(expand_images(images), config.data.get('bad_files'),
                                   config.data.get('num_parallel_calls'))
  mesh, model, state, class_names, _ = entry.restore_for_inference(config, workdir,
                                                                      checkpoint)
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)

  @functools.partial(jax.jit, in_shardings=(repl, repl, data), out_shardings=repl)
  def predict_step(params, batch_stats, images_):
    return classifier.probabilities(
        model.apply({'params': params, 'batch_stats': batch_stats}, images_, train=False))

  predict_step = compilation.first_call_logged(predict_step, 'the prediction step')
  batch_size = entry.eval_batch_size(config)
  batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  results = []
  is_main = jax.process_index() == 0   # every process computes; one prints
  for start in range(0, len(files), batch_size):
    chunk = files[start:start + batch_size]
    arrays = np.stack([decode.load_image(path, config.data.image_size, config.data.resize_method,
                                         config.data.preprocessing, entry.eval_fraction(config))
                        for path in chunk])
    padded = np.concatenate([arrays, np.zeros((batch_size - len(chunk),) + arrays.shape[1:],
                                              arrays.dtype)])
    probs = np.asarray(jax.device_get(predict_step(
        state['params'], state['batch_stats'], jax.device_put(padded, data))))[:len(chunk)]
    for path, p in zip(chunk, probs):
      k = int(np.argmax(p))
      results.append((path, class_names[k], float(p[k])))
      if is_main:
        print(f'{path}\t{class_names[k]}\t{p[k]:.4f}', flush=True)
  truth = true_classes(images, files, class_names)
  if truth is not None and is_main:
    print(labelled_summary(results, truth, class_names), flush=True)
  return results
