"""WORKDIR/report.html: one self-contained page to look at a run.

Written at the end of training and by `--mode=eval`, from what the run left in its workdir:
the config (config.json), the curves (accuracy.png, loss.png), each evaluation's metrics
(eval.json) with its confusion matrix, reliability diagram and misclassified images, and the
Grad-CAM overview of `--mode=explain` when there is one. Every picture is embedded as a data:
URI and the page has no script: it opens whole from a laptop's disk, an e-mail or a bucket,
without a network.

    write(workdir)                       the page for the files of today's workdir
    write(workdir, [Evaluation, ...])    the page for the given evaluations (e.g. a validation
                                         and a test split, each with its own pictures)
"""

from collections.abc import Mapping, Sequence
import base64
import dataclasses
import datetime
import html
import json
import os
import pathlib
from typing import Any

from absl import logging
from etils import epath

from hhjax import eval_metrics
from hhjax import explain
from hhjax import files
from hhjax import pictures
from hhjax import workdir as workdir_lib

REPORT_FILE = 'report.html'
CURVES = (('accuracy.png', 'Training and validation accuracy per epoch'),
          ('loss.png', 'Training and validation loss per epoch'))
GRADCAM_OVERVIEW = os.path.join(explain.EXPLAIN_DIR, explain.OVERVIEW_FILE)

# The config fields a reader looks for first; the whole config follows, folded.
SUMMARY_FIELDS = ('model.backbone', 'model.cut', 'model.head', 'model.hidden', 'model.dropout',
                  'model.pretrained', 'data.source', 'data.name', 'data.dir', 'data.train_split',
                  'data.validation_split', 'data.validation_fraction', 'data.test_split',
                  'data.image_size', 'data.augment.enabled', 'batch_size', 'optimizer.name',
                  'warmup.epochs', 'warmup.learning_rate', 'finetune.epochs',
                  'finetune.learning_rate', 'finetune.unfreeze_from', 'early_stopping.metric',
                  'seed')

_NAMES = {'accuracy': 'accuracy', 'loss': 'loss (the training objective)',
          'balanced_accuracy': 'balanced accuracy', 'precision_macro': 'precision, macro mean',
          'recall_macro': 'recall, macro mean', 'f1_macro': 'F1, macro mean',
          'precision_weighted': 'precision, weighted mean',
          'recall_weighted': 'recall, weighted mean', 'f1_weighted': 'F1, weighted mean',
          'roc_auc': 'ROC AUC', 'average_precision': 'average precision',
          'log_loss': 'log loss', 'ece': 'expected calibration error'}


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """One evaluated split as the page shows it.

  title: its heading, e.g. 'validation (test split)'.
  result: an eval.json dict (hhjax.training.evaluation.eval_json).
  pictures: (caption, file name in the workdir) in the order shown; missing files are left out.
  """
  title: str
  result: Mapping[str, Any]
  pictures: Sequence[tuple[str, str]] = ()
  key: str = ''   # the page's name for its section (data-evaluation): 'validation', 'test', ...


def _read_json(path: epath.Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _pictures(folder: str = '') -> tuple[tuple[str, str], ...]:
  """An evaluation's pictures, as (caption, path under the workdir): hhjax.pictures' files in
  `folder` (the workdir itself for the training run's validation)."""
  return tuple((caption, os.path.join(folder, name)) for caption, name in (
      ('Confusion matrix', pictures.CONFUSION_FILE),
      ('Reliability diagram', pictures.CALIBRATION_FILE),
      ('Misclassified images', pictures.EXAMPLES_FILE)))


def evaluation_of(result: Mapping[str, Any], title: str, folder: str = '',
                  key: str = '') -> Evaluation:
  """An evaluation result with its pictures in `folder` (relative to the workdir)."""
  split = result.get('split')
  return Evaluation(title=f'{title}: {split}' if split else title, result=result,
                    pictures=_pictures(folder), key=key or title.lower())


def evaluations_in(workdir: str) -> list[Evaluation]:
  """The training run's evaluations: validation (eval.json, its pictures beside it) and, when
  there is one, test (test.json, its pictures in test/)."""
  directory = epath.Path(workdir)
  found = []
  for file, title, folder in ((workdir_lib.EVAL_FILE, 'Validation', ''),
                              (workdir_lib.TEST_FILE, 'Test', workdir_lib.TEST_PICTURES)):
    result = _read_json(directory / file)
    if result is not None:
      found.append(evaluation_of(result, title, folder))
  return found


def _number(value: Any) -> str:
  if value is None:
    return 'undefined'
  if isinstance(value, float):
    return f'{value:.4f}'
  return html.escape(str(value))


def _image(directory: epath.Path, name: str, caption: str, css: str = '') -> str:
  path = directory / name
  if not path.exists():
    return ''
  data = base64.b64encode(path.read_bytes()).decode('ascii')
  return (f'<figure class="{css}"><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}" '
          f'data-file="{html.escape(name)}"><figcaption>{html.escape(caption)}</figcaption>'
          '</figure>')


def _table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None,
           css: str = '') -> str:
  head = ('<thead><tr>' + ''.join(f'<th>{h}</th>' for h in header) + '</tr></thead>'
          if header else '')
  body = ''.join('<tr>' + ''.join(rows_cell for rows_cell in row) + '</tr>' for row in rows)
  return f'<table class="{css}">{head}<tbody>{body}</tbody></table>'


def _cell(value: Any, metric: str = '', reason: str = '') -> str:
  attrs = f' data-metric="{html.escape(metric)}"' if metric else ''
  if reason:
    attrs += f' title="{html.escape(reason)}"'
  return f'<td{attrs}>{_number(value)}</td>'


def _metrics_section(result: Mapping[str, Any]) -> str:
  undefined = result.get('undefined') or {}
  names = ['accuracy', 'loss'] + eval_metrics.scalar_names(result)
  rows = []
  for name in names:
    label = _NAMES.get(name) or name.replace('_', ' ').replace('top ', 'top-')
    if name == 'ece' and 'calibration' in result:
      label += (f' ({result["calibration"]["bins"]} '
                f'{html.escape(result["calibration"]["binning"])})')
    rows.append([f'<th>{html.escape(label)}</th>',
                 _cell(result.get(name), name, undefined.get(name, ''))])
  out = _table(rows, css='metrics')
  per_class = result.get('per_class')
  if per_class:
    columns = ('precision', 'recall', 'f1', 'support', 'predicted')
    rows = [[f'<th>{html.escape(name)}</th>'] + [
        _cell(values[c], f'{c}/{name}', undefined.get(f'{c}/{name}', '')) for c in columns]
        for name, values in per_class.items()]
    out += '<h4>Per class</h4>' + _table(
        rows, ['class', 'precision', 'recall', 'F1', 'support', 'predicted'], css='per-class')
  threshold = result.get('threshold')
  if threshold:
    out += _threshold_section(threshold, undefined)
  if undefined:
    out += ('<h4>Undefined or set by convention</h4><ul>' + ''.join(
        f'<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>' for k, v in undefined.items())
        + '</ul>')
  return out


def _threshold_section(threshold: Mapping[str, Any], undefined: Mapping[str, str]) -> str:
  rule = {'f1': 'F1', 'youden': "Youden's J"}.get(threshold['rule'], threshold['rule'])
  title = (f'<h4>Decision threshold on p({html.escape(str(threshold["positive_class"]))}), '
           f'chosen to maximise {html.escape(rule)} on this split</h4>')
  columns = ('threshold', 'accuracy', 'balanced_accuracy', 'precision', 'recall', 'f1')
  rows = []
  for key, label in (('at_value', 'chosen'), ('at_0.5', '0.5')):
    at = threshold.get(key)
    if at is None:
      rows.append([f'<th>{label}</th>'] + [
          _cell(None, f'{key}/{c}', undefined.get('threshold', '')) for c in columns])
    else:
      rows.append([f'<th>{label}</th>'] + [_cell(at[c], f'{key}/{c}') for c in columns])
  return title + _table(rows, ['', 'threshold', 'accuracy', 'balanced accuracy',
                               'precision', 'recall', 'F1'], css='threshold')


# The data fields that a source does not read.
_UNUSED = {'fake': ('data.name', 'data.dir'), 'folder': ('data.name',),
           'tfds': ('data.fake.',)}


def _config_section(config: Mapping[str, Any]) -> str:
  flat = workdir_lib.flat_fields(config)
  unused = _UNUSED.get(flat.get('data.source'), ())
  fields = [k for k in SUMMARY_FIELDS if k in flat and not k.startswith(unused)]
  if flat.get('data.source') == 'fake':
    fields += [k for k in flat if k.startswith('data.fake.')]
  summary = [[f'<th>{html.escape(k)}</th>', f'<td>{html.escape(repr(flat[k]))}</td>']
             for k in fields]
  full = [[f'<th>{html.escape(k)}</th>', f'<td>{html.escape(repr(v))}</td>']
          for k, v in sorted(flat.items())]
  return (_table(summary, css='config') + '<details><summary>The whole config '
          f'({len(full)} fields, {workdir_lib.CONFIG_FILE})</summary>'
          + _table(full, css='config') + '</details>')


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
td { font-variant-numeric: tabular-nums; text-align: right; }
table.config td { text-align: left; font-family: monospace; }
thead th { background: #f2f2f2; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
figure.half { width: 48%; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
.note { color: #555; }
"""


def render(workdir: str, evaluations: Sequence[Evaluation]) -> str:
  """The page's HTML (see the module docstring)."""
  directory = epath.Path(workdir)
  config = _read_json(directory / workdir_lib.CONFIG_FILE)
  name = directory.name
  parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
           f'<title>Run report: {html.escape(name)}</title><style>{_STYLE}</style></head><body>',
           f'<h1>Run report: {html.escape(name)}</h1>',
           f'<p class="note">{html.escape(str(workdir))}, written '
           f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.</p>']
  if config:
    parts += ['<h2>Config</h2>', _config_section(config)]
  curves = ''.join(_image(directory, file, caption, 'half') for file, caption in CURVES)
  if curves:
    parts += ['<h2>Curves</h2>', curves]
  for evaluation in evaluations:
    result = evaluation.result
    parts += [f'<section data-evaluation="{html.escape(evaluation.key)}">'
              f'<h2>{html.escape(evaluation.title)}</h2>',
              f'<p>Step {_number(result.get("step"))}, {_number(result.get("count"))} images, '
              f'classes {html.escape(", ".join(map(str, result.get("class_names", []))))}.</p>',
              _metrics_section(result)]
    parts += [_image(directory, file, caption) for caption, file in evaluation.pictures]
    parts.append('</section>')
  overview = _image(directory, GRADCAM_OVERVIEW, 'Grad-CAM overview (--mode=explain)')
  if overview:
    parts += ['<h2>Grad-CAM</h2>', overview]
  parts.append('</body></html>')
  return '\n'.join(parts)


def write(workdir: str, evaluations: Sequence[Evaluation] | None = None,
          path: str | None = None) -> str:
  """Writes the page; returns its path.

  Args:
    workdir: the run's workdir.
    evaluations: what to show; by default the training run's validation and test results
      (`evaluations_in`).
    path: where the page goes (default WORKDIR/report.html; --mode=eval writes its own beside
      its results, so that the training run's page stays as it was).
  """
  if evaluations is None:
    evaluations = evaluations_in(workdir)
  path = epath.Path(path) if path else epath.Path(workdir) / REPORT_FILE
  files.write_atomic(path, render(workdir, evaluations))
  return str(path)


def link(path: str) -> str:
  """A local path as a file:// URL a terminal can open; a URL (gs://) as it is."""
  return path if '://' in path else pathlib.Path(path).absolute().as_uri()


def write_and_log(workdir: str, evaluations: Sequence[Evaluation] | None = None,
                  path: str | None = None) -> str | None:
  """`write`, then a log line with the page's link; a failure to write is a warning only (the
  results are in the log and their files already)."""
  try:
    path = write(workdir, evaluations, path)
  except Exception as e:  # pylint: disable=broad-except  # OSError here, other types on gs://
    logging.warning('Could not write %s (%s: %s).', path or f'{workdir}/{REPORT_FILE}',
                    type(e).__name__, e)
    return None
  logging.info('Run report: %s', link(path))
  return path
