"""Seconds from launch to the first step or result of main.py, for two checkouts of the code.

For each checkout (--code=LABEL=PATH_OR_COMMIT; a commit is checked out with `git worktree`
under --root), case by case and alternating between the checkouts, on the shared image folder
with configs/seed_keras.py (150 px, cut at mixed7, random init so that nothing is
downloaded, 5 steps per epoch, a checkpoint every step):

  fresh      a new workdir, nothing compiled yet (each checkout's persistent compilation
             cache emptied): launch -> first progress line; also the log lines before it
  resume     the same command again, from the fresh run's checkpoint: -> first progress line
  eval       --mode=eval, twice (the second finds what the first compiled): -> the result line
  predict    --mode=predict on one image, twice: -> the printed prediction

Each checkout has its own $HHJAX_CACHE_DIR under --root (image-check verdicts, and the
persistent compilation cache where the code has one); one untimed run per checkout first
checks the images, so that no timed run pays for it. Prints a table and JSON lines; asserts
nothing. Run it on a quiet machine: the figures move with the load.

    python benchmarks/startup.py --code=before=57b385e,after=. | tee /tmp/startup.jsonl
    python benchmarks/startup.py --table=/tmp/startup.jsonl
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import time

import common  # pylint: disable=g-import-not-at-top
import data_scale  # pylint: disable=g-import-not-at-top  # the _Child reader, the CPU name

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROGRESS = data_scale.PROGRESS
RESULT = {'eval': re.compile(r'Evaluation at step \d+ on \d+ images'),
          'predict': None}   # predict: its first line on stdout
CASES = ('fresh', 'resume', 'eval', 'eval_again', 'predict', 'predict_again')


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--code', default=f'after={ROOT}',
                      help='comma-separated LABEL=PATH or LABEL=COMMIT (checked out under '
                      '--root with git worktree)')
  parser.add_argument('--data_dir', default=str(ROOT.parent / 'shared' / 'data' /
                                                'horse-or-human'))
  parser.add_argument('--root', default='/tmp/hhjax-startup',
                      help='workdirs, caches, checkouts and logs (kept)')
  parser.add_argument('--timeout_s', type=float, default=900)
  parser.add_argument('--table', default=None,
                      help='only print the table of the JSON lines of an earlier run')
  args = parser.parse_args(argv)
  args.code = [tuple(c.split('=', 1)) for c in args.code.split(',') if c]
  return args


def _train_argv(repo: pathlib.Path, workdir: pathlib.Path, data_dir: str) -> list[str]:
  return [str(repo / 'main.py'), '--config=configs/seed_keras.py', f'--workdir={workdir}',
          '--config.model.pretrained=None', '--config.data.source=folder',
          f'--config.data.dir={data_dir}', *data_scale.split_flags(repo),
          '--config.steps_per_epoch=5', '--config.warmup.epochs=1',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=1']


def _argv(case: str, repo: pathlib.Path, workdir: pathlib.Path, args) -> list[str]:
  if case in ('fresh', 'resume'):
    return _train_argv(repo, workdir, args.data_dir)
  if case.startswith('eval'):
    return [str(repo / 'main.py'), '--mode=eval', f'--workdir={workdir}']
  image = next(iter(sorted((pathlib.Path(args.data_dir) / 'validation' / 'humans').iterdir())))
  return [str(repo / 'main.py'), '--mode=predict', f'--workdir={workdir}', f'--images={image}']


def _env(root: pathlib.Path, label: str) -> dict[str, str]:
  return {'HHJAX_CACHE_DIR': str(root / label / 'cache')}


def _measure(case: str, label: str, repo: pathlib.Path, args) -> dict:
  root = pathlib.Path(args.root)
  workdir = root / label / 'workdir'
  if case == 'fresh':
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(root / label / 'cache' / 'jax', ignore_errors=True)
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_COMPILATION_CACHE_DIR', 'XLA_FLAGS', 'JAX_PLATFORMS')}
  load = os.getloadavg()[0]
  child = data_scale._Child(_argv(case, repo, workdir, args), dict(env, **_env(root, label)),
                            str(repo))
  base = case.removesuffix('_again')
  deadline = time.perf_counter() + args.timeout_s
  first = None
  while time.perf_counter() < deadline and first is None:
    if base in ('fresh', 'resume'):
      first = child.first(PROGRESS)
      if first is not None and case == 'fresh' and not data_scale._checkpointed(workdir):
        first = None   # the resume needs the fresh run's first checkpoint
    elif base == 'eval':
      first = child.first(RESULT['eval'])
    elif child.stdout:
      first = time.perf_counter() - child.start
    if child.exited():
      break
    time.sleep(0.1)
  if base in ('fresh', 'resume'):
    first = child.first(PROGRESS)
  stats = child.stop()
  log = root / 'logs' / f'{label}_{case}.log'
  log.parent.mkdir(parents=True, exist_ok=True)
  log.write_text(''.join(f'{t:8.2f} {line}\n' for t, line in child.lines))
  lines_before = None
  if first is not None and base in ('fresh', 'resume'):
    lines_before = sum(1 for t, line in child.lines if not PROGRESS.search(line) and t < first)
  record = {'bench': 'startup', 'code': label, 'case': case, 'seconds': first,
            'lines_before': lines_before, 'cpu_s': stats['cpu_s'],
            'load_avg_1m_at_launch': round(load, 2), **data_scale._cpu()}
  if first is None:
    record['error'] = f'no result (exit {child.proc.returncode}): {child.tail()}'
  return record


def _table(records: list[dict]) -> str:
  labels = list(dict.fromkeys(r['code'] for r in records))
  heads = ([f'{l}: s' for l in labels] + [f'{l}: CPU s' for l in labels] +
           [f'{l}: lines before' for l in labels])
  rows = ['| case | ' + ' | '.join(heads) + ' |', '|---|' + '---:|' * len(heads)]
  for case in CASES:
    by = {r['code']: r for r in records if r['case'] == case}
    if not by:
      continue
    def cell(label, key, fmt='{:.1f}'):
      value = by.get(label, {}).get(key)
      return '—' if value is None else fmt.format(value)
    cells = ([cell(l, 'seconds') for l in labels] + [cell(l, 'cpu_s') for l in labels] +
             [cell(l, 'lines_before', '{}') for l in labels])
    rows.append(f'| {case} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(rows)


def main(argv=None) -> None:
  args = _parse_args(argv)
  if args.table:
    records = [json.loads(line) for line in open(args.table)
               if line.startswith('{') and '"prime"' not in line]
    print(f"CPU: {records[0]['cpu']} ({records[0]['cpus']} cores)\n" + _table(records))
    return
  root = pathlib.Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  codes = [(label, common.checkout(root, label, where)) for label, where in args.code]
  for label, repo in codes:   # untimed: the image check of the folder, once per checkout
    print(json.dumps({'prime': label, **_measure('fresh', label, repo, args)}), flush=True)
  records = []
  for case in CASES:
    for label, repo in codes:
      record = _measure(case, label, repo, args)
      records.append(record)
      print(json.dumps(record), flush=True)
  print(f"\nCPU: {records[0]['cpu']} ({records[0]['cpus']} cores)\n" + _table(records))


if __name__ == '__main__':
  main()
