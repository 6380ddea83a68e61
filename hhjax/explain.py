"""Where the model looks: Grad-CAM heat maps over images (Selvaraju et al., 2017).

    python main.py --workdir=W --mode=explain --images=photos/ --images='more/*.jpg'

For each image, A is the backbone's output at config.model.cut ([h, w, K]) and y the logit of
the predicted class; with one sigmoid output, y is the logit z for class 1 and -z for class 0.
The map is ReLU(sum_k w_k A_k), where w_k is the spatial mean of dy/dA_k, upsampled bilinearly
to the image: it is large where the features that raise the predicted class's score are
active. One jitted function computes it for a batch of images, for any cut and head: a forward
pass that captures A on the way, then the head's gradient with respect to A.

Prints each image's prediction (`path<TAB>class<TAB>probability`, as --mode=predict does), then
the paths it writes, each run replacing the previous one's files:

    WORKDIR/explain/NN_<name>.png   the image as the model sees it, and the map over it
    WORKDIR/explain/overview.png    the images with their maps in one grid (the first 40)
    WORKDIR/explain/maps.npz        the unscaled maps [n, S, S], with 'paths', 'predicted',
                                    'probabilities' and 'class_names'
"""

from collections.abc import Callable, Sequence
import functools
import io
import os
import time
from typing import Any

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from hhjax import durations
from hhjax import entry
from hhjax import files
from hhjax import pictures
from hhjax import predict
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax.data import bad_files
from hhjax.data import decode
from hhjax.model import classifier
from hhjax.model import preprocessing
from hhjax.training import steps

PyTree = Any

EXPLAIN_DIR = 'explain'
OVERVIEW_FILE = 'overview.png'
# The overview stays a picture one can look at; every image has its own file anyway.
OVERVIEW_MAX = 40
MAPS_FILE = 'maps.npz'

# How strongly the map covers the image; the image stays readable underneath.
_ALPHA = 0.45
_CMAP = 'jet'


def class_score(logits: jax.Array, classes: jax.Array) -> jax.Array:
  """The logit of `classes` per example; one sigmoid output z gives z for 1 and -z for 0."""
  if logits.shape[-1] == 1:
    return jnp.where(classes == 1, logits[:, 0], -logits[:, 0])
  return jnp.take_along_axis(logits, classes[:, None], axis=-1)[:, 0]


def _is_backbone(module: nn.Module, method_name: str) -> bool:
  # The classifier's backbone, whichever family: its call returns the endpoints.
  return module.path == ('backbone',) and method_name == '__call__'


def gradcam(model: classifier.Classifier, variables: PyTree,
            images: jax.Array) -> dict[str, jax.Array]:
  """Grad-CAM of each image for its predicted class (pure; jit it).

  Args:
    model: the classifier (any cut and head).
    variables: {'params', 'batch_stats'}.
    images: a batch as the eval split gives it [b, S, S, 3].

  Returns:
    'map' [b, S, S] (upsampled, unscaled, >= 0), 'features_map' [b, h, w] (at the cut),
    'predicted' [b] classes, 'probabilities' [b, classes].
  """
  # The forward pass keeps the backbone's endpoints; A is the one at the cut.
  _, captured = model.apply(variables, images, train=False, capture_intermediates=_is_backbone)
  features = captured['intermediates']['backbone']['__call__'][0][model.cut]

  def score(a):
    logits = model.apply(variables, a, train=False, from_features=True)
    predicted = jax.lax.stop_gradient(steps.predicted_class(logits))
    # Each example's score depends on its own features only (BatchNorm in inference mode), so
    # the gradient of the sum is every example's own gradient.
    return jnp.sum(class_score(logits, predicted)), (logits, predicted)

  grads, (logits, predicted) = jax.grad(score, has_aux=True)(features)
  features, grads = features.astype(jnp.float32), grads.astype(jnp.float32)
  weights = jnp.mean(grads, axis=(1, 2))                                   # [b, K]
  small = jax.nn.relu(jnp.einsum('bhwk,bk->bhw', features, weights))
  size = images.shape[1:3]
  return {'map': jax.image.resize(small, (small.shape[0], *size), 'bilinear'),
          'features_map': small,
          'predicted': predicted,
          'probabilities': classifier.probabilities(logits)}


def make_gradcam(model: classifier.Classifier, mesh: jax.sharding.Mesh
                 ) -> Callable[[PyTree, PyTree, jax.Array], dict[str, jax.Array]]:
  """`gradcam` jitted over the mesh: (params, batch_stats, images) -> replicated results."""
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)

  @functools.partial(jax.jit, in_shardings=(repl, repl, data), out_shardings=repl)
  def step(params, batch_stats, images):
    return gradcam(model, {'params': params, 'batch_stats': batch_stats}, images)
  return step


def _overlay(ax, image: np.ndarray, heat: np.ndarray):
  """The image with its map scaled to [0, 1] over it; returns the map's artist (colour bar)."""
  ax.imshow(image)
  peak = float(heat.max())
  artist = ax.imshow(heat / peak if peak > 0 else heat, cmap=_CMAP, alpha=_ALPHA, vmin=0.0,
                     vmax=1.0)
  ax.set_xticks([])
  ax.set_yticks([])
  return artist


def plot_one(image: np.ndarray, heat: np.ndarray, name: str, label: str, cut: str) -> Figure:
  """The image and, beside it, the image under its map, with a colour bar."""
  fig = Figure(figsize=(7.6, 4.0), layout='constrained')
  left, right = fig.subplots(1, 2)
  left.imshow(image)
  left.set_xticks([])
  left.set_yticks([])
  left.set_title(f'input, {image.shape[1]}×{image.shape[0]} as the model sees it', fontsize=9)
  artist = _overlay(right, image, heat)
  right.set_title(f'Grad-CAM of the predicted class: {label}', fontsize=9)
  fig.colorbar(artist, ax=right, shrink=0.8,
               label='importance (1 = the largest)' if heat.max() > 0 else 'map is zero')
  fig.suptitle(f'{name}: where the model looks (features at {cut})', fontsize=10)
  return fig


def plot_overview(images: Sequence[np.ndarray], heats: Sequence[np.ndarray],
                  titles: Sequence[str], cut: str, columns: int = 5,
                  total: int | None = None) -> Figure:
  """Each image under its map, titled with its name, predicted class and probability.

  `total`: how many images were explained, when only the first ones are drawn here.
  """
  columns, rows = pictures.grid_shape(len(images), columns)
  fig = Figure(figsize=(2.3 * columns, 2.55 * rows + 0.6), layout='constrained')
  for k, (image, heat, title) in enumerate(zip(images, heats, titles)):
    ax = fig.add_subplot(rows, columns, k + 1)
    _overlay(ax, image, heat)
    ax.set_title(title, fontsize=8.5)
  shown = (f'; the first {len(images)} of {total} images'
           if total is not None and total > len(images) else '')
  fig.suptitle(f'Grad-CAM at {cut}: where the features behind each prediction are active\n'
               f'(each map scaled to its own maximum; red = most important{shown})', fontsize=10)
  return fig


# Seconds between progress lines of a long explain (thousands of images take minutes).
PROGRESS_EVERY_S = 10.0


class _Progress:
  """'<what>: N of M image(s), R/s, ETA' every PROGRESS_EVERY_S seconds while a loop runs."""

  def __init__(self, what: str, total: int):
    self._what, self._total = what, total
    self._start = self._last = time.monotonic()

  def done(self, count: int) -> None:
    now = time.monotonic()
    if now - self._last < PROGRESS_EVERY_S or count >= self._total:
      return
    self._last = now
    rate = count / max(now - self._start, 1e-9)
    logging.info('%s: %s of %s image(s), %.1f/s, ETA %s', self._what, f'{count:,}',
                 f'{self._total:,}', rate,
                 durations.format_duration((self._total - count) / max(rate, 1e-9)))


def _picture_names(paths: Sequence[str]) -> list[str]:
  """NN_<name>.png per image: numbered, so equal names from different folders do not clash."""
  width = len(str(len(paths) - 1))
  return [f'{k:0{width}d}_{os.path.splitext(os.path.basename(p))[0]}.png'
          for k, p in enumerate(paths)]


def _write(directory: epath.Path, paths: Sequence[str], images: np.ndarray, maps: np.ndarray,
           predicted: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
           cut: str) -> list[str]:
  directory.mkdir(parents=True, exist_ok=True)
  for old in list(directory.glob('*.png')) + list(directory.glob(MAPS_FILE)):
    old.unlink()   # a previous run's pictures would mix with these
  written = []
  labels = [f'{class_names[c]}, p = {p[c]:.3f}' for c, p in zip(predicted, probs)]
  progress = _Progress(f'Writing the pictures to {directory}', len(paths))
  for path, name, image, heat, label in zip(paths, _picture_names(paths), images, maps, labels):
    written.append(files.write_png(
        directory / name, plot_one(image, heat, pictures.short_name(path), label, cut)))
    progress.done(len(written))
  titles = [f'{pictures.short_name(p)}\n{label}' for p, label in zip(paths, labels)]
  written.append(files.write_png(directory / OVERVIEW_FILE,
                                 plot_overview(images[:OVERVIEW_MAX], maps[:OVERVIEW_MAX],
                                               titles[:OVERVIEW_MAX], cut, total=len(paths))))
  buffer = io.BytesIO()
  np.savez_compressed(buffer, maps=maps.astype(np.float32), paths=np.array(paths, dtype=str),
                      predicted=predicted, probabilities=probs,
                      class_names=np.array(class_names, dtype=str))
  written.append(files.write_atomic(directory / MAPS_FILE, buffer.getvalue()))
  return [str(p) for p in written]


def explain(config: ml_collections.ConfigDict, workdir: str, images: Sequence[str],
            checkpoint: str = 'latest') -> list[str]:
  """Writes Grad-CAM pictures of `images` for the latest (or 'best') checkpoint in `workdir`.

  Returns:
    The paths written into WORKDIR/explain/ (process 0 prints each image's prediction, then
    writes and prints them; the others
    compute their share and return []).
  """
  paths = bad_files.readable_files(predict.expand_images(images), config.data.get('bad_files'),
                                   config.data.get('num_parallel_calls'))
  mesh, model, state, class_names, step = entry.restore_for_inference(config, workdir,
                                                                         checkpoint)
  step_fn = make_gradcam(model, mesh)
  data = sharding.data_sharded(mesh)
  batch_size = entry.eval_batch_size(config)
  batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  inputs, maps, predicted, probs = [], [], [], []
  progress = _Progress('Grad-CAM', len(paths))
  for start in range(0, len(paths), batch_size):
    progress.done(start)
    chunk = np.stack([decode.load_image(p, config.data.image_size, config.data.resize_method,
                                        config.data.preprocessing, entry.eval_fraction(config))
                      for p in paths[start:start + batch_size]])
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                             chunk.dtype)])
    out = jax.device_get(step_fn(state['params'], state['batch_stats'],
                                 jax.device_put(padded, data)))
    inputs.append(chunk)
    maps.append(out['map'][:len(chunk)])
    predicted.append(out['predicted'][:len(chunk)])
    probs.append(out['probabilities'][:len(chunk)])
  if jax.process_index() != 0:
    return []
  # Each image's prediction, as --mode=predict prints it: the class each map explains.
  for path, k, p in zip(paths, np.concatenate(predicted), np.concatenate(probs)):
    print(f'{path}\t{class_names[int(k)]}\t{p[int(k)]:.4f}', flush=True)
  shown = preprocessing.denormalize(np.concatenate(inputs), config.data.preprocessing)
  written = _write(epath.Path(workdir_lib.absolute(workdir)) / EXPLAIN_DIR, paths, shown,
                   np.concatenate(maps), np.concatenate(predicted), np.concatenate(probs),
                   class_names, model.cut)
  logging.info('Grad-CAM of %d image(s) at step %d, features at %s.', len(paths), step,
               model.cut)
  for path in written:
    print(path, flush=True)
  return written
