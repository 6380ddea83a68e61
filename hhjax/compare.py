"""Runs side by side: validation accuracy and loss of several workdirs on one chart, and a table.

    python -m hhjax.compare /tmp/hhjax/a /tmp/hhjax/b ... [--out=compare.png]

The chart draws each run's validation accuracy and loss per epoch (metrics.jsonl). The table
gives epochs, steps, final and best validation accuracy, final validation loss, the test split's
accuracy and loss (test.json, written once training ends; '-' without one) and wall time ('-'
for runs written before metrics.jsonl recorded it), then the config fields that differ between
the runs (config.json).

The best epoch is chosen by hhjax.best, the rule --checkpoint=best restores by (the highest
validation accuracy, of equals the latest). Runs are labelled by the fields that change what
they compute, model fields first, then data, then the recipe; fields that only keep the books
(checkpoint and log intervals, how many checkpoints are kept, threads, batch size of the
evaluation, the speed rewrites that compute the same model) or that the run does not use
(data.fake.* for a folder run, fine-tuning fields without fine-tuning epochs, ...) are named
apart and never label a run. Reads files only: no JAX, no TensorFlow.
"""

import argparse
from collections.abc import Mapping, Sequence
import json
import os
import sys
from typing import Any

from etils import epath
from matplotlib.figure import Figure

from hhjax import best
from hhjax import durations
from hhjax import errors
from hhjax import files
from hhjax import metrics
from hhjax import workdir as workdir_lib

DEFAULT_OUT = 'compare.png'
TEST_FILE = workdir_lib.TEST_FILE
# Legend entries name at most this many differing fields; the table lists them all.
_LEGEND_FIELDS = 2


def run_names(workdirs: Sequence[str]) -> list[str]:
  """The shortest path endings that tell the workdirs apart (their base names, usually)."""
  parts = [workdir_lib.absolute(w).rstrip('/').split('/') for w in workdirs]
  for depth in range(1, max(len(p) for p in parts) + 1):
    names = ['/'.join(p[-depth:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return [str(w) for w in workdirs]


def _rows(workdir: str) -> list[dict[str, Any]]:
  rows = [r for r in metrics.read_rows(workdir) if 'val_accuracy' in r]
  if not rows:
    raise errors.DataNotFoundError(
        f'{workdir} has no epochs in {metrics.METRICS_FILE}: give workdirs that '
        '`python main.py --mode=train` wrote (at least one finished epoch).')
  return rows


def _config(workdir: str) -> dict[str, Any]:
  path = epath.Path(workdir) / workdir_lib.CONFIG_FILE
  return workdir_lib.flat_fields(json.loads(path.read_text())) if path.exists() else {}


def differing_fields(configs: Sequence[Mapping[str, Any]]) -> list[str]:
  """The config fields whose values are not the same in every run, sorted."""
  fields = sorted(set().union(*configs))
  missing = object()
  return [f for f in fields if len({json.dumps(c.get(f, missing), sort_keys=True, default=str)
                                    for c in configs}) > 1]


# Fields that never change what a run computes: when and how much it writes, threads, the
# evaluation's batch size (every example is evaluated once whatever it is), decoding once
# instead of every epoch, the replaced eval_split, and the speed rewrites that compute the same
# model (speed.compute_dtype does change the arithmetic: it is not here).
BOOKKEEPING = ('checkpoint_every_steps', 'log_every_steps', 'keep_checkpoints',
               'eval_batch_size', 'data.num_parallel_calls', 'data.cache_decoded',
               'data.eval_split', 'speed.fast_convs', 'speed.fold_bn', 'speed.merge_1x1',
               'speed.fast_pools', 'speed.cache_features', 'speed.cache_features_max_mb')


def _false(value: Any) -> bool:
  return value in (None, '', 0, False) or str(value).lower() in ('none', 'null')


def used(config: Mapping[str, Any], field: str) -> bool:
  """Whether the run of flat `config` reads `field` at all."""
  source = config.get('data.source')
  if field.startswith('data.fake.'):
    return source == 'fake'
  if field == 'data.name':
    return source == 'tfds'
  if field == 'data.dir':
    return source != 'fake'
  if field == 'data.validation_fraction':
    return _false(config.get('data.validation_split'))
  if field.startswith('data.augment.') and field != 'data.augment.enabled':
    if config.get('data.augment.enabled') is False:
      return False
    return field != 'data.augment.cval' or config.get('data.augment.fill_mode') == 'constant'
  if field.startswith('data.mix.') and field not in ('data.mix.mixup_alpha',
                                                      'data.mix.cutmix_alpha'):
    alphas = [not _false(config.get(f'data.mix.{k}_alpha')) for k in ('mixup', 'cutmix')]
    return all(alphas) if field == 'data.mix.switch_prob' else any(alphas)
  if field.startswith('data.random_erasing.') and field != 'data.random_erasing.probability':
    return not _false(config.get('data.random_erasing.probability'))
  if field in ('data.crop.scale', 'data.crop.ratio'):
    return config.get('data.crop.random_resized_crop') is True
  for phase in ('warmup', 'finetune'):
    if field.startswith(f'{phase}.') and field != f'{phase}.epochs':
      return config.get(f'{phase}.epochs') != 0
  if field in ('early_stopping.threshold', 'early_stopping.mode'):
    return not _false(config.get('early_stopping.metric'))
  return True


def _order(field: str) -> tuple[int, str]:
  """Model fields first, then data, then the recipe."""
  group = 0 if field.startswith('model.') else 1 if field.startswith('data.') else 2
  return group, field


def result_fields(configs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
  """(the differing fields that change what some run computes, model then data then recipe;
  the differing ones that do not: bookkeeping, or used by no run)."""
  differ = differing_fields(configs)
  matter = [f for f in differ if f not in BOOKKEEPING and any(used(c, f) for c in configs)]
  return sorted(matter, key=_order), [f for f in differ if f not in matter]


def _value(config: Mapping[str, Any], field: str) -> str:
  return json.dumps(config[field]) if field in config else '-'


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return '-'
  return durations.format_duration(round(seconds))


def _test(workdir: str) -> dict[str, Any] | None:
  path = epath.Path(workdir) / TEST_FILE
  return json.loads(path.read_text()) if path.exists() else None


def summary(rows: Sequence[Mapping[str, Any]],
            test: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Epochs, steps, final and best validation accuracy (with its epoch: hhjax.best's rule),
  final validation loss, the test split's accuracy and loss (None without one), time."""
  chosen = best.choose(rows, lambda row: row)
  return {'epochs': rows[-1]['epoch'], 'steps': rows[-1]['step'],
          'final_accuracy': rows[-1]['val_accuracy'], 'best_accuracy': chosen['val_accuracy'],
          'best_epoch': chosen['epoch'], 'best_step': chosen['step'],
          'final_loss': rows[-1]['val_loss'],
          'test_accuracy': None if test is None else test['accuracy'],
          'test_loss': None if test is None else test['loss'],
          'time': rows[-1].get('time')}


def _number(value: float | None) -> str:
  return '-' if value is None else f'{value:.4f}'


def _table(header: Sequence[str], lines: Sequence[Sequence[str]], left: int = 1) -> str:
  """Columns padded to their widths; the first `left` columns left-aligned, the rest right."""
  widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
  def fmt(cells):
    return '  '.join(str(c).ljust(w) if i < left else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
  return '\n'.join([fmt(header)] + [fmt(line) for line in lines])


def format_tables(names: Sequence[str], summaries: Sequence[Mapping[str, Any]],
                  configs: Sequence[Mapping[str, Any]]) -> str:
  """The results table, then the config fields that differ (runs as columns)."""
  results = _table(
      ['run', 'epochs', 'steps', 'final val acc', 'best val acc (epoch)', 'final val loss',
       'test acc', 'test loss', 'wall time'],
      [[n, s['epochs'], s['steps'], f"{s['final_accuracy']:.4f}",
        f"{s['best_accuracy']:.4f} ({s['best_epoch']})", f"{s['final_loss']:.4f}",
        _number(s.get('test_accuracy')), _number(s.get('test_loss')), _duration(s['time'])]
       for n, s in zip(names, summaries)])
  fields, others = result_fields(configs)
  if not fields and not others:
    return results + '\n\nThe runs have the same config.'
  text = results
  if fields:
    text += ('\n\nConfig fields that differ:\n' +
             _table(['field', *names], [[f, *(_value(c, f) for c in configs)] for f in fields]))
  else:
    text += '\n\nThe runs have the same config in every field that changes the result.'
  if others:
    text += ('\n\nAlso differ, without changing the result (bookkeeping, or unused): '
             + ', '.join(others))
  return text


def plot(names: Sequence[str], all_rows: Sequence[Sequence[Mapping[str, Any]]],
         labels: Sequence[str]) -> Figure:
  """Validation accuracy and loss per epoch, one line per run; the legend below both."""
  fig = Figure(figsize=(11.0, 4.8 + 0.2 * len(names)), layout='constrained')
  axes = fig.subplots(1, 2)
  for rows, label in zip(all_rows, labels):
    epochs = [r['epoch'] for r in rows]
    starts = [r['epoch'] - 0.5 for prev, r in zip(rows, rows[1:]) if r['phase'] != prev['phase']]
    for ax, key in zip(axes, ('val_accuracy', 'val_loss')):
      line, = ax.plot(epochs, [r[key] for r in rows], marker='o', ms=3, label=label)
      for x in starts:
        ax.axvline(x, color=line.get_color(), ls=':', lw=1.2)
  for ax, what in zip(axes, ('accuracy', 'loss')):
    ax.set_title(f'Validation {what}')
    ax.set_xlabel('epoch (all phases)')
    ax.set_ylabel(what)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
  handles, texts = axes[0].get_legend_handles_labels()
  # One row while it fits the figure's width, else one run per line.
  one_row = sum(len(t) + 6 for t in texts) < 150
  fig.legend(handles, texts, loc='outside lower center', ncols=len(texts) if one_row else 1,
             fontsize=9)
  fig.suptitle(f'{len(names)} runs side by side (dotted: where fine-tuning starts)', fontsize=11)
  return fig


def compare(workdirs: Sequence[str], out: str = DEFAULT_OUT) -> str:
  """Writes the chart to `out` and returns the tables as text."""
  names = run_names(workdirs)
  all_rows = [_rows(w) for w in workdirs]
  configs = [_config(w) for w in workdirs]
  labels = legend_labels(names, configs)
  files.write_png(out, plot(names, all_rows, labels))
  return format_tables(names, [summary(r, _test(w)) for r, w in zip(all_rows, workdirs)],
                       configs)


def legend_labels(names: Sequence[str], configs: Sequence[Mapping[str, Any]]) -> list[str]:
  """Each run's name and the first fields that change the result, with its values."""
  fields = result_fields(configs)[0][:_LEGEND_FIELDS]
  return [name + (f' ({", ".join(f"{f}={_value(c, f)}" for f in fields)})' if fields else '')
          for name, c in zip(names, configs)]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m hhjax.compare',
      description='Draw the validation accuracy and loss of several training workdirs on one '
                  'chart and print their results and differing config fields.')
  parser.add_argument('workdirs', nargs='+', help='Workdirs written by main.py --mode=train.')
  parser.add_argument('--out', default=DEFAULT_OUT,
                      help=f'PNG file to write (default: ./{DEFAULT_OUT}).')
  args = parser.parse_args(argv)
  try:
    tables = compare(args.workdirs, args.out)
  except errors.UserError as e:
    # As main.py does: the message alone says what to fix; no traceback.
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(errors.EXIT_USER_ERROR)
  print(tables)
  print(f'\nWrote {os.path.abspath(args.out) if "://" not in args.out else args.out}')


if __name__ == '__main__':
  main()
