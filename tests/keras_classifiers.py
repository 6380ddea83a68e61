"""The Keras tutorial's classifier built and trained in Keras itself, for the import/export tests.

Written out as the tutorial writes it (not through hhjax's builder), with random weights drawn
as the parity tests draw them (`keras_reference.randomize`): no weights are downloaded.
"""

import os
import pathlib
import shutil

import numpy as np

import keras_reference

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def tutorial_model(keras, *, cut='mixed7', head='flatten', hidden=1024, dropout=0.2,
                   num_classes=2, size=75, seed=0, base=None):
  """InceptionV3 cut at `cut` -> Flatten/GAP -> Dense(hidden, relu) -> Dropout -> output.

  Compiled as the tutorial compiles it, with the backbone frozen (its warm-up). `base`: an
  InceptionV3 (no top) built already, whose layers the model then shares.
  """
  if base is None:
    base = keras.applications.InceptionV3(input_shape=(size, size, 3), include_top=False,
                                          weights=None)
  for layer in base.layers:
    layer.trainable = False
  x = base.get_layer(cut).output
  x = keras.layers.Flatten()(x) if head == 'flatten' else keras.layers.GlobalAveragePooling2D()(x)
  if hidden:
    x = keras.layers.Dense(hidden, activation='relu')(x)
  if dropout:
    x = keras.layers.Dropout(dropout)(x)
  binary = num_classes == 2
  x = keras.layers.Dense(1 if binary else num_classes,
                         activation='sigmoid' if binary else 'softmax')(x)
  model = keras.Model(base.input, x)
  keras_reference.randomize(model, seed)
  _near_identity_batch_norms(model, seed)
  options = {} if keras.__name__ == 'tf_keras' else {'jit_compile': False}   # no XLA wait
  model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=1e-4),
                loss='binary_crossentropy' if binary else 'sparse_categorical_crossentropy',
                metrics=['accuracy'], **options)
  return model


def _near_identity_batch_norms(model, seed: int) -> None:
  """BatchNorm statistics close to (0, 1), as in a trained network.

  With the parity tests' wider draws the offsets dominate, and every image ends up with
  features within ~1 % of every other's; here they stay ~5 % apart, so the comparisons of
  probabilities below are three times less at the mercy of float32 rounding.
  """
  rng = np.random.default_rng(seed + 1000)
  for layer in model.layers:
    if type(layer).__name__ == 'BatchNormalization':
      (c,) = layer.get_weights()[0].shape
      layer.set_weights([rng.normal(0.0, 0.05, c).astype(np.float32),    # beta
                         rng.normal(0.0, 0.05, c).astype(np.float32),    # moving_mean
                         rng.uniform(0.8, 1.2, c).astype(np.float32)])   # moving_variance


def spread_outputs(keras, model, images: np.ndarray, spread: float = 2.0, seed: int = 0):
  """Redraws the output layer so that its logits spread over a few units on `images`.

  Random backbones map all images to nearly the same features (a few % apart), so a random
  head would give every image nearly the same probability, and a comparison of probabilities
  would not tell a wrong input or weight from a right one. Centred and scaled to a standard
  deviation of `spread` over real images, the logits span probabilities from ~0.01 to ~0.99.
  """
  rng = np.random.default_rng(seed)
  output = model.layers[-1]
  features = keras.Model(model.input, output.input).predict(images, verbose=0)
  kernel = rng.normal(0.0, 1.0, output.get_weights()[0].shape)
  kernel *= spread / (features @ kernel).std(axis=0)
  output.set_weights([kernel.astype(np.float32),
                      (-features.mean(axis=0) @ kernel).astype(np.float32)])


def image_folder(real_data_dir: pathlib.Path, root: pathlib.Path, train: int = 4,
                 validation: int = 2) -> pathlib.Path:
  """A small copy of the real folder: `train` and `validation` images per class."""
  for split, count in (('train', train), ('validation', validation)):
    for label in ('horses', 'humans'):
      (root / split / label).mkdir(parents=True)
      for f in sorted((real_data_dir / split / label).glob('*.png'))[:count]:
        shutil.copy(f, root / split / label / f.name)
  return root


def pixels(files, size: int) -> np.ndarray:
  """uint8 [n, size, size, 3]: each file decoded and resized as hhjax's pipeline does."""
  from hhjax.data import decode  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  images = [decode.resize(decode.decode_image(tf.io.read_file(str(f))), size, 'bilinear')
            for f in files]
  return np.stack([np.clip(np.round(np.asarray(i)), 0, 255).astype(np.uint8) for i in images])


def labelled_files(real_data_dir: pathlib.Path, split: str) -> tuple[list, np.ndarray]:
  files, labels = [], []
  for label, name in enumerate(('horses', 'humans')):
    found = sorted((real_data_dir / split / name).glob('*.png'))
    files += found
    labels += [label] * len(found)
  return files, np.asarray(labels, np.int32)


def layer_paths(model, cut: str, hidden: bool) -> list[str]:
  """hhjax's path for each of the Keras model's layers with weights (by position)."""
  from hhjax.weights import keras_h5  # pylint: disable=g-import-not-at-top
  order = [f'backbone/{p}' for p in keras_h5.keras_layer_order(cut)]
  order += (['head/hidden'] if hidden else []) + ['head/output']
  layers = [layer for layer in model.layers if layer.weights]
  assert len(layers) == len(order)
  return list(zip(layers, order))


def fine_tune_losses(keras, tf, model, batches, *, cut: str, hidden: bool, unfreeze_from: str,
                     learning_rate: float) -> tuple[list[float], list[float]]:
  """Keras's losses for `batches`, fine-tuning as hhjax does by default; and without training.

  The blocks from `unfreeze_from` on and the head train (BatchNorm's beta too), every
  BatchNorm in inference mode (`training=False`, which also turns dropout off), Keras's
  RMSprop. The loss is taken from the logits, as Keras's fit takes it from a sigmoid output.
  The losses of the untouched model on the same batches show how much the steps changed.
  """
  from hhjax.model import inception  # pylint: disable=g-import-not-at-top
  opened = inception.BLOCKS[inception.BLOCKS.index(unfreeze_from):]
  for layer, path in layer_paths(model, cut, hidden):
    layer.trainable = path.startswith('head/') or path.split('/')[1] in opened
  output = model.layers[-1]
  output.activation = keras.activations.linear   # logits

  def loss_of(batch):
    logits = model(batch['image'], training=False)[:, 0]
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(
        labels=tf.cast(batch['label'], tf.float32), logits=logits))

  untrained = [float(loss_of(batch)) for batch in batches]
  optimizer = keras.optimizers.RMSprop(learning_rate=learning_rate)
  losses = []
  for batch in batches:
    with tf.GradientTape() as tape:
      loss = loss_of(batch)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    losses.append(float(loss))
  return losses, untrained


# ------------------------------------------------------------------------- Keras fit, phase by phase


def keras_schedule(keras, learning_rate: float, schedule):
  """The Keras 3 schedule of a `keras_optim.ScheduleSpec` (a float for 'constant')."""
  s = keras.optimizers.schedules
  if schedule.name == 'constant':
    return learning_rate
  if schedule.name == 'cosine':
    return s.CosineDecay(learning_rate, schedule.decay_steps, alpha=schedule.alpha,
                         warmup_target=schedule.warmup_target,
                         warmup_steps=schedule.warmup_steps)
  if schedule.name == 'exponential':
    return s.ExponentialDecay(learning_rate, schedule.decay_steps, schedule.decay_rate,
                              staircase=schedule.staircase)
  return s.PiecewiseConstantDecay(list(schedule.boundaries), list(schedule.values))


def keras_optimizer(keras, spec, learning_rate, schedule=None):
  """The Keras 3 optimizer of a `keras_optim.OptimizerSpec`, its arguments named as Keras's.

  `learning_rate` is a phase's rate, which `schedule` (a ScheduleSpec; None: constant) varies.
  """
  rate = learning_rate if schedule is None else keras_schedule(keras, learning_rate, schedule)
  common = dict(learning_rate=rate, weight_decay=spec.weight_decay,
                global_clipnorm=spec.global_clipnorm, clipnorm=spec.clipnorm,
                clipvalue=spec.clipvalue,
                gradient_accumulation_steps=spec.gradient_accumulation_steps,
                use_ema=spec.use_ema, ema_momentum=spec.ema_momentum,
                ema_overwrite_frequency=spec.ema_overwrite_frequency)
  if spec.name == 'sgd':
    opt = keras.optimizers.SGD(momentum=spec.momentum, nesterov=spec.nesterov, **common)
  elif spec.name == 'rmsprop':
    opt = keras.optimizers.RMSprop(rho=spec.rho, epsilon=spec.epsilon, **common)
  else:
    cls = keras.optimizers.AdamW if spec.name == 'adamw' else keras.optimizers.Adam
    if spec.name == 'adamw' and spec.weight_decay is None:
      common.pop('weight_decay')   # AdamW's own default
    opt = cls(beta_1=spec.beta_1, beta_2=spec.beta_2, epsilon=spec.epsilon,
              amsgrad=spec.amsgrad, **common)
  if spec.weight_decay_exclude:
    opt.exclude_from_weight_decay(var_names=list(spec.weight_decay_exclude))
  return opt


def keras_variables(model, spec) -> dict[tuple[str, ...], np.ndarray]:
  """A Keras classifier's arrays by hhjax path: {(collection, *keys): array}."""
  from hhjax.weights import keras_classifier  # pylint: disable=g-import-not-at-top
  out = {}
  for entry in keras_classifier.keras_layer_paths(model, spec):
    for (collection, keys), value in zip(entry.targets, entry.layer.get_weights()):
      out[(collection,) + tuple(keys)] = np.asarray(value)
  return out


def grouped_rates_model(keras, tf, model, groups):
  """`model` (its layers shared) fitted with one Keras optimizer per group of variables.

  `groups`: [(optimizer, variables)]. Keras has no per-layer learning rate within one
  optimizer; a `train_step` that applies each group's optimizer to its variables (Keras's
  documented way to customise `fit`, otherwise its own train step: the compiled loss with
  `sample_weight`, the loss tracker) trains each group at its own rate.
  """

  class GroupedRates(keras.Model):

    def train_step(self, data):
      x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
      with tf.GradientTape() as tape:
        y_pred = self(x, training=True)
        loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                 training=True)
      variables = self.trainable_variables
      by_path = dict(zip([v.path for v in variables], tape.gradient(loss, variables)))
      for optimizer, group in groups:
        optimizer.apply([by_path[v.path] for v in group], group)
      for metric in self.metrics:
        if metric.name == 'loss':
          metric.update_state(loss, sample_weight=tf.shape(x)[0])
        else:
          metric.update_state(y, y_pred)
      return {m.name: m.result() for m in self.metrics}

  for optimizer, group in groups:
    optimizer.build(group)
  return GroupedRates(inputs=model.inputs, outputs=model.outputs)


def fit_steps(keras, model, spec, x, y, *, batch_size: int, **fit_kwargs):
  """Keras `fit` over (x, y) in order, one epoch: each step's loss and the arrays (by hhjax
  path) after the last step, before fit's end swaps the EMA in (`finalize_variable_values`),
  and after it.

  Keras reports the running mean of the epoch's losses after each step; with batches of one
  size, step k's own loss is k * mean_k - (k - 1) * mean_(k-1).
  """
  seen = {}

  class Record(keras.callbacks.Callback):

    def on_train_batch_end(self, batch, logs=None):
      seen.setdefault('means', []).append(float(logs['loss']))

    def on_epoch_end(self, epoch, logs=None):
      seen['raw'] = keras_variables(model, spec)

  model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
            callbacks=[Record()], **fit_kwargs)
  means = seen['means']
  losses = [(k + 1) * m - k * (means[k - 1] if k else 0.0) for k, m in enumerate(means)]
  return losses, seen['raw'], keras_variables(model, spec)
