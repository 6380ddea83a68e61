"""The recommended recipe: ImageNet InceptionV3 cut at mixed7, warm-up, then fine-tuning.

Run:
    python main.py --config=configs/default.py --workdir=/tmp/hhjax/default

Needs internet on the first run (the official Keras ImageNet weights and the TFDS
`horses_or_humans` download); both are cached afterwards. TFDS horses_or_humans has a train
and a test split only: 10 % of each class of train is held out for validation (it chooses),
the 256 test images are reported once training ends. Expected result: 98-100 % accuracy on
them after the warm-up, as the Keras tutorial reports.

Every field can be overridden, e.g. `--config.finetune.epochs=0 --config.batch_size=32`.
"""

import ml_collections


def schedule() -> ml_collections.ConfigDict:
  """A phase's learning-rate schedule, counted in optimizer steps from the phase's start
  (Keras's keras.optimizers.schedules; the phase's learning_rate is their initial rate)."""
  s = ml_collections.ConfigDict()
  # 'constant' (the learning_rate throughout), 'cosine' (CosineDecay), 'exponential'
  # (ExponentialDecay) or 'piecewise' (PiecewiseConstantDecay).
  s.name = 'constant'
  s.decay_steps = 1000                     # cosine, exponential
  s.alpha = 0.0                            # cosine: the final rate, as a fraction
  # cosine: rise linearly from learning_rate to warmup_target over warmup_steps, then decay
  # from warmup_target (None: no warm-up, decay from learning_rate).
  s.warmup_target = ml_collections.FieldReference(None, field_type=float)
  s.warmup_steps = 0
  s.decay_rate = 0.96                      # exponential: lr * decay_rate ** (step / decay_steps)
  s.staircase = False                      # exponential: a whole number of decay_steps
  # piecewise: values[i] for steps in (boundaries[i-1], boundaries[i]]; one more value than
  # boundaries; the phase's learning_rate is not used.
  s.boundaries = ()
  s.values = ()
  return s


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration."""
  config = ml_collections.ConfigDict()

  config.seed = 0
  # Global batch size (all devices and processes together).
  config.batch_size = 20
  # Evaluation batch size; None means the training batch size.
  config.eval_batch_size = ml_collections.FieldReference(None, field_type=int)
  # Steps per epoch; None means one pass over the training split.
  config.steps_per_epoch = ml_collections.FieldReference(None, field_type=int)
  config.log_every_steps = 10
  # A checkpoint every this many steps (0: none) and at the end of every epoch.
  config.checkpoint_every_steps = 200
  # Checkpoints kept: the last `keep_checkpoints`, plus the best by validation accuracy.
  config.keep_checkpoints = 3

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  # 'tfds' (TensorFlow Datasets), 'folder' (DIR/<split>/<class>/*) or 'fake'.
  data.source = 'tfds'
  data.name = 'horses_or_humans'           # TFDS dataset name.
  # Image folder root for source='folder'; TFDS data_dir for source='tfds' (None: TFDS default).
  data.dir = ml_collections.FieldReference(None, field_type=str)
  data.train_split = 'train'
  # Validation chooses (early stopping, the best checkpoint, the val_* metrics); the test split
  # is evaluated once when training ends (WORKDIR/test.json) and never chooses anything.
  # validation_split names a split of the source ('validation' for an image folder with
  # DIR/validation/); None holds out `validation_fraction` of each class of the training split
  # (rows fixed by the seed, recorded in WORKDIR/data_split.json; a resume must keep them).
  data.validation_split = ml_collections.FieldReference(None, field_type=str)
  data.validation_fraction = 0.1           # In (0, 1); read only when validation_split is None.
  # The split reported, None for none (e.g. an image folder with train/ and validation/ only).
  data.test_split = ml_collections.FieldReference('test', field_type=str)
  # Replaced by validation_split and test_split: a value here is refused, saying so.
  data.eval_split = ml_collections.FieldReference(None, field_type=str)
  data.image_size = 150
  data.resize_method = 'bilinear'          # 'nearest' mimics Keras flow_from_directory.
  # 'inception': x/127.5 - 1 (Keras's 'tf' mode); 'caffe': RGB->BGR minus the ImageNet mean
  # (Keras's VGG/ResNet preprocess_input); 'rescale': x/255 (the seed); 'raw': the pixels as
  # they are (EfficientNet, which normalises inside the model).
  data.preprocessing = 'inception'
  # 'float32': batches carry normalised images; 'uint8': pixels, normalised on the device
  # (a quarter of the bytes to move; rounds augmented pixels to whole grey levels).
  data.image_dtype = 'float32'
  data.bad_files = 'error'                 # 'error' or 'skip' unreadable image files.
  # Decode and resize each image once and keep it in memory (float32: 277 MB for the
  # horses-or-humans train split at 150 px); then an epoch costs only the augmentation.
  data.cache_decoded = False
  # Threads for tf.data (None: a quarter of the cores when JAX runs on the CPU, else autotuned).
  data.num_parallel_calls = ml_collections.FieldReference(None, field_type=int)
  # Synthetic data for source='fake'.
  data.fake = ml_collections.ConfigDict()
  data.fake.num_train_examples = 64
  data.fake.num_eval_examples = 24
  data.fake.num_classes = 2
  # Keras ImageDataGenerator arguments, the seed's values.
  data.augment = aug = ml_collections.ConfigDict()
  aug.enabled = True
  aug.rotation_range = 40.0
  aug.width_shift_range = 0.2
  aug.height_shift_range = 0.2
  aug.shear_range = 0.2
  aug.zoom_range = 0.2
  aug.horizontal_flip = True
  aug.vertical_flip = True
  aug.fill_mode = 'nearest'                # 'nearest', 'reflect', 'wrap' or 'constant'.
  aug.cval = 0.0                           # Fill value for fill_mode='constant' (Keras cval).
  # Where the training images are augmented (this block, data.crop, data.random_erasing):
  # 'host' in tf.data; 'device' in the jitted train step, the host shipping uint8 pixels and
  # the few numbers it drew per image (the same draws: the paths agree to 0.05 grey levels).
  aug.on = 'host'
  # Inception-style random-resized crop of the training images (torchvision's, timm's, Keras
  # 3's sampling, fallback included), applied to the image_size x image_size image first.
  data.crop = crop = ml_collections.ConfigDict()
  crop.random_resized_crop = False
  crop.scale = (0.08, 1.0)                 # The box's area, a fraction of the image's.
  crop.ratio = (3 / 4, 4 / 3)              # The box's width / height (log-uniform).
  # Evaluation and predict see the centre box of this fraction of each side, resized back
  # to image_size (e.g. 0.875); None: the whole image.
  crop.eval_fraction = ml_collections.FieldReference(None, field_type=float)
  # Random erasing (Zhong et al. 2017; timm's RandomErasing, --reprob), after the warp.
  data.random_erasing = erasing = ml_collections.ConfigDict()
  erasing.probability = 0.0                # The chance an image has a box erased; 0: off.
  erasing.scale = (0.02, 1 / 3)            # The box's area, a fraction of the image's.
  erasing.ratio = (0.3, 3.3)               # The box's height / width (log-uniform).
  # The box's grey level in [0, 255] (e.g. '0'), or 'random': uniform noise in [0, 255].
  erasing.value = '0'
  # mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of whole batches, in the jitted train
  # step after the augmentation above, as timm's Mixup: each example is mixed with the one at
  # the mirrored place of the global batch (the batch reversed), and its target becomes
  # lam onehot(y) + (1 - lam) onehot(y'), label smoothing applied on top. mixup: the images
  # lam x + (1 - lam) x'; CutMix: a box of x' of area about (1 - lam) pasted in, lam set to
  # the share left. lam ~ Beta(alpha, alpha). The training accuracy is then counted against
  # each example's larger share. Needs the train step to see images: no feature cache.
  data.mix = mix = ml_collections.ConfigDict()
  mix.mixup_alpha = 0.0                    # mixup's Beta(alpha, alpha); 0: no mixup (e.g. 0.2)
  mix.cutmix_alpha = 0.0                   # CutMix's Beta(alpha, alpha); 0: no CutMix (e.g. 1.0)
  mix.prob = 1.0                           # The chance that a batch is mixed (timm's mixup_prob).
  # With both alphas > 0: the chance that a mixed batch gets CutMix instead of mixup.
  mix.switch_prob = 0.5

  # ---------------------------------------------------------------- model
  config.model = model = ml_collections.ConfigDict()
  # The Keras application the classifier stands on (hhjax/model/backbones.py, README "Backbones"):
  # 'inception_v3', 'vgg16', 'vgg19', 'resnet50', 'resnet101', 'resnet152', 'xception',
  # 'efficientnet_b0' ... 'efficientnet_b7', or 'mobilenet_v2' (alpha 1.0), 'mobilenet_v2_0.35',
  # '_0.5', '_0.75', '_1.3', '_1.4' (Keras's MobileNetV2 at that alpha).
  # model.cut and finetune.unfreeze_from name its endpoints; VGG and ResNet's ImageNet weights
  # expect data.preprocessing='caffe', InceptionV3, Xception and MobileNetV2's 'inception',
  # EfficientNet 'raw' (it normalises inside the model, as Keras's does).
  model.backbone = 'inception_v3'
  model.cut = 'mixed7'                     # An endpoint of the backbone (the last block kept).
  # 'imagenet', a path to a Keras .h5, a converted checkpoint folder, or None (random init).
  model.pretrained = ml_collections.FieldReference('imagenet', field_type=str)
  model.head = 'flatten'                   # 'flatten' (the seed) or 'gap'.
  model.hidden = 1024
  model.dropout = 0.2
  # EfficientNet's drop-connect (stochastic depth) rate, Keras's drop_connect_rate: the b-th of
  # n blocks drops its residual branch per image at rate x b / n in training steps, in every
  # block up to the cut, frozen or not, as in Keras's fit. None: Keras's default (0.2); 0 turns
  # it off (and lets a frozen phase cache its features). Only for the families that have it.
  model.drop_connect_rate = ml_collections.FieldReference(None, field_type=float)

  # ---------------------------------------------------------------- speed
  # Faster ways to compute the same model (benchmarks/README.md). 'auto' turns a rewrite on for
  # the CPU backend, where it was measured to help, and off on GPU/TPU; 'on'/'off' force it.
  config.speed = speed = ml_collections.ConfigDict()
  # Stride-1 'VALID' convolutions as pad + crop, 1x1 convolutions as matmuls: same outputs.
  speed.fast_convs = 'auto'
  # Each inference-mode BatchNorm (frozen blocks; fine-tuning with train_bn=False) folded into
  # its convolution: differs from the unfolded model by float32 rounding only.
  speed.fold_bn = 'auto'
  # The 1x1 convolutions of a block that read its input run as one convolution.
  speed.merge_1x1 = 'auto'
  # The 3x3 pools' forward pass from shifted slices instead of XLA:CPU's slow reduce_window:
  # max pool bit-identical, average pool equal up to float32 summation order.
  speed.fast_pools = 'auto'
  # 'bfloat16': mixed precision for GPU/TPU (parameters, statistics and loss stay float32).
  # Slower on CPUs, which lack bfloat16 matrix units.
  speed.compute_dtype = 'float32'
  # A phase with the backbone frozen and augmentation off computes the backbone's features of
  # every image once and trains the head on them: the same steps, a fraction of the cost.
  # 'auto' caches wherever that holds (any backend), 'on' makes it an error where it cannot.
  speed.cache_features = 'auto'
  speed.cache_features_max_mb = 4096.0      # larger caches are skipped (held on every device)

  # ---------------------------------------------------------------- optimizer
  # Keras 3's optimizers, with Keras's argument names and update rules (README, "Training").
  config.optimizer = opt = ml_collections.ConfigDict()
  opt.name = 'rmsprop'                     # 'rmsprop', 'sgd', 'adam' or 'adamw'.
  opt.rho = 0.9                            # rmsprop
  opt.epsilon = 1e-7                       # rmsprop, adam, adamw
  opt.momentum = 0.0                       # sgd: velocity = momentum * velocity - lr * g
  opt.nesterov = False                     # sgd
  opt.beta_1 = 0.9                         # adam, adamw
  opt.beta_2 = 0.999                       # adam, adamw
  # adam, adamw: Keras's AMSGrad variant, the running maximum of the second moment.
  opt.amsgrad = False
  # Decoupled weight decay, w -= w * weight_decay * lr before each update (every optimizer).
  # None: none, except adamw's Keras default 0.004.
  opt.weight_decay = ml_collections.FieldReference(None, field_type=float)
  # Regexes over '/'-joined parameter paths excluded from weight decay, e.g. ('bias', '/bn/')
  # (Keras's exclude_from_weight_decay(var_names=...), which matches variable names).
  opt.weight_decay_exclude = ()
  # Gradient clipping, at most one of the three (as Keras), None: none. global_clipnorm: all
  # gradients together to this norm; clipnorm: each parameter array's gradient to this norm on
  # its own; clipvalue: each gradient element to [-clipvalue, clipvalue].
  opt.global_clipnorm = ml_collections.FieldReference(None, field_type=float)
  opt.clipnorm = ml_collections.FieldReference(None, field_type=float)
  opt.clipvalue = ml_collections.FieldReference(None, field_type=float)
  # Apply the mean gradient of this many batches every that many steps (None: every step):
  # an optimizer step on an N-times-larger batch (BatchNorm statistics aside).
  opt.gradient_accumulation_steps = ml_collections.FieldReference(None, field_type=int)
  # An exponential moving average of the trainable weights, updated after every step:
  # evaluation, the best checkpoint, predict and export use it, and the next phase starts
  # from it (Keras swaps it in at the end of fit).
  opt.use_ema = False
  opt.ema_momentum = 0.99
  # Overwrite the weights with their average every this many optimizer steps (None: never).
  opt.ema_overwrite_frequency = ml_collections.FieldReference(None, field_type=int)

  # keras.callbacks.ReduceLROnPlateau, per phase: the rate times `factor` (not below min_lr)
  # after `patience` epochs without an improvement of `min_delta` in `monitor`, then `cooldown`
  # epochs of rest. monitor None: off. Needs constant schedules.
  config.reduce_lr_on_plateau = plateau = ml_collections.ConfigDict()
  plateau.monitor = ml_collections.FieldReference(None, field_type=str)   # 'val_loss', ...
  plateau.factor = 0.1
  plateau.patience = 10
  plateau.min_delta = 1e-4
  plateau.cooldown = 0
  plateau.min_lr = 0.0

  # ---------------------------------------------------------------- loss
  # Cross-entropy (sigmoid for 2 classes, softmax for more), as Keras's compiled loss.
  config.loss = loss = ml_collections.ConfigDict()
  # Keras BinaryCrossentropy / CategoricalCrossentropy(label_smoothing=...): targets become
  # y (1 - s) + s / 2 (sigmoid) or y (1 - s) + s / k (softmax, k classes). In [0, 1); 0: none.
  # The validation loss is smoothed too, as Keras's val_loss.
  loss.label_smoothing = 0.0
  # Keras fit(class_weight=...): None (unweighted); 'balanced' (n / (k * count) per class from
  # the training split's counts, logged at the start); or a mapping {class name or index:
  # weight} (classes left out weigh 1), e.g. --config.loss.class_weight="{'humans': 2.0}".
  # The training loss is sum(weight * loss) / batch size (Keras's 'sum_over_batch_size');
  # the validation loss stays unweighted, as Keras's val_loss.
  loss.class_weight = ml_collections.FieldReference(None, field_type=object)

  # ---------------------------------------------------------------- phases
  # Warm-up: the backbone is frozen, only the head trains.
  config.warmup = ml_collections.ConfigDict()
  config.warmup.epochs = 10
  config.warmup.learning_rate = 1e-4
  # Freezing rules: (regex over '/'-joined parameter paths, 'train' | 'freeze' | a number),
  # first match wins, every parameter must match one. Paths look like
  # 'backbone/mixed6/branch7x7_1/conv/kernel' and 'head/hidden/kernel'. A number > 0 trains
  # at the phase's learning rate times it, e.g. ('^backbone/mixed6/', 0.1) (big_vision's
  # lr_mults; Keras has no per-layer rate in one optimizer).
  config.warmup.param_labels = (('^head/', 'train'), ('^backbone/', 'freeze'))
  # timm's / BEiT's layer-wise learning-rate decay: the head trains at the phase's rate, the
  # backbone's block at the cut at rate x decay, the one before it x decay^2, ..., the stem
  # x decay^(blocks); multiplied into param_labels' numbers. 1.0: none (the same step as
  # without). In (0, 1].
  config.warmup.layer_decay = 1.0
  config.warmup.early_stopping = _keras_early_stopping()
  config.warmup.schedule = schedule()

  # Fine-tuning: layers from `unfreeze_from` on are opened, with a lower learning rate.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.epochs = 5
  config.finetune.learning_rate = 1e-5
  config.finetune.unfreeze_from = 'mixed6'     # 'stem' opens the whole backbone.
  # BatchNorm in inference mode while fine-tuning (Keras's advice); True trains the BatchNorms
  # of the opened blocks with batch statistics.
  config.finetune.train_bn = False
  # Empty: the rules follow from unfreeze_from (head and blocks from it on train, the rest is
  # frozen). Set explicit (regex, label) rules here to override.
  config.finetune.param_labels = ()
  config.finetune.layer_decay = 1.0          # as config.warmup.layer_decay
  config.finetune.early_stopping = _keras_early_stopping()
  config.finetune.schedule = schedule()

  # Early stopping: end a phase when `metric` > `threshold` (mode 'max') or < `threshold`
  # (mode 'min') at the end of an epoch. Metrics: train_accuracy, train_loss, val_accuracy,
  # val_loss. The seed stops at train_accuracy > 0.999. (Applies to every phase; Keras's
  # patience rule is per phase: config.<phase>.early_stopping.)
  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.metric = ml_collections.FieldReference(None, field_type=str)
  config.early_stopping.threshold = 0.999
  config.early_stopping.mode = 'max'

  # ---------------------------------------------------------------- evaluation metrics
  # Every evaluation (each epoch's, the final one, --mode=eval) reports, beside loss and
  # accuracy: per-class precision / recall / F1 with macro and weighted means, balanced
  # accuracy, ROC AUC and average precision, log loss and the expected calibration error
  # (README, "Evaluation").
  config.eval = ml_collections.ConfigDict()
  # Top-k accuracy for each k here smaller than the number of classes.
  config.eval.top_k = (5,)
  # A two-class head's decision threshold on p(second class), chosen on the evaluated split:
  # 'f1' maximises the F1 score, 'youden' Youden's J (true minus false positive rate).
  config.eval.threshold = 'f1'
  # Equal-width bins of the top-class probability for the calibration error (ECE) and the
  # reliability diagram calibration.png (15, as Guo et al. 2017).
  config.eval.calibration_bins = 15

  return config


def _keras_early_stopping() -> ml_collections.ConfigDict:
  """config.<phase>.early_stopping: keras.callbacks.EarlyStopping for the phase (one Keras fit).

  Its counters start afresh with each phase and are checkpointed, so a resumed run continues
  them. Both this and config.early_stopping are checked at every epoch's end.
  """
  es = ml_collections.ConfigDict()
  # Keras monitor: train_loss, train_accuracy, val_loss or val_accuracy (Keras's loss,
  # accuracy, val_loss, val_accuracy); None: off.
  es.monitor = ml_collections.FieldReference(None, field_type=str)
  es.min_delta = 0.0            # an improvement must beat the best by more than this
  es.patience = 0               # epochs without improvement before the phase stops
  es.mode = 'auto'              # 'auto' (losses down, accuracies up), 'min' or 'max'
  # An epoch resets the patience only if it also beats this value (None: no baseline).
  es.baseline = ml_collections.FieldReference(None, field_type=float)
  # At the phase's end (stopped or not, as Keras 3), the weights of the best epoch: restored
  # from its checkpoint, which is kept until then.
  es.restore_best_weights = False
  es.start_from_epoch = 0       # the phase's first epochs not looked at
  return es
