"""The benchmark scripts' shared pieces: the README table and the children's environment."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import table  # pylint: disable=g-import-not-at-top,wrong-import-position

from hhjax import host_malloc  # pylint: disable=g-import-not-at-top,wrong-import-position


def _run(framework, case, rate, lo, hi, **extra):
  return {'bench': 'train_step' if framework == 'hhjax' else 'keras_reference',
          'framework': framework, 'case': case, 'images_per_s': rate,
          'images_per_s_min': lo, 'images_per_s_max': hi, 'compile_s': 3.0,
          'peak_host_mem_mb': 1000.0, **extra}


def test_table_gives_spread_ratio_to_the_faster_keras_and_matmul_fraction():
  records = [
      {'bench': 'matmul', 'n': 4096, 'gflops': 200.0, 'gflops_min': 190.0,
       'gflops_max': 210.0, 'device': 'cpu'},
      _run('hhjax', 'warmup', 60.0, 55.0, 64.0, gflop_per_image=2.0),
      _run('keras-tensorflow', 'warmup', 50.0, 48.0, 52.0),
      _run('keras-jax', 'warmup', 30.0, 29.0, 31.0),
      _run('hhjax', 'warmup_cached', 180.0, 170.0, 190.0),
  ]
  text = table.table(records)
  row = next(line for line in text.splitlines() if line.startswith('| warmup |'))
  cells = [c.strip() for c in row.strip('|').split('|')]
  assert cells[1:4] == ['60.0 (55–64)', '50.0 (48–52)', '30.0 (29–31)']
  assert cells[4] == '1.20×'                     # against Keras-TF, the faster Keras
  assert cells[-1] == '60 / 50 / 30'             # img/s x 2 GFLOP / 200 GFLOP/s
  cached = next(line for line in text.splitlines() if line.startswith('| warmup_cached |'))
  assert '| – | – | – |' in cached
  assert '200 GFLOP/s' in text


def test_children_get_mains_malloc_tunables_or_none(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.tcache_count=0')
  on = common.malloc_env('on')
  assert on['GLIBC_TUNABLES'] == host_malloc.merge_tunables('glibc.malloc.tcache_count=0')
  assert on[host_malloc.MARK_ENV] == '1'
  off = common.malloc_env('off')
  assert off == {host_malloc.SWITCH_ENV: 'off'}


def test_choose_returns_the_names_and_rejects_unknown_ones():
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='bench')
  assert common.choose(parser, 'warmup,,finetune_all', ('warmup', 'finetune_all'), 'case') == [
      'warmup', 'finetune_all']
  try:
    common.choose(parser, 'warmup,bogus', ('warmup',), 'case')
  except SystemExit as e:
    assert e.code == 2
  else:
    raise AssertionError('an unknown case was accepted')


def test_benchmarks_use_only_public_names_of_the_library():
  # A benchmark that reaches into private names (or rebuilds a step of its own) measures
  # something training does not run.
  import re  # pylint: disable=g-import-not-at-top
  modules = set()
  private = []
  for name in sorted(os.listdir(os.path.join(ROOT, 'benchmarks'))):
    if not name.endswith('.py'):
      continue
    text = open(os.path.join(ROOT, 'benchmarks', name)).read()
    imported = re.findall(r'from hhjax(?:\.\w+)* import (\w+)(?: as (\w+))?', text)
    names = {alias or module for module, alias in imported}
    modules |= names
    private += [f'{name}: {m}' for m in re.findall(r'\b(\w+)\._\w+', text) if m in names]
  assert 'feature_cache' in modules and not private, private


def test_input_pipeline_measures_host_and_device_augmentation(capsys):
  import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.main(['--sources=fake', '--threads=1', '--steps=1', '--warmup_steps=1',
                       '--batch_size=2', '--image_size=75', '--augment_on=host,device'])
  rows = [line.split() for line in capsys.readouterr().out.splitlines()
          if line.startswith('fake ')]
  assert [row[:5] for row in rows] == [['fake', 'on', 'host', 'off', '1'],
                                       ['fake', 'on', 'device', 'off', '1']]
  for row in rows:
    assert float(row[5]) > 0 and float(row[6]) >= 0   # images/s, CPU ms per image


def _benchmark(name):
  """benchmarks/<name>.py loaded by its path (tests/ has a keras_reference module too)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      f'benchmarks_{name}', os.path.join(ROOT, 'benchmarks', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _family_args(**changes):
  import argparse  # pylint: disable=g-import-not-at-top
  values = dict(batch_size=20, repeats=7, warmup_steps=2, image_dtype='float32',
                cache_examples=1027, no_flops=False, set=None, family_image_size=0,
                malloc_tuning='on')
  return argparse.Namespace(**{**values, **changes})


def _flags(argv):
  flags = {}
  for a in argv[1:]:
    key, _, value = a.partition('=')
    flags.setdefault(key, []).append(value)
  return flags


def test_family_run_times_each_whole_backbone_here_and_in_both_kerases_at_its_size():
  train_step = _benchmark('train_step')
  children = train_step.family_children(_family_args(), ['vgg16', 'xception'])
  assert [(row, fw) for row, fw, _, _ in children] == [
      (f'{name} {case}', fw) for name in ('vgg16', 'xception')
      for case in ('warmup', 'finetune_all')
      for fw in ('hhjax', 'keras-tensorflow', 'keras-jax')]
  for row, framework, argv, env in children:
    flags = _flags(argv)
    name, case = row.split()
    assert flags['--case'] == [case] and flags['--batch_size'] == ['20']
    assert flags['--image_size'] == [{'vgg16': '224', 'xception': '299'}[name]]
    if framework == 'hhjax':
      assert argv[0].endswith('train_step.py')
      cut = {'vgg16': 'block5_pool', 'xception': 'block14_sepconv2_act'}[name]
      assert {f'model.backbone={name}', f'model.cut={cut}', 'model.head=gap'} <= set(
          flags['--set'])
    else:
      assert argv[0].endswith('keras_reference.py')
      assert env['KERAS_BACKEND'] == framework.split('-')[1]
      assert flags['--application'] == [{'vgg16': 'VGG16', 'xception': 'Xception'}[name]]
      assert flags['--cut'] == [''] and flags['--head'] == ['gap']
  records = [_run('hhjax', 'warmup', 9.0, 8.0, 10.0, row='vgg16 warmup'),
             _run('keras-tensorflow', 'warmup', 6.0, 5.0, 7.0, row='vgg16 warmup'),
             _run('hhjax', 'warmup', 20.0, 19.0, 21.0, row='xception warmup')]
  text = table.table(records)
  assert '| vgg16 warmup | 9.0 (8–10) | 6.0 (5–7) | – | 1.50×' in text
  assert '| xception warmup | 20.0 (19–21) |' in text


def test_family_cases_train_what_keras_trains():
  """The family run's two cases, ours and Keras's, built from the children's command lines at
  a tiny size (VGG16, which has no stem, at 32 px): the same parameters trainable, and our
  whole-backbone fine-tuning step traces (every block on batch statistics from the first)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from hhjax import entry  # pylint: disable=g-import-not-at-top
  from hhjax.training import optim  # pylint: disable=g-import-not-at-top
  from hhjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  train_step, keras_reference = _benchmark('train_step'), _benchmark('keras_reference')
  children = train_step.family_children(
      _family_args(batch_size=2, family_image_size=32), ['vgg16'])
  for case in train_step.FAMILY_CASES:
    ours = next(_flags(a) for r, fw, a, _ in children if r.endswith(case) and fw == 'hhjax')
    theirs = next(_flags(a) for r, fw, a, _ in children
                  if r.endswith(case) and fw == 'keras-tensorflow')
    config = train_step.make_config(case, 2, 32, ours['--set'])
    step, model, labels, tx = train_step.build_step(config, case)
    abstract = state_lib.abstract_variables(model, 32)
    trainable = optim.count(optim.split(abstract['params'], labels)[0])
    keras_model = keras_reference.build_seed_model(
        32, case, application=theirs['--application'][0], cut=theirs['--cut'][0],
        head=theirs['--head'][0])
    assert trainable == sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights), case
    if case == 'finetune_all':
      phase = next(p for p in entry.phases(config) if p.name == 'finetune')
      assert phase.bn_train_from == 'block1_pool'
      state = jax.eval_shape(
          lambda: state_lib.build_state(state_lib.init_variables(model, 32, 0), tx, 0))
      batch = {'image': jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32),
               'label': jax.ShapeDtypeStruct((2,), np.int32)}
      after = jax.eval_shape(step, state, batch)   # VGG16 refused 'stem' as train_from
      assert jax.tree.structure(after) == jax.tree.structure(state)


def test_recipe_run_alternates_valid_recipes_over_rounds_and_tables_their_ratio(tmp_path):
  from hhjax import config_checks  # pylint: disable=g-import-not-at-top
  recipes, train_step = _benchmark('recipes'), _benchmark('train_step')
  args = _family_args(cases=['finetune_mixed6'], rounds=2, image_size=150)
  names = list(recipes.RECIPES)
  children = recipes.children(args, names)
  assert [(name, round_) for name, round_, _, _ in children] == [
      (name, round_) for round_ in range(2) for name in names]
  for name, _, argv, _ in children:
    flags = _flags(argv)
    assert argv[0].endswith('train_step.py') and flags['--case'] == ['finetune_mixed6']
    assert flags.get('--set', []) == recipes.RECIPES[name]
    # Each recipe is a configuration training accepts.
    config = train_step.make_config('finetune_mixed6', 20, 150, recipes.RECIPES[name])
    config_checks.validate(config)
  # --code: the baseline from each checkout's own train_step.py, the checkouts alternating.
  args = _family_args(cases=['warmup', 'finetune_mixed6'], rounds=1, image_size=150)
  codes = [('before', str(tmp_path / 'old')), ('after', ROOT)]
  rows = [(row, argv[0]) for row, _, argv, _ in recipes.children(args, ['rmsprop'], codes)]
  assert rows == [(f'rmsprop {case} @{label}', os.path.join(repo, 'benchmarks', 'train_step.py'))
                  for case in ('warmup', 'finetune_mixed6') for label, repo in codes]
  records = [_run('hhjax', case, rate, rate - 1, top, row=row)
             for row, case, rate, top in (
                 ('rmsprop', 'finetune_mixed6', 10.0, 10.5), ('adamw', 'finetune_mixed6', 9.0, 9.1),
                 ('rmsprop', 'finetune_mixed6', 12.0, 12.5), ('adamw', 'finetune_mixed6', 9.9, 10.0),
                 ('rmsprop warmup', 'warmup', 30.0, 40.0))]
  text = recipes.table(records)
  assert '| rmsprop | 10.0, 12.0 | 12.5 | 1.00× |' in text
  assert '| adamw | 9.0, 9.9 | 10.0 | 0.80× |' in text
  assert '| rmsprop warmup | 30.0 | 40.0 | 1.00× |' in text     # its own case's first row
