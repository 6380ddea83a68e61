"""Pretrained InceptionV3 weights into the classifier's backbone."""

from collections.abc import Mapping
from typing import Any

from absl import logging
from flax import traverse_util
import jax.numpy as jnp
import numpy as np

from hhjax import errors
from hhjax.model import inception
from hhjax.weights import keras_h5


def load_backbone(variables: Mapping[str, Any], spec: str, cut: str) -> dict[str, Any]:
  """Returns `variables` with the backbone replaced by pretrained InceptionV3 weights.

  Strict: every backbone array of the model must come from the weights with the same shape,
  and the weights may hold nothing else except the blocks past `cut` and the ImageNet top,
  which are left out on purpose. Anything else is an error, not a partial load.

  Args:
    variables: the model's freshly initialised `{'params', 'batch_stats'}`.
    spec: 'imagenet', 'imagenet_top', a Keras .h5 file or a converted folder; see
      `hhjax.weights.keras_h5.load_pretrained`.
    cut: the model's last block.
  """
  # Cutting there drops the blocks past the cut and the ImageNet top, and says so clearly when
  # the weights end before the cut.
  _, source = keras_h5.load_pretrained(spec, final_endpoint=cut)
  past_cut = set(inception.ENDPOINTS[inception.ENDPOINTS.index(cut) + 1:]) | {'predictions'}
  out = {k: dict(v) for k, v in variables.items()}
  problems = []
  for collection in ('params', 'batch_stats'):
    ours = traverse_util.flatten_dict(variables[collection]['backbone'], sep='/')
    theirs = {k: v for k, v in
              traverse_util.flatten_dict(source.get(collection, {}), sep='/').items()
              if k.split('/')[0] not in past_cut}
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    wrong = sorted(k for k in set(ours) & set(theirs)
                   if tuple(np.shape(theirs[k])) != tuple(np.shape(ours[k])))
    for title, keys, show in (
        ('missing from the weights', missing, lambda k: k),
        ('in the weights but not in the model', unexpected, lambda k: k),
        ('of another shape (weights vs model)', wrong,
         lambda k: f'{k}: {np.shape(theirs[k])} vs {np.shape(ours[k])}')):
      if keys:
        problems.append(f'{len(keys)} {collection} {title}: ' +
                        ', '.join(show(k) for k in keys[:6]) + (' ...' if len(keys) > 6 else ''))
    if not (missing or unexpected or wrong):
      loaded = {k: jnp.asarray(theirs[k], dtype=ours[k].dtype) for k in ours}
      out[collection]['backbone'] = traverse_util.unflatten_dict(loaded, sep='/')
  if problems:
    raise errors.KerasWeightsError(
        f'Pretrained weights {spec!r} do not fit the backbone cut at {cut!r}:\n  ' +
        '\n  '.join(problems))
  logging.info('Loaded the backbone (up to %s) from %s.', cut, spec)
  return out
