"""What each training-recipe option costs per train step (README "Training", config.optimizer).

    python benchmarks/recipes.py > /tmp/recipes.jsonl          # ~15 min on 2 cores
    python benchmarks/recipes.py --table=/tmp/recipes.jsonl
    python benchmarks/recipes.py --code=before=584ea29^,after=. --cases=warmup,finetune_mixed6

Times benchmarks/train_step.py's child (the step training runs, jitted with its shardings and
donation, the seed's model at batch 20 and 150x150 on synthetic data) in one case,
`finetune_mixed6` by default (the optimizer then updates the 9 blocks from mixed6 on: where
an option's cost shows), under each recipe's overrides. Every recipe runs in its own process;
the recipes alternate over --rounds, so that a drift of the shared machine falls on all of them.
The table gives, per recipe, the median images/s of each round and the fastest repeat over the
rounds, with its ratio to the baseline's (rmsprop at a constant rate, the seed's recipe).
With --code, the baseline alone, in each of the given checkouts of the code: whether newer code
slowed the seed's recipe.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # pylint: disable=g-import-not-at-top
import train_step  # pylint: disable=g-import-not-at-top

BASELINE = 'rmsprop'
# recipe -> config overrides (train_step.py --set syntax).
RECIPES = {
    BASELINE: [],
    'sgd_nesterov': ['optimizer.name=sgd', 'optimizer.momentum=0.9', 'optimizer.nesterov=True'],
    'adam': ['optimizer.name=adam'],
    'adamw': ['optimizer.name=adamw'],           # Keras's default weight_decay 0.004
    'rmsprop_global_clipnorm': ['optimizer.global_clipnorm=1.0'],
    'rmsprop_cosine': ['finetune.schedule.name=cosine', 'finetune.schedule.decay_steps=1000',
                       'finetune.schedule.warmup_steps=100'],
    'rmsprop_ema': ['optimizer.use_ema=True'],
    'rmsprop_accumulation_4': ['optimizer.gradient_accumulation_steps=4'],
    'rmsprop_label_smoothing': ['loss.label_smoothing=0.1'],
}


def children(args: argparse.Namespace, recipes: list[str],
             codes: list[tuple[str, str]] | None = None):
  """(row, round, argv, env) of every child: per round, per case, the recipes (or, with
  codes, the baseline in each checkout) alternating."""
  runs = []
  for round_ in range(args.rounds):
    for case in args.cases:
      for recipe in recipes:
        for label, repo in codes or [(None, None)]:
          argv = train_step.child_argv(case, args, args.image_size,
                                       RECIPES[recipe] + (args.set or []))
          if repo is not None:
            argv[0] = os.path.join(repo, 'benchmarks', 'train_step.py')
          row = recipe if len(args.cases) == 1 else f'{recipe} {case}'
          runs.append((row if label is None else f'{row} @{label}', round_, argv,
                       train_step.child_env(args)))
  return runs


def table(records: list[dict]) -> str:
  """Per row: each round's median images/s, and the fastest repeat over the rounds with its
  ratio to that of the first row of the same case (the baseline, or the first checkout). On a
  shared machine the fastest repeat is the one least slowed by others' work: the steadier
  comparison."""
  rates: dict[str, list[float]] = {}
  fastest: dict[str, float] = {}
  first_of_case: dict[str, str] = {}
  case_of: dict[str, str] = {}
  for r in records:
    if r.get('bench') == 'train_step' and r.get('images_per_s') is not None:
      rates.setdefault(r['row'], []).append(r['images_per_s'])
      top = r.get('images_per_s_max', r['images_per_s'])
      fastest[r['row']] = max(fastest.get(r['row'], 0.0), top)
      case_of[r['row']] = r.get('case')
      first_of_case.setdefault(r.get('case'), r['row'])
  lines = ['| row | median images/s, each round | fastest repeat | fastest vs first of its case |',
           '|---|---|---:|---:|']
  for row, values in rates.items():
    base = fastest[first_of_case[case_of[row]]]
    lines.append(f'| {row} | {", ".join(f"{v:.1f}" for v in values)} '
                 f'| {fastest[row]:.1f} | {fastest[row] / base:.2f}× |')
  for r in records:
    if 'error' in r:
      lines.append(f'\nfailed: {r.get("row")}: {r["error"]}')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--recipes', default=','.join(RECIPES),
                      help=f'comma-separated, from {list(RECIPES)}')
  parser.add_argument('--cases', default='finetune_mixed6',
                      help=f'comma-separated, from {list(train_step.CASES)}')
  parser.add_argument('--code', default='',
                      help='LABEL=PATH_OR_COMMIT,...: time the baseline recipe in each of these '
                      'checkouts of the code instead (a commit is checked out under --root)')
  parser.add_argument('--root', default='/tmp/hhjax-recipes')
  parser.add_argument('--rounds', type=int, default=2)
  common.add_run_flags(parser)
  parser.add_argument('--warmup_steps', type=int, default=2)
  parser.add_argument('--set', action='append', metavar='KEY=VALUE',
                      help='a config override for every recipe (repeatable)')
  parser.add_argument('--table', metavar='JSONL', help='print the table of an earlier run')
  args = parser.parse_args()
  if args.table:
    with open(args.table) as f:
      print(table([json.loads(line) for line in f if line.startswith('{')]))
    return
  args.image_dtype, args.cache_examples, args.no_flops = 'float32', 0, True
  args.cases = common.choose(parser, args.cases, list(train_step.CASES), 'case')
  codes = None
  if args.code:
    recipes = [BASELINE]
    codes = [(label, str(common.checkout(args.root, label, where)))
             for label, where in (c.split('=', 1) for c in args.code.split(',') if c)]
  else:
    recipes = common.choose(parser, args.recipes, list(RECIPES), 'recipe')
    if BASELINE not in recipes:
      recipes.insert(0, BASELINE)
  for row, round_, argv, env in children(args, recipes, codes):
    for record in common.run_child(argv, env=env):
      record.update(row=row, round=round_)
      common.emit(record)


if __name__ == '__main__':
  main()
