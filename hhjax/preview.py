"""See what the model sees: a PNG grid of augmented training images with their class names.

    python main.py --mode=preview_data --config=configs/default.py --workdir=/tmp/hhjax/preview
"""

from etils import epath
import ml_collections

from hhjax import entry
from hhjax import files
from hhjax.data import pipeline
from hhjax.model import preprocessing


def _describe_augmentation(config: ml_collections.ConfigDict) -> str:
  aug = config.data.augment
  if not aug.enabled:
    return 'no augmentation'
  flips = [name for name, on in (('horizontal', aug.horizontal_flip),
                                 ('vertical', aug.vertical_flip)) if on]
  return (f'rotation {aug.rotation_range:g} deg, shift w {aug.width_shift_range:g} '
          f'h {aug.height_shift_range:g}, shear {aug.shear_range:g} deg, zoom '
          f'{aug.zoom_range}, flips {"+".join(flips) or "none"}, fill {aug.fill_mode}')


def preview_data(config: ml_collections.ConfigDict, workdir: str, *, num_images: int = 24,
                 columns: int = 6) -> str:
  """Writes `workdir/preview_data.png`: the first training images of step 0, as augmented.

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
  images, labels = [], []
  for batch in ds.as_numpy_iterator():
    images.extend(batch['image'])
    labels.extend(batch['label'])
    if len(images) >= num_images:
      break
  images, labels = images[:num_images], labels[:num_images]

  rows = -(-len(images) // columns)
  fig = Figure(figsize=(2.0 * columns, 2.2 * rows + 0.6))
  for k, (image, label) in enumerate(zip(images, labels)):
    ax = fig.add_subplot(rows, columns, k + 1)
    ax.imshow(preprocessing.denormalize(image, config.data.preprocessing))
    ax.set_title(info.class_names[int(label)], fontsize=10)
    ax.axis('off')
  source = config.data.dir if config.data.source == 'folder' else config.data.source
  fig.suptitle(f'{source} / {config.data.train_split}, seed {config.seed}, step 0: '
               f'{_describe_augmentation(config)}', fontsize=9)
  fig.tight_layout()
  path = epath.Path(workdir) / 'preview_data.png'   # local or gs://
  path.parent.mkdir(parents=True, exist_ok=True)
  return str(files.write_png(path, fig, dpi=80))

