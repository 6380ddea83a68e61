"""Pretrained backbone weights: from a name, a Keras weights file or a converted folder.

`load_pretrained(spec, backbone=...)` takes what `config.model.pretrained` holds: 'imagenet'
(Keras's ImageNet weights of config.model.backbone without the top) or 'imagenet_top' (with
it), fetched and verified by `hhjax.weights.official`; the path of a Keras file, read by
`hhjax.weights.keras_h5` (the families whose layers Keras numbers: paired by position) or
`hhjax.weights.keras_named` (the families whose layers Keras names: by name, .keras archives
too); or a converted folder. `load_backbone` puts them into the classifier's backbone.

A converted folder is the one converted on-disk format: an orbax checkpoint of the variables and
the model's configuration, for machines where the training job should not read HDF5 or reach the
network. Files and folders may be local or on storage that TensorFlow reads (gs://). The
converter command writes it:

    python -m hhjax.weights.pretrained \
        --h5 inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 --out /data/inception_v3_notop

The official files are not converted for a cache: reading the .h5 takes about a second.
"""

import argparse
from collections.abc import Mapping
import os
import pathlib
import sys
import tempfile
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hhjax import errors
from hhjax import files
from hhjax import trees
from hhjax.model import backbones
from hhjax.weights import keras_h5
from hhjax.weights import keras_named
from hhjax.weights import official

Variables = keras_h5.Variables


def _model_metadata(model) -> dict[str, Any]:
  # The member's name too: MobileNetV2's alphas share one Keras name.
  declared = backbones.of_module(model)
  return {'architecture': declared.keras_name, 'backbone': declared.name,
          'final_endpoint': model.final_endpoint, 'include_top': model.include_top,
          'num_classes': model.num_classes}


def _model_from_metadata(meta: dict[str, Any], source: str):
  # Folders written before the member's name was stored name the Keras architecture only.
  backbone = backbones.BACKBONES.get(str(meta.get('backbone'))) or backbones.of_keras_name(
      str(meta.get('architecture')))
  if backbone is None:
    raise errors.KerasWeightsError(
        f'{source} does not hold the weights of a known backbone (metadata: {meta}).')
  return backbone.build(meta['final_endpoint'], include_top=meta['include_top'],
                        num_classes=meta['num_classes'])


def load_file(path: str | os.PathLike, backbone: str | None = None):
  """(module, variables) from a Keras weights file of `backbone` (default InceptionV3)."""
  declared = backbones.get(backbone)
  if declared.keras_names == 'position':
    return keras_h5.load_h5(path, declared.name)
  return keras_named.load(path, declared)


def _check_family(model, backbone: str | None, source: str) -> None:
  want, got = backbones.get(backbone), backbones.of_module(model)
  if got is not want:
    raise errors.KerasWeightsError(
        f'{source} holds {got.keras_name} weights, but config.model.backbone is '
        f'{want.name!r} ({want.keras_name}).')


def _path(path: str | os.PathLike) -> epath.Path:
  """A local path made absolute, or a URL (gs://) as it is: orbax reads and writes both."""
  if files.is_url(path):
    return epath.Path(path)
  return epath.Path(pathlib.Path(path).expanduser().resolve())


def save_converted(directory: str | os.PathLike, model,
                   variables: Variables) -> epath.Path:
  """Writes `variables` and the model's configuration as an orbax checkpoint in `directory`.

  The folder must not exist yet. `load_converted` and `load_pretrained` read it back.
  """
  directory = _path(directory)
  if directory.exists():
    raise errors.OutputExistsError(
        f'{directory} exists already: remove it or choose another folder.')
  keras_h5.check_variables(variables, keras_h5.abstract_variables(model),
                           source='save_converted')
  variables = jax.tree.map(np.asarray, variables)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(directory, ocp.args.Composite(
        variables=ocp.args.PyTreeSave(variables),
        metadata=ocp.args.JsonSave(_model_metadata(model))))
  return directory


def load_converted(directory: str | os.PathLike):
  """Reads a folder written by `save_converted` (or the converter command).

  Returns:
    (model, variables) as `keras_h5.load_h5` returns them.
  """
  directory = _path(directory)
  if not (directory / 'metadata').exists() or not (directory / 'variables').exists():
    found = sorted(p.name for p in directory.iterdir())[:10] if directory.is_dir() else 'nothing'
    raise errors.KerasWeightsError(
        f'{directory} is not a converted weights folder: expected the orbax items "metadata" '
        f'and "variables" that `python -m hhjax.weights.pretrained --h5 FILE --out DIR` '
        f'writes; found {found}.')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    meta = checkpointer.restore(
        directory, ocp.args.Composite(metadata=ocp.args.JsonRestore()))['metadata']
    model = _model_from_metadata(meta, str(directory))
    abstract = keras_h5.abstract_variables(model)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    variables = checkpointer.restore(directory, ocp.args.Composite(
        variables=ocp.args.PyTreeRestore(restore_args=restore_args)))['variables']
  variables = jax.tree.map(np.asarray, variables)
  keras_h5.check_variables(variables, abstract, source=str(directory))
  return model, variables


def _load_official(name: str, backbone: str | None = None):
  weights = official.official_weights(name, backbone)
  model, variables = load_file(official.fetch_official(name, backbone), backbone)
  transform = backbones.get(backbone).imagenet_variables
  if transform is not None:   # what Keras does to these files under weights='imagenet'
    variables = transform(variables)
  if model.include_top != weights.include_top:
    raise errors.KerasWeightsError(
        f'The official file for {name!r} has include_top={model.include_top}, expected '
        f'{weights.include_top}.')
  return model, variables


def _load_url(url: str, backbone: str | None = None):
  """A converted folder or a Keras .h5 file on storage that TensorFlow reads (gs://, ...)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  # seconds to load; URLs only
  if tf.io.gfile.isdir(url):
    return load_converted(url)   # orbax reads gs:// itself
  if not tf.io.gfile.exists(url):
    names = ' or '.join(map(repr, official.OFFICIAL_WEIGHTS))
    raise errors.DataNotFoundError(
        f'Pretrained weights {url!r}: expected {names}, a Keras .h5 file or a converted folder, '
        'but nothing exists there.')
  # h5py reads local files only: a copy in a temporary folder (88 MB for the notop file).
  with tempfile.TemporaryDirectory(prefix='hhjax_weights_') as tmp:
    local = os.path.join(tmp, os.path.basename(url.rstrip('/')) or 'weights.h5')
    tf.io.gfile.copy(url, local)
    try:
      return load_file(local, backbone)
    except errors.UserError as e:
      raise type(e)(str(e).replace(local, url)) from None


def load_pretrained(spec: str | os.PathLike, *, final_endpoint: str | None = None,
                    backbone: str | None = None):
  """Pretrained backbone weights from a name, a Keras file or a converted folder.

  Args:
    spec: 'imagenet' (Keras's ImageNet weights without the top), 'imagenet_top' (with it),
      the path of a Keras .h5 (or, for the families Keras names layers of, .keras) file, or a
      folder written by `save_converted`.
    final_endpoint: if given, cut the network there (see `keras_h5.cut`), dropping any top.
    backbone: config.model.backbone (None: InceptionV3); weights of another family are
      refused.

  Returns:
    (model, variables) as `keras_h5.load_h5` returns them.
  """
  if isinstance(spec, str) and spec in official.NAMES:
    model, variables = _load_official(spec, backbone)
  elif files.is_url(spec):
    model, variables = _load_url(os.fspath(spec), backbone)
  else:
    path = pathlib.Path(spec).expanduser()
    if path.is_dir():
      model, variables = load_converted(path)
    elif path.is_file():
      model, variables = load_file(path, backbone)
    else:
      names = ' or '.join(map(repr, official.OFFICIAL_WEIGHTS))
      raise errors.DataNotFoundError(
          f'Pretrained weights {str(spec)!r}: expected {names}, a Keras .h5 file or a converted '
          f'folder, but nothing exists at {path}.')
  _check_family(model, backbone, str(spec))
  if final_endpoint is not None:
    model, variables = keras_h5.cut(model, variables, final_endpoint)
  return model, variables


def load_backbone(variables: Mapping[str, Any], spec: str, cut: str,
                  backbone: str | None = None) -> dict[str, Any]:
  """Returns `variables` with the backbone replaced by pretrained weights.

  Strict: every backbone array of the model must come from the weights with the same shape,
  and the weights may hold nothing else except the blocks past `cut` and the ImageNet top,
  which are left out on purpose. Anything else is an error, not a partial load.

  Args:
    variables: the model's freshly initialised `{'params', 'batch_stats'}`.
    spec: 'imagenet', 'imagenet_top', a Keras .h5 file or a converted folder; see
      `load_pretrained`.
    cut: the model's last block.
    backbone: config.model.backbone (None: InceptionV3).
  """
  # Cutting there drops the blocks past the cut and the ImageNet top, and says so clearly when
  # the weights end before the cut.
  _, source = load_pretrained(spec, final_endpoint=cut, backbone=backbone)
  # A backbone without BatchNorm (VGG) has no batch_stats.
  collections = tuple(c for c in ('params', 'batch_stats') if variables[c].get('backbone'))
  ours = {c: variables[c]['backbone'] for c in collections}
  theirs = {c: source.get(c, {}) for c in collections}
  report = trees.describe_differences(
      trees.leaf_specs(theirs), trees.leaf_specs(ours), got_name='the weights',
      want_name='the model')
  if report:
    raise errors.KerasWeightsError(
        f'Pretrained weights {spec!r} do not fit the backbone cut at {cut!r}:\n{report}')
  out = {k: dict(v) for k, v in variables.items()}
  for c in collections:
    model_arrays = traverse_util.flatten_dict(ours[c], sep='/')
    arrays = traverse_util.flatten_dict(theirs[c], sep='/')
    out[c]['backbone'] = traverse_util.unflatten_dict(
        {k: jnp.asarray(arrays[k], dtype=v.dtype) for k, v in model_arrays.items()}, sep='/')
  logging.info('Loaded the backbone (up to %s) from %s.', cut, spec)
  return out


def _describe(model, variables: Variables) -> str:
  count = sum(np.size(v) for v in jax.tree.leaves(variables))
  top = f'with a {model.num_classes}-class top' if model.include_top else 'without top'
  name = backbones.of_module(model).keras_name
  return f'{name} up to {model.final_endpoint}, {top}, {count:,} values'


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m hhjax.weights.pretrained',
      description='Convert Keras backbone weights (.h5, .keras) into an orbax checkpoint '
                  'folder that training can start from (config.model.pretrained=DIR).')
  parser.add_argument('--h5', required=True,
                      help='Keras weights file, or "imagenet" / "imagenet_top" to download the '
                           'official file.')
  parser.add_argument('--out', required=True, help='Folder to create.')
  parser.add_argument('--backbone', default=backbones.DEFAULT, choices=backbones.NAMES,
                      help='The architecture of the weights (config.model.backbone).')
  args = parser.parse_args(argv)
  try:
    model, variables = load_pretrained(args.h5, backbone=args.backbone)
    out = save_converted(args.out, model, variables)
  except errors.UserError as e:
    # As main.py does: the message alone says what to fix; no traceback.
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)
  print(f'Wrote {_describe(model, variables)} to {out}')


if __name__ == '__main__':
  main()
