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
