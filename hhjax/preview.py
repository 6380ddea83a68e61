"""See what the model sees: a PNG grid of augmented training images with their class names.

    python main.py --mode=preview_data --config=configs/default.py --workdir=/tmp/hhjax/preview
"""

import textwrap

from etils import epath
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from hhjax import entry
from hhjax import files
from hhjax.data import augment
from hhjax.data import pipeline
from hhjax.data import spec as data_spec
from hhjax.data import streams
from hhjax.model import preprocessing
from hhjax.training import device_augment
from hhjax.training import mix as mix_lib


def _describe_augmentation(config: ml_collections.ConfigDict) -> str:
  aug = config.data.augment
  if not aug.enabled:
    return 'no augmentation'
  flips = [name for name, on in (('horizontal', aug.horizontal_flip),
                                 ('vertical', aug.vertical_flip)) if on]
  return (f'rotation {aug.rotation_range:g} deg, shift w {aug.width_shift_range:g} '
          f'h {aug.height_shift_range:g}, shear {aug.shear_range:g} deg, zoom '
          f'{aug.zoom_range}, flips {"+".join(flips) or "none"}, fill {aug.fill_mode}')


def _describe_others(data: data_spec.DataSpec) -> str:
  """The crop, erasing and where augmentation runs, for the figure's title ('' when off)."""
  parts = []
  if data.crop.random_resized_crop:
    parts.append(f'random-resized crop scale {tuple(data.crop.scale)} ratio '
                 f'({data.crop.ratio[0]:.3g}, {data.crop.ratio[1]:.3g})')
  if data.random_erasing.enabled:
    parts.append(f'random erasing p {data.random_erasing.probability:g} '
                 f'value {data.random_erasing.value}')
  if parts or data.augment.enabled:
    parts.append(f'on the {data.augment.on}')
  if data.mix.enabled:
    m = data.mix
    kinds = [f'{name} alpha {alpha:g}' for name, alpha in (('mixup', m.mixup_alpha),
                                                           ('CutMix', m.cutmix_alpha)) if alpha]
    switch = f' (CutMix {m.switch_prob:g})' if len(kinds) == 2 else ''
    parts.append(f'{" + ".join(kinds)}, a batch mixed with p {m.prob:g}{switch}')
  return ('; ' + ', '.join(parts)) if parts else ''


def _mixer(data: data_spec.DataSpec, num_classes: int):
  """(images, labels, step) -> (mixed images, soft targets, the batch's draws), as the train
  step mixes the global batch at `step`; None when config.data.mix is off."""
  if not data.mix.enabled:
    return None

  def mixed(images, labels, step):
    images = preprocessing.normalize_images(images, data.preprocessing)
    drawn = mix_lib.draw(mix_lib.key(data.seed, step), data.mix, images.shape[1],
                         images.shape[2])
    return (mix_lib.mix_images(images, drawn),
            mix_lib.mix_targets(labels, drawn['lam'], num_classes), drawn)
  return jax.jit(mixed)


def _mix_line(drawn: dict[str, np.ndarray], partner: str) -> str:
  """A cell's mixing: the kind, the weight of its own label and its partner's class."""
  lam = float(drawn['lam'])
  if lam == 1.0:
    return 'not mixed'
  return f'{"CutMix" if drawn["cutmix"] else "mixup"} λ {lam:.2f} with {partner}'


def _drawn(data: data_spec.DataSpec):
  """position -> what the image there drew: the crop and erased boxes, Keras's parameters."""
  size = data.image_size

  @tf.function
  def drawn(position):
    out = augment.draws(data, position, size, size)
    if data.augment.enabled:
      seed = streams.stateless_seed(data.seed, streams.AUGMENT_SALT, position)
      out['params'] = augment.random_transform_params(seed, data.augment, size, size)
    return out
  return drawn


def applied(data: data_spec.DataSpec, positions: list[int]) -> list[list[str]]:
  """What the training images at stream `positions` had applied, short lines for each.

  Drawn again from (seed, position) by the functions both augmentation paths use.
  """
  drawn = _drawn(data)
  out = []
  for position in positions:
    draws = drawn(tf.constant(position, tf.int64))
    lines = []
    if 'crop' in draws:
      top, left, h, w = (int(v) for v in draws['crop'])
      lines.append(f'crop {w}x{h} at ({left},{top})')
    if 'params' in draws:
      p = {k: float(v) for k, v in draws['params'].items()}
      flips = ''.join(n for n, k in (('h', 'flip_horizontal'), ('v', 'flip_vertical')) if p[k])
      lines.append(f'rot {p["theta"]:.0f} sh {p["shear"]:.0f} z {p["zx"]:.2f}/{p["zy"]:.2f}')
      lines.append(f'shift {p["tx"]:.0f},{p["ty"]:.0f} flip {flips or "-"}')
    if 'erase' in draws:
      top, left, h, w = (int(v) for v in draws['erase'])
      lines.append(f'erased {w}x{h} at ({left},{top})' if h else 'not erased')
    out.append(lines)
  return out


def preview_data(config: ml_collections.ConfigDict, workdir: str, *, num_images: int = 24,
                 columns: int = 6) -> str:
  """Writes `workdir/preview_data.png`: the first training images, as augmented (and mixed).

  With config.data.mix on, each batch is mixed as the train step at its step mixes it, and
  each cell says how: the kind, λ (the weight of its own label) and its partner's class.

  Args:
    config: the training configuration (its data, batch size and seed).
    workdir: folder for the PNG (created if needed).
    num_images: how many images to show.
    columns: images per row.

  Returns:
    The path of the PNG.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top  (Agg, no pyplot)

  data = entry.data(config)
  info = pipeline.dataset_info(data)
  ds = pipeline.create_dataset(data, config.data.train_split, process_index=0, process_count=1)
  images, labels, mixed = [], [], []
  on_device = jax.jit(lambda b: device_augment.augment_pixels(b, data))
  mixer = _mixer(data, len(info.class_names))
  for step, batch in enumerate(ds.as_numpy_iterator()):
    if data.augments_on_device:   # what the train step makes of the shipped pixels
      pixels = np.asarray(on_device(batch))
      batch['image'] = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    if mixer is not None:   # the whole batch, as the train step at this step mixes it
      batch['image'], _, drawn = jax.device_get(mixer(batch['image'], batch['label'], step))
      partners = batch['label'][::-1]
      mixed.extend(_mix_line(drawn, info.class_names[int(p)]) for p in partners)
    images.extend(batch['image'])
    labels.extend(batch['label'])
    if len(images) >= num_images:
      break
  images, labels = images[:num_images], labels[:num_images]

  rows = -(-len(images) // columns)
  cells = applied(data, list(range(len(images))))   # each cell's title: its class, then
  if mixer is not None:                            # what it had applied
    cells = [lines + [line] for lines, line in zip(cells, mixed)]
  lines = len(cells[0]) if cells else 0
  fig = Figure(figsize=(2.0 * columns, (2.2 + 0.25 * lines) * rows + 0.6))
  for k, (image, label) in enumerate(zip(images, labels)):
    ax = fig.add_subplot(rows, columns, k + 1)
    ax.imshow(preprocessing.denormalize(image, config.data.preprocessing))
    ax.set_title('\n'.join([info.class_names[int(label)]] + cells[k]),
                 fontsize=10 if not (data.augments or data.mix.enabled) else 7)
    ax.axis('off')
  source = config.data.dir if config.data.source == 'folder' else config.data.source
  title = (f'{source} / {config.data.train_split}, seed {config.seed}, step 0: '
           f'{_describe_augmentation(config)}{_describe_others(data)}')
  fig.suptitle('\n'.join(textwrap.wrap(title, 22 * columns)), fontsize=9)
  fig.tight_layout()
  path = epath.Path(workdir) / 'preview_data.png'   # local or gs://
  path.parent.mkdir(parents=True, exist_ok=True)
  return str(files.write_png(path, fig, dpi=80))

