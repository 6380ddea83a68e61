"""What the input pipeline reads, as one frozen value: the data fields and the stream's sizes.

    data = DataSpec.from_config(config)          # the one place hhjax.data reads a config
    info = pipeline.dataset_info(data)
    train = pipeline.create_dataset(data, data.train_split, start_step=step)
    validation = pipeline.create_dataset(data, data.validation)   # one padded pass
    smaller = dataclasses.replace(data, image_size=75)

Every function of hhjax.data takes a DataSpec (or the explicit values it needs), so its signature
says what it reads. The values a data field may take are defined here too, beside the field they
constrain, each named after the module that gives the value its meaning: hhjax.config_checks
reads them from here without importing TensorFlow (this module must not import it), and the
owning modules use the same tuples.
"""

import dataclasses
from typing import Any

# config.data.source: the sources of sources.py, whose name -> implementation mapping must have
# exactly these keys (it checks so when imported).
SOURCES = ('tfds', 'folder', 'fake')
# config.data.resize_method and config.data.image_dtype: what decode.py resizes with and emits.
RESIZE_METHODS = ('bilinear', 'nearest')
IMAGE_DTYPES = ('float32', 'uint8')
# config.data.bad_files: bad_files.py's policies for files that are not readable images.
BAD_FILES = ('error', 'skip')
# config.data.augment.fill_mode: the modes of Keras's ImageDataGenerator (augment.py).
FILL_MODES = ('nearest', 'reflect', 'wrap', 'constant')
# config.data.augment.on: where the training images are augmented (augment.py on the host in
# tf.data, hhjax.training.device_augment in the jitted train step).
AUGMENT_ON = ('host', 'device')
# config.data.random_erasing.value: a number (the erased box's grey level) or this word.
ERASE_RANDOM = 'random'


@dataclasses.dataclass(frozen=True, kw_only=True)
class FakeSpec:
  """config.data.fake: the synthetic images of source='fake'."""
  num_train_examples: int
  num_eval_examples: int
  num_classes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class AugmentSpec:
  """config.data.augment: Keras ImageDataGenerator's arguments, under Keras's names."""
  enabled: bool
  rotation_range: float
  width_shift_range: float
  height_shift_range: float
  shear_range: float
  zoom_range: float | tuple[float, float]   # z: zooms in [1 - z, 1 + z]; or (lower, upper)
  horizontal_flip: bool
  vertical_flip: bool
  fill_mode: str
  cval: float = 0.0   # absent from configs written before it existed
  on: str = 'host'    # one of AUGMENT_ON; covers the crop and the erasing too


@dataclasses.dataclass(frozen=True, kw_only=True)
class CropSpec:
  """config.data.crop: Inception-style random-resized crops, and a centre crop to evaluate.

  Attributes:
    random_resized_crop: crop each training image to a random box, resized back to image_size.
    scale: the box's area, a fraction of the image's, drawn uniformly from [lower, upper].
    ratio: the box's width / height, drawn log-uniformly from [lower, upper].
    eval_fraction: evaluation and predict see the centre box of this fraction of each side,
      resized back to image_size (e.g. 0.875); None: the whole image.
  """
  random_resized_crop: bool = False
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  eval_fraction: float | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErasingSpec:
  """config.data.random_erasing: Zhong et al. 2017's random erasing, as timm's RandomErasing.

  Attributes:
    probability: the chance that a training image has one box erased (timm's --reprob); 0: off.
    scale: the box's area, a fraction of the image's, drawn uniformly from [lower, upper].
    ratio: the box's height / width, drawn log-uniformly from [lower, upper].
    value: the grey level the box is filled with, or ERASE_RANDOM: uniform noise in [0, 255].
  """
  probability: float = 0.0
  scale: tuple[float, float] = (0.02, 1 / 3)
  ratio: tuple[float, float] = (0.3, 3.3)
  value: float | str = 0.0

  def __post_init__(self):   # the config holds a string: '0' or 'random'
    if self.value != ERASE_RANDOM:
      object.__setattr__(self, 'value', float(self.value))

  @property
  def enabled(self) -> bool:
    return self.probability > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixSpec:
  """config.data.mix: mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of whole batches,
  in the train step (hhjax.training.mix), with timm's Mixup semantics ('batch' mode).

  Attributes:
    mixup_alpha: mixup's lambda ~ Beta(alpha, alpha); 0: no mixup (timm's --mixup).
    cutmix_alpha: CutMix's lambda ~ Beta(alpha, alpha); 0: no CutMix (timm's --cutmix).
    prob: the chance that a batch is mixed at all (timm's mixup_prob).
    switch_prob: with both on, the chance that a mixed batch uses CutMix, not mixup (timm's
      switch_prob).
  """
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5

  @property
  def enabled(self) -> bool:
    """Whether any batch can be mixed (with prob 0 the train step is the one without)."""
    return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSpec:
  """Every value the input pipeline reads (config.data, plus seed and batch sizes).

  Attributes:
    source: one of SOURCES.
    name: the TFDS dataset name (source='tfds').
    dir: the image folder's root (source='folder'), or TFDS's data_dir (None: its default).
    train_split: the training split's name.
    validation_split: the split that chooses (early stopping, the best checkpoint); None:
      `validation_fraction` of the training split is held out instead (see `validation`).
    validation_fraction: the share of each class of the training split held out for
      validation when validation_split is None (holdout.py); 0 with a named split.
    test_split: the split reported once training ends, never used for a choice; None: none.
    image_size: images are resized to image_size x image_size.
    resize_method: one of RESIZE_METHODS.
    preprocessing: one of hhjax.model.preprocessing.NAMES.
    image_dtype: what a batch's images are, one of IMAGE_DTYPES.
    bad_files: what to do with unreadable image files, one of BAD_FILES.
    cache_decoded: decode and resize every image once and keep it in memory.
    num_parallel_calls: tf.data's threads (None: streams.num_threads's default).
    fake: the synthetic images of source='fake'.
    augment: the training stream's augmentation (and where it runs: augment.on).
    crop: random-resized crops for training, a centre crop for evaluation.
    random_erasing: the training stream's random erasing.
    mix: mixup and CutMix of the training batches, in the train step.
    seed: seeds the shuffling, the augmentation and the synthetic images.
    batch_size: the global training batch.
    eval_batch_size: the global evaluation batch (config.eval_batch_size or batch_size).
  """
  source: str
  name: str
  dir: str | None
  train_split: str
  validation_split: str | None
  validation_fraction: float = 0.0
  test_split: str | None = None
  image_size: int
  resize_method: str
  preprocessing: str
  image_dtype: str = 'float32'   # the defaults: absent from configs written before them
  bad_files: str
  cache_decoded: bool = False
  num_parallel_calls: int | None
  fake: FakeSpec
  augment: AugmentSpec
  crop: CropSpec = CropSpec()
  random_erasing: ErasingSpec = ErasingSpec()
  mix: MixSpec = MixSpec()
  seed: int
  batch_size: int
  eval_batch_size: int

  @property
  def augments(self) -> bool:
    """Whether training images are augmented per image (each epoch sees new images)."""
    return (self.augment.enabled or self.crop.random_resized_crop
            or self.random_erasing.enabled)

  @property
  def augments_on_device(self) -> bool:
    """Whether the train step augments (the training stream ships pixels and parameters)."""
    return self.augments and self.augment.on == 'device'

  @property
  def holds_out(self) -> bool:
    """Whether validation is a share of the training split held out from training."""
    return self.validation_split is None and self.validation_fraction > 0

  @property
  def validation(self) -> str:
    """The name of the split that validates: validation_split, or the held-out share's name.

    The held-out share reads as `train[validation 10%]`: sources.table gives its rows, and
    the training split's table lacks them.
    """
    if self.validation_split is not None:
      return self.validation_split
    return held_out_name(self.train_split, self.validation_fraction)

  def splits(self) -> list[str]:
    """Training, validation and (when there is one) test, each once, in that order."""
    names = [self.train_split, self.validation] + ([self.test_split] if self.test_split else [])
    return list(dict.fromkeys(names))

  def named_splits(self) -> list[str]:
    """The splits the source itself has a name for (a held-out share is not one of them)."""
    names = [self.train_split, self.validation_split, self.test_split]
    return list(dict.fromkeys(n for n in names if n))

  @classmethod
  def from_config(cls, config: Any) -> 'DataSpec':
    """The spec of a ConfigDict, or of a mapping of plain values (a workdir's config.json).

    Reads config.data, config.seed, config.batch_size and config.eval_batch_size; fields that a
    config written by an older version lacks take the defaults above. A config written before
    validation and test were apart (config.data.eval_split, no validation_split) chose and
    reported on eval_split: that split validates, nothing is held out and there is no test.
    """
    data = config['data']
    names = _field_names(cls) - {'fake', 'augment', 'crop', 'random_erasing', 'mix', 'seed',
                                 'batch_size', 'eval_batch_size'}
    values = _present(data, names)
    if 'validation_split' not in data:   # written before validation and test were apart
      values.update(validation_split=data['eval_split'], validation_fraction=0.0,
                    test_split=None)
    for name in ('validation_split', 'test_split'):   # '' from the command line: none
      if name in values and not values[name]:
        values[name] = None
    if values.get('validation_split') is not None:
      values['validation_fraction'] = 0.0   # read only when nothing names the split
    values['validation_fraction'] = float(values.get('validation_fraction', 0.0))
    return cls(
        **values,
        fake=FakeSpec(**_present(data['fake'], _field_names(FakeSpec))),
        augment=_augment(data['augment']),
        crop=_with_pairs(CropSpec, data.get('crop', {})),
        random_erasing=_with_pairs(ErasingSpec, data.get('random_erasing', {})),
        mix=_with_pairs(MixSpec, data.get('mix', {})),
        seed=int(config['seed']),
        batch_size=int(config['batch_size']),
        eval_batch_size=int(config.get('eval_batch_size') or config['batch_size']))


def held_out_name(train_split: str, fraction: float) -> str:
  """The name of the share `fraction` of `train_split` held out for validation."""
  return f'{train_split}[validation {fraction * 100:g}%]'


def held_out_identity(config: Any) -> dict[str, Any] | None:
  """What decides which rows the training split loses to validation, or None if it loses none.

  Compared when a run resumes: another fraction, seed or training split would move rows
  between training and validation, so the training stream's position would point elsewhere.
  """
  spec = DataSpec.from_config(config)
  if not spec.holds_out:
    return None
  return {'train_split': spec.train_split, 'validation_fraction': spec.validation_fraction,
          'seed': spec.seed}


def _field_names(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def _present(node: Any, names: set[str]) -> dict[str, Any]:
  """The fields `names` that `node` holds; an absent one takes its dataclass default."""
  return {name: node[name] for name in names if name in node}


def _augment(node: Any) -> AugmentSpec:
  values = _present(node, _field_names(AugmentSpec))
  if isinstance(values.get('zoom_range'), (list, tuple)):   # config.json stores a pair as a list
    values['zoom_range'] = tuple(values['zoom_range'])
  return AugmentSpec(**values)


def _with_pairs(cls, node: Any):
  """cls from `node`'s fields; absent ones take their defaults, lists (config.json) become
  pairs."""
  values = _present(node, _field_names(cls))
  for name, value in values.items():
    if isinstance(value, list):
      values[name] = tuple(value)
  return cls(**values)
