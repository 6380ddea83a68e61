"""Classifying image files with a trained workdir.

    python main.py --workdir=W --mode=predict --images=photos/ --images='more/*.jpg'

Images are decoded, resized and normalised as the eval split is; each line printed is
`path<TAB>class<TAB>probability of that class`.
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


def predict(config: ml_collections.ConfigDict, workdir: str, images: Sequence[str],
            checkpoint: str = 'latest') -> list[tuple[str, str, float]]:
  """Classifies image files with the latest (or 'best') checkpoint in `workdir`.

  Returns:
    (path, class name, probability of that class) per image; process 0 also prints them.
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
                                         config.data.preprocessing) for path in chunk])
    padded = np.concatenate([arrays, np.zeros((batch_size - len(chunk),) + arrays.shape[1:],
                                              arrays.dtype)])
    probs = np.asarray(jax.device_get(predict_step(
        state['params'], state['batch_stats'], jax.device_put(padded, data))))[:len(chunk)]
    for path, p in zip(chunk, probs):
      k = int(np.argmax(p))
      results.append((path, class_names[k], float(p[k])))
      if is_main:
        print(f'{path}\t{class_names[k]}\t{p[k]:.4f}', flush=True)
  return results
