"""The config, unpacked once: what the entry points hand down to the layers below.

main.py's modes (hhjax.train, evaluate, predict, explain, export, import_keras, preview) read
the config; every function below them takes values, a sub-config or a small spec, so that its
signature says what it reads. This module is where a config becomes those:

    data(config)                      the DataSpec the input pipeline reads
    model(config, num_classes)        the Classifier (config.model, config.speed, and the
                                      preprocessing config.data says the images get)
    feature_cache(config)             config.speed's feature-cache settings
    phases(config), optimizer(config), plateau(config), setup_for(config),
    early_stopping(config), label_smoothing(config), loss(config, class_names, class_counts)
    restore_target(config, mesh)      what a checkpoint is restored into
    restore_for_inference(config, workdir, which)
    eval_metrics(config)              config.eval: top-k, threshold rule, calibration bins

It never reads a field for a layer that has no use for it: the model gets no data fields but
the preprocessing it must match, the data pipeline no model or speed fields.
"""

from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from hhjax import errors
from hhjax import eval_metrics as eval_metrics_lib
from hhjax import sharding
from hhjax import workdir as workdir_lib
from hhjax.data import spec as data_spec
from hhjax.model import backbones
from hhjax.model import classifier
from hhjax.model import lowering
from hhjax.training import losses
from hhjax.training import plateau as plateau_lib
from hhjax.training import optim
from hhjax.training import phases as phases_lib
from hhjax.training import restore
from hhjax.weights import keras_classifier

PyTree = Any


def data(config: ml_collections.ConfigDict) -> data_spec.DataSpec:
  """What the input pipeline reads: config.data, the seed and the batch sizes."""
  return data_spec.DataSpec.from_config(config)


def model(config: ml_collections.ConfigDict, num_classes: int) -> classifier.Classifier:
  """The classifier config.model describes, for images preprocessed as config.data says."""
  return classifier.create_model(config.model, num_classes,
                                 preprocessing=config.data.preprocessing,
                                 speed=config.get('speed'))


def eval_fraction(config: ml_collections.ConfigDict) -> float | None:
  """config.data.crop.eval_fraction: the centre crop evaluation and predict see (None: none)."""
  return data(config).crop.eval_fraction


def image_size(config: ml_collections.ConfigDict) -> int:
  return int(config.data.image_size)


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  return int(config.get('eval_batch_size') or config.batch_size)


def feature_cache(config: ml_collections.ConfigDict):
  """config.speed.cache_features ('auto', 'on', 'off'; absent: off) and its size limit, as a
  `hhjax.training.feature_cache.Settings`."""
  # That module reads images (TensorFlow), which --mode=import_keras need not load.
  from hhjax.training import feature_cache as feature_cache_lib  # pylint: disable=g-import-not-at-top
  speed = config.get('speed') or {}
  return feature_cache_lib.Settings(
      mode=lowering.parse_switch(speed.get('cache_features', 'off'),
                                 'config.speed.cache_features'),
      max_mb=float(speed.get('cache_features_max_mb', 4096)))


def pretrained(config: ml_collections.ConfigDict) -> str | None:
  """config.model.pretrained, with the command line's `None` (a string there) meaning none."""
  spec = config.model.get('pretrained')
  if spec is None or str(spec).strip().lower() in ('', 'none', 'null'):
    return None
  return str(spec)


def check_downloads(config: ml_collections.ConfigDict, *, weights: bool = True) -> None:
  """Before any work: every download the run would need, and whether the network allows it.

  The ImageNet weights (unless `weights` is False: a resumed run reads its checkpoint) when
  neither cache holds them, the TFDS dataset when it is not prepared. Offline, one error names
  each of them and the flags that avoid it, instead of the first alone after the data scan.
  """
  # Deferred: the data layer loads TensorFlow, which the other modes need not.
  from hhjax.data import sources  # pylint: disable=g-import-not-at-top
  from hhjax.weights import official  # pylint: disable=g-import-not-at-top
  needs = []
  data_download = sources.tfds_download(data(config))
  if data_download is not None:
    needs.append(data_download)
  name = pretrained(config)
  missing = (official.download_needed(name, config.model.get('backbone'))
             if weights and name else None)
  if missing is not None:
    needs.append(sources.Download(
        f'the official ImageNet weights ({missing.filename}, '
        f'config.model.pretrained={name!r})', missing.url, official.offline_advice(missing)))
  problems = {}
  for need in needs:
    host = need.url.split('/')[2]
    if host not in problems:
      problems[host] = sources.network_problem(need.url)
  offline = [(need, problems[need.url.split('/')[2]]) for need in needs
             if problems[need.url.split('/')[2]]]
  if not offline:
    return
  reasons = '; '.join(sorted({problem for _, problem in offline}))
  advice = ' '.join(f'Instead of {need.what.split(" (")[0]}: {need.offline_advice}.'
                    for need, _ in offline)
  error = (errors.DatasetDownloadError if data_download in [n for n, _ in offline]
           else errors.WeightsDownloadError)
  raise error(f'Cannot download {" and ".join(n.what for n, _ in offline)}: no network '
              f'({reasons}). {advice} (The README\'s "Offline" recipe needs neither.)')


def phases(config: ml_collections.ConfigDict) -> list[phases_lib.Phase]:
  """The phases config.warmup and config.finetune ask for, in order."""
  return phases_lib.make_phases(config.warmup, config.finetune, config.model.cut,
                                config.model.get('backbone'))


def optimizer(config: ml_collections.ConfigDict) -> optim.OptimizerSpec:
  """config.optimizer (fields an older config lacks take their defaults)."""
  opt, d = config.optimizer, optim.OptimizerSpec()
  get = lambda name: opt.get(name, getattr(d, name))
  optional = lambda name, kind: None if get(name) is None else kind(get(name))
  return optim.OptimizerSpec(
      name=str(get('name')), rho=float(opt.rho), epsilon=float(opt.epsilon),
      momentum=float(get('momentum')), nesterov=bool(get('nesterov')),
      beta_1=float(get('beta_1')), beta_2=float(get('beta_2')), amsgrad=bool(get('amsgrad')),
      weight_decay=optional('weight_decay', float),
      weight_decay_exclude=tuple(str(p) for p in get('weight_decay_exclude') or ()),
      global_clipnorm=optional('global_clipnorm', float),
      clipnorm=optional('clipnorm', float), clipvalue=optional('clipvalue', float),
      gradient_accumulation_steps=optional('gradient_accumulation_steps', int),
      use_ema=bool(get('use_ema')), ema_momentum=float(get('ema_momentum')),
      ema_overwrite_frequency=optional('ema_overwrite_frequency', int),
      plateau=plateau(config).monitor is not None)


def plateau(config: ml_collections.ConfigDict) -> plateau_lib.PlateauSpec:
  """config.reduce_lr_on_plateau (absent, or a false monitor: off)."""
  block = config.get('reduce_lr_on_plateau') or {}
  d = plateau_lib.PlateauSpec()
  get = lambda name: block.get(name, getattr(d, name))
  return plateau_lib.PlateauSpec(
      monitor=get('monitor') or None, factor=float(get('factor')),
      patience=int(get('patience')), min_delta=float(get('min_delta')),
      cooldown=int(get('cooldown')), min_lr=float(get('min_lr')))


def setup_for(config: ml_collections.ConfigDict, loss_spec: losses.LossSpec | None = None
              ) -> Callable[[phases_lib.Phase, PyTree], phases_lib.PhaseSetup]:
  """(phase, params) -> the phase's labels, optimizer and loss, with config.optimizer's
  settings; `loss_spec` is the training loss (`loss`; None: config.loss without class
  weights, which only a training run resolves)."""
  spec = optimizer(config)
  loss_spec = loss_spec or losses.LossSpec(label_smoothing=label_smoothing(config))
  return lambda phase, params: phases_lib.setup(phase, params, spec, loss_spec)


def label_smoothing(config: ml_collections.ConfigDict) -> float:
  """config.loss.label_smoothing (absent: 0)."""
  return float((config.get('loss') or {}).get('label_smoothing', 0.0) or 0.0)


def class_weight_needs_counts(config: ml_collections.ConfigDict) -> bool:
  """Whether config.loss.class_weight is 'balanced' (the training split's counts are read)."""
  return (config.get('loss') or {}).get('class_weight') == losses.BALANCED


def loss(config: ml_collections.ConfigDict, class_names, class_counts=None) -> losses.LossSpec:
  """The training loss config.loss asks for, class weights resolved for `class_names`
  ('balanced' from `class_counts`, the training split's examples per class)."""
  weights = losses.resolve_class_weights((config.get('loss') or {}).get('class_weight'),
                                         class_names, class_counts)
  return losses.LossSpec(label_smoothing=label_smoothing(config), class_weights=weights)


def early_stopping(config: ml_collections.ConfigDict) -> phases_lib.EarlyStopping:
  es = config.early_stopping
  return phases_lib.EarlyStopping(metric=es.metric or None, threshold=float(es.threshold),
                                  mode=str(es.get('mode', 'max')))


def keras_classifier_spec(config: ml_collections.ConfigDict, num_classes: int = 2,
                          class_names=None) -> keras_classifier.KerasClassifier:
  """The Keras classifier config.model and config.data describe."""
  m = config.model
  return keras_classifier.KerasClassifier(
      m.cut, m.head, int(m.hidden), float(m.dropout), num_classes, image_size(config),
      tuple(class_names) if class_names else None, config.data.preprocessing,
      m.get('backbone') or backbones.DEFAULT)


def restore_target(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
                   model_for: Callable[[int], Any] | None = None,
                   training: bool = True,
                   loss_spec: losses.LossSpec | None = None) -> restore.Target:
  """What a checkpoint is restored into under `config` (by default a model for the
  checkpoint's own classes); `loss_spec`: the training loss (see `setup_for`)."""
  return restore.Target(
      model_for=model_for or (lambda n: model(config, n)), phases=phases(config),
      setup_for=setup_for(config, loss_spec), image_size=image_size(config),
      seed=int(config.seed),
      mesh=mesh, config=workdir_lib.config_dict(config), training=training)


def restore_for_inference(config: ml_collections.ConfigDict, workdir: str,
                          which: str = 'latest'):
  """(mesh, model, state, class names, step) of the latest or best checkpoint in `workdir`;
  the state's params are the EMA weights when the optimizer keeps an EMA."""
  mesh = sharding.make_mesh()
  restored = restore.for_inference(workdir, restore_target(config, mesh, training=False), which)
  # With config.optimizer.use_ema, inference uses the weights' moving average.
  state = dict(restored.state, params=optim.inference_params(restored.state))
  return (mesh, restored.model, state, list(restored.meta.class_names or ()), restored.step)


def eval_metrics(config: ml_collections.ConfigDict) -> eval_metrics_lib.Spec:
  """config.eval (absent in workdirs of older versions: the defaults) as an
  `eval_metrics.Spec`."""
  spec = config.get('eval') or {}
  default = eval_metrics_lib.Spec()
  return eval_metrics_lib.Spec(
      top_k=tuple(int(k) for k in spec.get('top_k', default.top_k)),
      threshold_rule=str(spec.get('threshold', default.threshold_rule)),
      calibration_bins=int(spec.get('calibration_bins', default.calibration_bins)))
