"""The pure step functions: the loss, the train step and the eval step.

No TensorFlow here and no Python work per step: each function is traced once and jitted by
its caller with explicit shardings (batch on 'data', the rest replicated, state donated).

The state the train step carries is a plain pytree:

    step            int32, global step (counts every phase; also the data stream's position)
    params          {'backbone': ..., 'head': ...}
    batch_stats     {'backbone': ...}
    opt_state       optax state of this phase's optimizer (none for frozen parameters); also
                    the pending micro-batch gradients, the EMA weights and the injected rate
                    when config.optimizer asks for them (hhjax.training.keras_optim)
    rng             dropout key; step `s` uses fold_in(rng, s)
    metrics         running sums of the current epoch (loss_sum, correct, count)
    nonfinite_step  first step whose loss was NaN/inf, or -1
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from hhjax.model import classifier
from hhjax.training import losses
from hhjax.training import mix as mix_lib
from hhjax.training import optim
from hhjax.training import phases as phases_lib

PyTree = Any


def predicted_class(logits: jax.Array) -> jax.Array:
  if logits.shape[-1] == 1:
    return (logits[:, 0] > 0).astype(jnp.int32)  # sigmoid > 0.5, as Keras's binary accuracy
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def zero_metrics() -> dict[str, jax.Array]:
  return {'loss_sum': jnp.zeros((), jnp.float32), 'correct': jnp.zeros((), jnp.int32),
          'count': jnp.zeros((), jnp.int32)}


def _loss_fn(model, phase: phases_lib.Phase, loss: losses.LossSpec):
  """(trainable, frozen, batch_stats, images, labels, rng) -> (batch loss, (logits, stats)).

  The batch loss is config.loss's (hhjax.training.losses.batch_loss): the mean cross-entropy,
  with Keras's label smoothing and class weights when they are set.
  """

  def loss_fn(trainable, frozen, batch_stats, images, labels, rng):
    variables = {'params': optim.merge(trainable, frozen), 'batch_stats': batch_stats}
    if phase.bn_train_from is None:
      logits = model.apply(variables, images, train=True, rngs={'dropout': rng})
      new_batch_stats = batch_stats
    else:
      logits, updated = model.apply(variables, images, train=True,
                                    bn_train_from=phase.bn_train_from,
                                    rngs={'dropout': rng}, mutable=['batch_stats'])
      new_batch_stats = updated.get('batch_stats', batch_stats)   # none without BatchNorm
    return losses.batch_loss(logits, labels, loss), (logits, new_batch_stats)

  return loss_fn


def make_train_step(model, setup: phases_lib.PhaseSetup,
                    prepare: Callable[[PyTree], jax.Array] | None = None,
                    mix: Callable[[jax.Array, jax.Array, jax.Array],
                                  tuple[jax.Array, jax.Array]] | None = None
                    ) -> Callable[[PyTree, PyTree], PyTree]:
  """The phase's train step `(state, batch) -> state`, not yet jitted.

  Only the parameters labelled 'train' are differentiated: the frozen ones are closed over as
  constants, so XLA builds no backward pass through them (a warm-up step costs about one
  backbone forward plus the head) and they come out bit-identical.

  `prepare` (batch -> images), when given, makes the step's images from the batch: the
  augmentation on the device (hhjax.training.device_augment.for_data).

  `mix` (images, labels, step -> images, soft targets), when given, mixes the batch after
  that (hhjax.training.mix.for_data: mixup and CutMix); the loss then reads the soft targets,
  and the training accuracy scores each example against its dominant label (the largest
  share of its target). None: the step is the one without mixing, the same operations.
  """
  loss_fn = _loss_fn(model, setup.phase, setup.loss)
  labels, tx = setup.labels, setup.tx

  def train_step(state, batch):
    step = state['step']
    rng = jax.random.fold_in(state['rng'], step)
    images, labels_ = batch['image'], batch['label']
    if prepare is not None:
      images = prepare(batch)
    targets = labels_
    if mix is not None:
      images, targets = mix(images, labels_, step)
      labels_ = mix_lib.dominant_label(targets)   # what the accuracy scores against
    trainable, frozen = optim.split(state['params'], labels)
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, frozen, state['batch_stats'], images, targets, rng)
    # The optimizer is an optax.partition over the full tree; the frozen part's "gradients"
    # are zeros its 'freeze' transform discards, and its output is dropped below, so XLA
    # removes both.
    full_grads = optim.merge(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state['opt_state'], state['params'])
    trainable_updates, _ = optim.split(updates, labels)
    params = optim.merge(optax.apply_updates(trainable, trainable_updates), frozen)
    m = state['metrics']
    correct = jnp.sum(predicted_class(logits) == labels_)
    finite = jnp.isfinite(loss)
    return {
        'step': step + 1,
        'params': params,
        'batch_stats': batch_stats,
        'opt_state': opt_state,
        'rng': state['rng'],
        'metrics': {'loss_sum': m['loss_sum'] + loss * labels_.shape[0],
                    'correct': m['correct'] + correct.astype(jnp.int32),
                    'count': m['count'] + labels_.shape[0]},
        # Recorded as the step number the progress lines show (steps done, 1-based).
        'nonfinite_step': jnp.where((state['nonfinite_step'] < 0) & ~finite, step + 1,
                                    state['nonfinite_step']),
    }

  return train_step


def make_eval_step(model, num_classes: int, label_smoothing: float = 0.0):
  """`(params, batch_stats, batch) -> sums` over the masked examples, with a confusion matrix.

  The loss is Keras's val_loss: the compiled loss (`label_smoothing` included) without class
  weights.

  Also returns the batch's 'probabilities' [b, num_classes], padding included: the pictures of
  an evaluation (hhjax.pictures) rank examples by them without a second pass.
  """

  def eval_step(params, batch_stats, batch):
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, batch['image'],
                         train=False)
    labels_ = batch['label']
    mask = batch['mask'].astype(jnp.float32) if 'mask' in batch else jnp.ones(labels_.shape)
    pred = predicted_class(logits)
    confusion = jnp.einsum('bi,bj->ij', jax.nn.one_hot(labels_, num_classes) * mask[:, None],
                           jax.nn.one_hot(pred, num_classes))
    return {'loss_sum': jnp.sum(losses.per_example_loss(logits, labels_, label_smoothing)
                                * mask),
            'correct': jnp.sum((pred == labels_) * mask),
            'count': jnp.sum(mask),
            'confusion': confusion,
            'probabilities': classifier.probabilities(logits)}

  return eval_step
