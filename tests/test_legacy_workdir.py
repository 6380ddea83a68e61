"""A workdir written by an earlier layout of the code still resumes, evaluates and predicts.

tests/data/legacy_workdir was written before the library was grouped into packages: InceptionV3
cut at mixed0 with an 8-unit head on synthetic images, one warm-up and one fine-tuning epoch of
two steps each, then cut back to its checkpoint at step 3 (mid fine-tuning), as a run killed
there leaves it. tests/data/legacy_final.json holds the sums of every array of that run's final
state (step 4) and its evaluation, as that code computed them without interruption.
"""

import json
import pathlib
import shutil

import jax
import numpy as np
from PIL import Image
import pytest

from hhjax import checkpointing
from hhjax import evaluate
from hhjax import predict
from hhjax import train
from hhjax import workdir as workdir_lib

DATA = pathlib.Path(__file__).parent / 'data'


@pytest.fixture(scope='module')
def resumed(tmp_path_factory):
  """A copy of the legacy workdir, resumed to the end with the config it saved."""
  workdir = tmp_path_factory.mktemp('legacy') / 'run'
  shutil.copytree(DATA / 'legacy_workdir', workdir)
  config = workdir_lib.load_config(str(workdir))
  result = train.train_and_evaluate(config, str(workdir))
  return workdir, config, result


def test_a_legacy_workdir_resumes_to_the_state_an_uninterrupted_run_reached(resumed):
  workdir, _, result = resumed
  expected = json.loads((DATA / 'legacy_final.json').read_text())
  assert result['step'] == expected['step'] == 4
  with checkpointing.Checkpoints(workdir / 'checkpoints', read_only=True) as ckpts:
    assert ckpts.latest_step() == 4
    final = ckpts.restore_arrays(4)
  leaves = jax.tree_util.tree_flatten_with_path(
      {'params': final['params'], 'batch_stats': final['batch_stats']})[0]
  sums = {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf for path, leaf in leaves}
  assert sorted(sums) == sorted(expected['sums'])
  for name, leaf in sums.items():
    x = np.asarray(leaf, np.float64)
    np.testing.assert_allclose([x.sum(), np.abs(x).sum()], expected['sums'][name],
                               rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(result['loss'], expected['eval_loss'], rtol=1e-5)
  assert result['accuracy'] == expected['eval_accuracy']
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['phase']) for r in rows] == [(2, 'warmup'), (4, 'finetune')]


def test_a_legacy_checkpoint_evaluates_and_predicts_as_it_was_saved(tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(DATA / 'legacy_workdir', workdir)
  config = workdir_lib.load_config(str(workdir))
  result = evaluate.evaluate(config, str(workdir))
  assert result['step'] == 3 and result['count'] == config.data.fake.num_eval_examples
  assert np.isfinite(result['loss'])
  Image.fromarray(np.full((80, 80, 3), 200, np.uint8)).save(tmp_path / 'bright.png')
  results = predict.predict(config, str(workdir), [str(tmp_path / 'bright.png')])
  assert len(results) == 1 and results[0][1] in ('class_0', 'class_1')
  assert 0.5 <= results[0][2] <= 1.0
