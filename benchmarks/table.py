"""Turns the JSON lines of train_step.py and keras_reference.py into the README's table.

    python benchmarks/train_step.py > /tmp/ours.jsonl
    python benchmarks/keras_reference.py > /tmp/keras.jsonl
    python benchmarks/table.py /tmp/ours.jsonl /tmp/keras.jsonl
    python benchmarks/train_step.py --families=vgg16,resnet50 | python benchmarks/table.py

A record's 'row' (train_step.py --families: '<family> <case>') names its row, else its case.

The fraction of the matmul rate is images/s x GFLOP per image (XLA's count for the case's
step on the plain model, from train_step.py; the Keras model does the same arithmetic)
divided by the float32 matmul GFLOP/s measured in the same run (the first matmul line read).
"""

import json
import sys

FRAMEWORKS = ('hhjax', 'keras-tensorflow', 'keras-jax')
SHORT = {'hhjax': 'hhjax', 'keras-tensorflow': 'Keras-TF', 'keras-jax': 'Keras-JAX'}


def read(paths):
  records = []
  for path in paths:
    with (sys.stdin if path == '-' else open(path)) as f:
      for line in f:
        line = line.strip()
        if line.startswith('{'):
          records.append(json.loads(line))
  return records


def _fmt(x, spec='.1f'):
  return '–' if x is None else format(x, spec)


def _rate(r) -> str:
  """'median (min–max)' images/s of one run: on a shared machine the spread matters."""
  if not r or r.get('images_per_s') is None:
    return '–'
  spread = ''
  if r.get('images_per_s_min') is not None and r.get('images_per_s_max') is not None:
    spread = f' ({r["images_per_s_min"]:.0f}–{r["images_per_s_max"]:.0f})'
  return f'{r["images_per_s"]:.1f}{spread}'


def table(records) -> str:
  matmul = next((r for r in records if r.get('bench') == 'matmul' and 'gflops' in r), None)
  runs = {}
  for r in records:
    if r.get('bench') in ('train_step', 'keras_reference') and 'images_per_s' in r:
      runs[(r.get('row') or r['case'], r['framework'])] = r
  cases = []
  for case, _ in runs:
    if case not in cases:
      cases.append(case)
  gflop = {case: r.get('gflop_per_image') for (case, fw), r in runs.items() if fw == 'hhjax'}
  lines = [
      '| case | ' + ' | '.join(f'{SHORT[f]} img/s (min–max)' for f in FRAMEWORKS) +
      ' | hhjax / faster Keras | compile s (' + ' / '.join(SHORT[f] for f in FRAMEWORKS) +
      ') | peak host MiB (' + ' / '.join(SHORT[f] for f in FRAMEWORKS) +
      ') | % of matmul rate (' + ' / '.join(SHORT[f] for f in FRAMEWORKS) + ') |',
      '|---|' + '---|' * (len(FRAMEWORKS) + 4),
  ]
  for case in cases:
    got = {f: runs.get((case, f)) for f in FRAMEWORKS}
    rate = {f: (r or {}).get('images_per_s') for f, r in got.items()}
    keras = [rate[f] for f in FRAMEWORKS[1:] if rate[f]]
    ratio = rate['hhjax'] / max(keras) if rate['hhjax'] and keras else None
    frac = {}
    for f in FRAMEWORKS:
      if rate[f] and gflop.get(case) and matmul:
        frac[f] = 100 * rate[f] * gflop[case] / matmul['gflops']
      else:
        frac[f] = None
    lines.append(
        f'| {case} | ' + ' | '.join(_rate(got[f]) for f in FRAMEWORKS) +
        f' | {_fmt(ratio, ".2f")}{"×" if ratio else ""} | ' +
        ' / '.join(_fmt((got[f] or {}).get('compile_s')) for f in FRAMEWORKS) + ' | ' +
        ' / '.join(_fmt((got[f] or {}).get('peak_host_mem_mb'), '.0f') for f in FRAMEWORKS) +
        ' | ' + ' / '.join(_fmt(frac[f], '.0f') for f in FRAMEWORKS) + ' |')
  if matmul:
    lines.append('')
    lines.append(f'float32 matmul ({matmul["n"]}², jitted, {matmul.get("device", "")}): '
                 f'{matmul["gflops"]:.0f} GFLOP/s (median; min {matmul["gflops_min"]:.0f}, '
                 f'max {matmul["gflops_max"]:.0f}).')
  for case in cases:
    if gflop.get(case):
      lines.append(f'{case}: {gflop[case]:.2f} GFLOP per image.')
  errors = [r for r in records if 'error' in r]
  for r in errors:
    lines.append(f'ERROR {r.get("framework", "")} {r.get("case", "")}: {r["error"]}')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(table(read(sys.argv[1:] or ['-'])))
