"""The workdir's files for people and for later runs: where each lives and how it is written.

    WORKDIR/config.json     the resolved config (what eval and predict read)
    WORKDIR/checkpoints/    orbax checkpoints (hhjax.checkpointing)
    WORKDIR/metrics.jsonl   one row per epoch (hhjax.metrics)
    WORKDIR/tensorboard/    the same rows as TensorBoard scalars
    WORKDIR/loss.png, accuracy.png, eval.json (the validation split's final evaluation)
    WORKDIR/test.json, test/   the test split's, once training ends, and its pictures
    WORKDIR/eval/           --mode=eval's results, <split>-step_N.json with its pictures
    WORKDIR/report.html     the run report (hhjax.run_report)
    WORKDIR/train.lock      held by the training run (hhjax.workdir_lock)
    WORKDIR/data_listing.json   the training files the run started on (hhjax.data_listing)
    WORKDIR/confusion_matrix.png, misclassified.png, misclassified.json   (hhjax.pictures)
    WORKDIR/explain/        Grad-CAM pictures of --mode=explain (hhjax.explain)

Paths may be local or URLs such as gs://bucket/run (etils.epath).
"""

from collections.abc import Mapping
import json
import os
from typing import Any

from etils import epath
import ml_collections

from hhjax import errors
from hhjax import files

CONFIG_FILE = 'config.json'
EVAL_FILE = 'eval.json'
# The test split's evaluation a training run writes when it ends, and its pictures' folder.
TEST_FILE = 'test.json'
TEST_PICTURES = 'test'
CHECKPOINT_DIR = 'checkpoints'


def absolute(workdir: str | os.PathLike) -> str:
  """Local paths made absolute; URLs such as gs://bucket/run (multi-host TPU) kept as they are."""
  workdir = os.fspath(workdir)
  return workdir if '://' in workdir else os.path.abspath(workdir)


def checkpoint_dir(workdir: str | os.PathLike) -> str:
  return os.path.join(absolute(workdir), CHECKPOINT_DIR)


def save_config(config: ml_collections.ConfigDict, workdir: str, is_main: bool) -> None:
  """Writes the resolved config to WORKDIR/config.json (what eval and predict read)."""
  if is_main:
    files.write_atomic(epath.Path(workdir) / CONFIG_FILE,
                       config.to_json_best_effort(indent=2, sort_keys=True))


def check_workdir_flag(workdir: str | None) -> None:
  """Refuses a --workdir that is empty or names a local file, before anything is read there.

  An empty value would mean the current directory (a repository root would get checkpoints/,
  config.json, ...); a file cannot hold them.
  """
  if workdir is None:
    return
  if not workdir.strip():
    raise errors.ConfigError(
        f'--workdir is empty ({workdir!r}): expected the folder for checkpoints, metrics and '
        'plots, e.g. --workdir=/tmp/hhjax/run (use --workdir=. for the current directory).')
  if '://' not in workdir and os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise errors.ConfigError(
        f'--workdir={workdir} is a file, not a folder: expected the folder for checkpoints, '
        'metrics and plots. Choose another path or remove the file.')


def check_reachable(workdir: str) -> None:
  """Refuses a URL workdir (gs://...) that cannot be reached, in one line naming the cause.

  Offline, the storage client fails after its retries (seconds) with an OSError; without this
  check it surfaced from wherever the workdir was first touched, as a traceback.
  """
  if '://' not in workdir:
    return
  try:
    epath.Path(workdir).exists()
  except Exception as e:  # pylint: disable=broad-except
    # OSError from etils's own backends, tf.errors.OpError (FailedPreconditionError, ...)
    # from TensorFlow's file systems.
    if not isinstance(e, OSError) and not type(e).__module__.startswith('tensorflow'):
      raise
    raise errors.StorageUnreachableError(
        f'--workdir={workdir} cannot be reached ({str(e).splitlines()[0]}). Check the network '
        'and the credentials for that storage, or use a local --workdir.') from None


# The fields eval, predict, explain and export read from config.json; a file without them was
# not written by a training run (or was cut short).
REQUIRED_FIELDS = ('batch_size', 'data.source', 'data.image_size', 'model.cut', 'model.head')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir`."""
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise errors.DataNotFoundError(
        f'{path} not found: --workdir must be a directory that `python main.py --mode=train` '
        'wrote, or pass --config too.')
  return ml_collections.ConfigDict(parse_config_json(path.read_text(), str(path)))


def parse_config_json(text: str, where: str) -> dict[str, Any]:
  """config.json's text as a dict; a truncated, invalid or incomplete file is a DataError."""
  try:
    saved = json.loads(text)
  except ValueError as e:   # json.JSONDecodeError, UnicodeDecodeError
    raise errors.DataError(
        f'{where} is not valid JSON ({e}): it was cut short or edited. Pass --config=... '
        '(the config the run was trained with), or write the file again.') from None
  if not isinstance(saved, dict):
    raise errors.DataError(f'{where} holds a {type(saved).__name__}, not a config (a JSON '
                           'object). Pass --config=..., or write the file again.')
  flat = flat_fields(saved)
  missing = [f for f in REQUIRED_FIELDS if f not in flat]
  if missing:
    raise errors.DataError(
        f'{where} lacks the config fields {missing}: it is not the config a training run '
        'wrote. Pass --config=... (the config the run was trained with), or write the file '
        'again.')
  return saved


def write_eval(workdir: str, result: Mapping[str, Any], path: str | None = None) -> None:
  """Writes WORKDIR/eval.json, or `path` (another evaluation's file)."""
  files.write_atomic(epath.Path(path) if path else epath.Path(workdir) / EVAL_FILE,
                     json.dumps(dict(result), indent=2))


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (what checkpoints store as metadata)."""
  return json.loads(config.to_json_best_effort())


def flat_fields(d: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """A nested config dict as {'a.b.c': value}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, Mapping):
      out.update(flat_fields(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """'field: checkpoint X, now Y' for each field that differs between two config dicts."""
  a, b = flat_fields(saved), flat_fields(current)
  return [f'{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}'
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# The fields that decide what a trained model computes from an image: the pixels it is given
# (size, resampling, normalisation) and the layers it has. Evaluating or predicting with other
# values gives other numbers without any error, so eval and predict refuse them. model.dropout
# is left out (inactive at inference), and so is everything about where the data comes from and
# how it is batched, which may differ. The number of classes is the checkpoint's own, except
# for the synthetic source, whose classes the config sets.
INFERENCE_FIELDS = ('data.image_size', 'data.resize_method', 'data.preprocessing',
                    'model.backbone', 'model.cut', 'model.head', 'model.hidden')
# What a config written before a field existed meant by leaving it out.
FIELD_DEFAULTS = {'model.backbone': 'inception_v3'}


def inference_differences(saved: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
  """'config.FIELD: X in config.json, Y given' for each field of INFERENCE_FIELDS that differs."""
  a, b = ({**FIELD_DEFAULTS, **flat_fields(c)} for c in (saved, given))
  fields = list(INFERENCE_FIELDS)
  if a.get('data.source') == b.get('data.source') == 'fake':
    fields.append('data.fake.num_classes')
  return [f'config.{k}: {a.get(k)!r} in {CONFIG_FILE}, {b.get(k)!r} given'
          for k in fields if a.get(k) != b.get(k)]


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any],
                        workdir: str) -> None:
  """Refuses to resume a checkpoint under a config that changes what the model computes.

  The fields of INFERENCE_FIELDS (image size, resampling, normalisation, cut, head, hidden
  units): with a global-average-pooling head another image size fits every array, and training
  would go on silently on other inputs. Fields the checkpoint's config lacks (an older version
  wrote it) are not compared.
  """
  a, b = flat_fields(saved), flat_fields(current)
  diffs = [f'config.{k}: checkpoint {a[k]!r}, now {b.get(k)!r}'
           for k in INFERENCE_FIELDS if k in a and a[k] != b.get(k)]
  if diffs:
    raise errors.CheckpointMismatchError(
        f'The checkpoint in {workdir} was trained with another model or input: '
        f'{"; ".join(diffs)}. Resume with the values it was trained with, or train the new '
        'config in another --workdir.')


def check_inference_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a config under which eval or predict would compute another model than was trained.

  Compares with WORKDIR/config.json (the config of the training run); without that file there is
  nothing to compare with.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  diffs = inference_differences(parse_config_json(path.read_text(), str(path)),
                                config_dict(config))
  if diffs:
    raise errors.ConfigError(
        f'The given --config differs from the one {workdir} was trained with in what the model '
        f'computes: {"; ".join(diffs)}. Leave out --config to use {path}, or set these fields '
        'as they were (the data folder, splits and batch sizes may differ).')
