"""mixup and CutMix of whole training batches, inside the jitted train step (config.data.mix).

    mixer = for_data(data, num_classes)          # None when config.data.mix is off
    images, targets = mixer(images, labels, step)

timm's `Mixup` in its default 'batch' mode, with `correct_lam=True`:

  * Per batch: with probability `prob` the batch is mixed (timm's mixup_prob); if both
    alphas are > 0 it is CutMix with probability `switch_prob`, else mixup; lambda is drawn
    from Beta(alpha, alpha) of the chosen kind. An unmixed batch has lambda = 1.
  * Each example's partner is the batch reversed (timm's `x.flip(0)`): example i is mixed
    with example b - 1 - i of the GLOBAL batch. The step sees the global batch (sharded over
    the devices), so 1 and N devices mix the same pairs.
  * mixup: x = lambda x + (1 - lambda) x_flip, in the model-input domain (normalisation is
    affine, so this equals mixing the pixels and normalising after).
  * CutMix: timm's rand_bbox, a box of sides int(H sqrt(1 - lambda)) x int(W sqrt(1 - lambda))
    around a uniform centre, clipped to the image, gets x_flip's pixels; lambda becomes
    1 - (pasted area) / (H W), the share of the image that is still the example's own.
  * The targets are soft: lambda onehot(y) + (1 - lambda) onehot(y_flip) (timm's
    mixup_target; label smoothing is applied to them by the loss, which gives timm's
    smoothed-then-mixed targets exactly, both being affine).

Every draw comes from a JAX key made of (config.seed, a salt, the global step), as the
augmentation's draws come from (config.seed, salt, position): the same (seed, step) gives the
same mixed batch after a resume, on any number of devices.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from hhjax.data import spec as data_spec
from hhjax.model import preprocessing as preprocessing_lib

# Beside hhjax.data.streams's salts (1 to 5), which this module does not import (TensorFlow).
MIX_SALT = 6


def key(seed: int, step: jax.Array) -> jax.Array:
  """The batch's mixing key: the threefry key of `seed`, folded with MIX_SALT, then the step."""
  base = jax.random.fold_in(jax.random.key(seed, impl='threefry2x32'), MIX_SALT)
  return jax.random.fold_in(base, step)


def draw(rng: jax.Array, mix: data_spec.MixSpec, height: int, width: int
         ) -> dict[str, jax.Array]:
  """timm's per-batch draws: {'lam', 'cutmix', 'box' (top, bottom, left, right), 'beta'}.

  'lam' is the target weight of each example's own label: Beta's draw for mixup, the corrected
  one (the share not pasted over) for CutMix, 1 for a batch drawn not to mix. 'beta' is the
  draw before CutMix's correction (1 for a batch not mixed).
  """
  k_apply, k_switch, k_mixup, k_cutmix, k_cy, k_cx = jax.random.split(rng, 6)
  apply = jax.random.uniform(k_apply) < mix.prob
  if mix.mixup_alpha > 0 and mix.cutmix_alpha > 0:
    cutmix = jax.random.uniform(k_switch) < mix.switch_prob
  else:
    cutmix = jnp.asarray(mix.cutmix_alpha > 0)
  lam_mixup = (jax.random.beta(k_mixup, mix.mixup_alpha, mix.mixup_alpha)
               if mix.mixup_alpha > 0 else jnp.float32(1.0))
  lam_cutmix = (jax.random.beta(k_cutmix, mix.cutmix_alpha, mix.cutmix_alpha)
                if mix.cutmix_alpha > 0 else jnp.float32(1.0))
  lam = jnp.where(apply, jnp.where(cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)
  box = cutmix_box(k_cy, k_cx, lam, height, width)
  box_area = (box[1] - box[0]) * (box[3] - box[2])
  # The share not pasted over; clipped, as XLA divides by a constant as a multiplication.
  corrected = jnp.clip((height * width - box_area).astype(jnp.float32)
                       / jnp.float32(height * width), 0.0, 1.0)
  cutmix = apply & cutmix
  return {'lam': jnp.where(cutmix, corrected, lam), 'cutmix': cutmix, 'box': box,
          'beta': lam}


def cutmix_box(k_cy: jax.Array, k_cx: jax.Array, lam: jax.Array, height: int,
               width: int) -> jax.Array:
  """timm's rand_bbox: int32 (top, bottom, left, right), rows [top, bottom) x cols."""
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = (height * ratio).astype(jnp.int32)   # int(): truncation, lengths are >= 0
  cut_w = (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(k_cy, (), 0, height)
  cx = jax.random.randint(k_cx, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return jnp.stack([top, bottom, left, right]).astype(jnp.int32)


def mix_images(images: jax.Array, drawn: dict[str, jax.Array]) -> jax.Array:
  """The batch [b, H, W, C] mixed with its reverse as `drawn` says (unchanged: lam 1)."""
  flipped = images[::-1]
  lam = drawn['lam'].astype(images.dtype)
  mixed = lam * images + (1 - lam) * flipped
  top, bottom, left, right = drawn['box']
  rows = jnp.arange(images.shape[1])[:, None]
  cols = jnp.arange(images.shape[2])[None, :]
  inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  pasted = jnp.where(inside[None, :, :, None], flipped, images)
  return jnp.where(drawn['cutmix'], pasted, jnp.where(drawn['lam'] < 1, mixed, images))


def mix_targets(labels: jax.Array, lam: jax.Array, num_classes: int) -> jax.Array:
  """lam onehot(y) + (1 - lam) onehot(y reversed): float32 [b, num_classes], rows sum to 1."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  return lam * onehot + (1 - lam) * onehot[::-1]


def dominant_label(targets: jax.Array) -> jax.Array:
  """The label a soft target is scored against for accuracy: its largest share (ties: the
  lower class index)."""
  return jnp.argmax(targets, axis=-1).astype(jnp.int32)


def for_data(data: data_spec.DataSpec, num_classes: int
             ) -> Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None:
  """(images, labels, step) -> (mixed float32 images, soft targets); None when mixing is off.

  uint8 images (config.data.image_dtype='uint8' with the host augmenting) are normalised first,
  as the model would normalise them.
  """
  mix = data.mix
  if not mix.enabled:
    return None

  def mixer(images, labels, step):
    images = preprocessing_lib.normalize_images(images, data.preprocessing)
    drawn = draw(key(data.seed, step), mix, images.shape[1], images.shape[2])
    return mix_images(images, drawn), mix_targets(labels, drawn['lam'], num_classes)
  return mixer
