"""Looking at what the model does, through the commands: eval's pictures, explain, compare.

One workdir trained briefly on the real image folder (random init, 75 px, cut mixed0, so it
misclassifies plenty) serves every test; the Grad-CAM arithmetic itself is checked in
tests/test_explain.py.
"""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import smoke
from hhjax import compare
from hhjax import entry
from hhjax import evaluate
from hhjax import metrics
from hhjax import pictures
from hhjax import predict
from hhjax import workdir as workdir_lib
from hhjax.data import sources
from hhjax.data import spec as data_spec


def _spec(config):
  """What the input pipeline reads of `config`."""
  return data_spec.DataSpec.from_config(config)


ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 75


def _run(*args, env, module=None):
  command = [sys.executable, *(['-m', module] if module else [str(ROOT / 'main.py')]), *args]
  proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _png(path, min_side=200):
  """The PNG as an RGB array, checked to be a real picture: big enough and not one colour."""
  image = np.asarray(Image.open(path).convert('RGB')).astype(int)
  assert min(image.shape[:2]) >= min_side, image.shape
  assert image.std() > 20, f'{path} is (nearly) blank'
  return image


@pytest.fixture(scope='module')
def trained(real_data_dir, tmp_path_factory, env):
  """Two warm-up epochs of 3 steps on the real folder; the final evaluation on validation."""
  workdir = tmp_path_factory.mktemp('real')
  _run('--config=configs/smoke.py', f'--workdir={workdir}', '--config.data.source=folder',
       f'--config.data.dir={real_data_dir}', '--config.data.validation_split=validation',
       '--config.data.test_split=None',
       '--config.steps_per_epoch=3', '--config.warmup.epochs=2', '--config.finetune.epochs=0',
       '--config.eval_batch_size=32', env=env)
  return workdir


@pytest.fixture(scope='module')
def predicted(trained, real_data_dir):
  """predict's (path, class, probability) for every validation image, in-process, and what it
  printed."""
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    results = predict.predict(workdir_lib.load_config(str(trained)), str(trained),
                              [str(real_data_dir / 'validation')])
  return results, printed.getvalue()


@pytest.fixture(scope='module')
def predictions(predicted):
  return predicted[0]


def _grid_pixels(count):
  columns, rows = pictures.grid_shape(count, 5)
  return round(100 * (2.7 * rows + 0.6)), round(100 * 2.3 * columns)


def test_eval_draws_the_confusion_matrix_and_what_predict_gets_wrong(trained, predicted):
  predictions, printed = predicted
  for name in (pictures.CONFUSION_FILE, pictures.EXAMPLES_FILE, pictures.EXAMPLES_JSON):
    assert (trained / name).exists(), f'the training run wrote no {name}'
  # In-process, what --mode=eval calls: the training run above has been through main.py, and a
  # process start costs more than the rest of this test. Its files are its own.
  result = evaluate.evaluate(workdir_lib.load_config(str(trained)), str(trained))
  path = pathlib.Path(evaluate.result_path(str(trained), 'validation', result['step']))
  evaluation = json.loads(path.read_text())
  folder = path.with_suffix('')
  listing = json.loads((folder / pictures.EXAMPLES_JSON).read_text())
  # The training run's final evaluation is of the same split and step: the same numbers.
  assert json.loads((trained / 'eval.json').read_text())['confusion'] == evaluation['confusion']

  # The misclassified images are exactly those predict gets wrong, most confident first.
  wrong = {path: prob for path, name, prob in predictions
           if name != pathlib.Path(path).parent.name}
  assert 0 < len(wrong) < len(predictions) == evaluation['count'] == 256
  assert {e['name'] for e in listing['misclassified']} == set(wrong)
  confusion = np.array(evaluation['confusion'])
  assert len(wrong) == confusion.sum() - np.trace(confusion)
  probabilities = [e['probability'] for e in listing['misclassified']]
  assert probabilities == sorted(probabilities, reverse=True)
  np.testing.assert_allclose(probabilities, [wrong[e['name']] for e in listing['misclassified']],
                             rtol=1e-4)
  for row in listing['misclassified']:
    assert row['true'] == pathlib.Path(row['name']).parent.name != row['predicted']

  # predict on the labelled folder printed the same summary after its per-file lines.
  lines = printed.splitlines()
  assert len([l for l in lines if l.count('\t') == 2]) == 256
  assert lines[256] == (f"accuracy {evaluation['accuracy']:.4f} on 256 labelled images "
                        f'({256 - len(wrong)} right, {len(wrong)} wrong)')
  per_class = np.array(evaluation['confusion'])
  assert lines[257] == (f'horses: {per_class[0].sum()} images, {per_class[0, 0]} right '
                        f'({per_class[0, 0] / per_class[0].sum():.4f}), {per_class[:, 0].sum()} '
                        'predicted as horses')
  assert '\n'.join(lines[260:]) == metrics.format_confusion(per_class, ['horses', 'humans'])

  # The pictures: a 2 x 2 matrix with a colour bar, and a grid of min(20, wrong) images.
  _png(folder / pictures.CONFUSION_FILE)
  grid = _png(folder / pictures.EXAMPLES_FILE)
  assert grid.shape[:2] == _grid_pixels(min(20, len(wrong)))
  assert (grid.min(axis=-1) < 100).mean() > 0.05   # dark pixels: the images are there


def test_eval_pictures_of_a_run_without_mistakes_show_the_least_confident(tmp_path):
  # Synthetic data named by index, every example right: the grid says so and shows the
  # least confident ones; the list of mistakes is empty.
  config = smoke.get_config()
  labels = np.arange(12) % 2
  confidence = np.linspace(0.95, 0.6, 12)
  p1 = np.where(labels == 1, confidence, 1 - confidence)
  result = {'probabilities': np.stack([1 - p1, p1], axis=-1), 'accuracy': 1.0, 'count': 12,
            'confusion': np.diag([6, 6])}
  pictures.write_eval_pictures(entry.data(config), result, ['class_0', 'class_1'], 7, str(tmp_path),
                               max_images=4)
  listing = json.loads((tmp_path / pictures.EXAMPLES_JSON).read_text())
  assert listing['misclassified'] == [] and listing['count'] == 12
  order, all_correct = pictures.rank_examples(result['probabilities'], labels)
  assert all_correct and list(order[:4]) == [11, 10, 9, 8]
  names = pictures.example_names(sources.table(_spec(config), 'test'), 'test')
  assert names[11] == 'test[11]'
  grid = _png(tmp_path / pictures.EXAMPLES_FILE)
  assert grid.shape[:2] == _grid_pixels(4)


def _has_heat_colours(image, share):
  """The jet map over the image: at least `share` of the pixels strongly coloured (the images
  are mostly white background with grey, brown or dark subjects)."""
  return (image.max(axis=-1) - image.min(axis=-1) > 80).mean() > share


def test_explain_draws_a_heat_map_over_each_image(trained, predictions, real_data_dir, env):
  chosen = [real_data_dir / 'validation' / 'horses' / 'horse1-000.png',
            real_data_dir / 'validation' / 'humans' / 'valhuman01-00.png',
            real_data_dir / 'validation' / 'horses' / 'horse5-123.png']
  proc = _run('--mode=explain', f'--workdir={trained}', *(f'--images={p}' for p in chosen),
              env=env)
  out = trained / 'explain'
  pictures_written = ['0_horse1-000.png', '1_valhuman01-00.png', '2_horse5-123.png']
  assert sorted(os.listdir(out)) == sorted(pictures_written + ['maps.npz', 'overview.png'])
  assert str(out / 'overview.png') in proc.stdout
  # Each image's prediction first, as predict prints it.
  by_path = {path: (name, prob) for path, name, prob in predictions}
  for line, path in zip(proc.stdout.splitlines(), chosen):
    shown_path, name, prob = line.split('\t')
    assert shown_path == str(path) and name == by_path[str(path)][0]
    assert float(prob) == pytest.approx(by_path[str(path)][1], abs=1e-4)

  saved = np.load(out / 'maps.npz')
  assert list(saved['paths']) == [str(p) for p in chosen]
  assert saved['maps'].shape == (3, SIZE, SIZE)
  assert (saved['maps'] >= 0).all() and (saved['maps'].max(axis=(1, 2)) > 0).all()
  # The class each map explains is the one predict gives, with the same probability.
  class_names = list(saved['class_names'])
  for path, k, probs in zip(saved['paths'], saved['predicted'], saved['probabilities']):
    name, prob = by_path[path]
    assert class_names[k] == name
    np.testing.assert_allclose(probs[k], prob, rtol=1e-4)

  for name in pictures_written:
    image = _png(out / name)
    assert image.shape[1] > image.shape[0]    # the image and its map side by side
    assert _has_heat_colours(image, 0.1)   # the map covers the right panel; the images ~0
  assert _has_heat_colours(_png(out / 'overview.png'), 0.1)


def test_compare_counts_an_augmentation_field_only_where_it_acts():
  off = {'data.mix.mixup_alpha': 0.0, 'data.mix.cutmix_alpha': 0.0,
         'data.random_erasing.probability': 0.0, 'data.crop.random_resized_crop': False}
  fields = ('data.mix.prob', 'data.mix.switch_prob', 'data.random_erasing.scale',
            'data.crop.ratio')
  assert [compare.used(off, f) for f in fields] == [False] * 4
  assert compare.used(off, 'data.mix.mixup_alpha')        # its own switch always counts
  mixup = dict(off, **{'data.mix.mixup_alpha': 0.2})
  assert compare.used(mixup, 'data.mix.prob') and not compare.used(mixup, 'data.mix.switch_prob')
  both = dict(mixup, **{'data.mix.cutmix_alpha': 1.0})
  assert compare.used(both, 'data.mix.switch_prob')
  on = dict(off, **{'data.random_erasing.probability': 0.25,
                    'data.crop.random_resized_crop': True})
  assert compare.used(on, 'data.random_erasing.scale') and compare.used(on, 'data.crop.ratio')


def test_compare_draws_runs_side_by_side(trained, tmp_path, env):
  rows = [json.loads(line) for line in (trained / 'metrics.jsonl').read_text().splitlines()]
  assert len(rows) == 2 and 0 < rows[0]['time'] < rows[1]['time']
  # A second run as an older version wrote it: no 'time', and another learning rate.
  older = tmp_path / 'older'
  older.mkdir()
  config = json.loads((trained / 'config.json').read_text())
  config['warmup']['learning_rate'] = 0.5
  # Neither labels a run: bookkeeping, and synthetic data's classes in a folder run.
  config['log_every_steps'], config['data']['fake']['num_classes'] = 7, 5
  (older / 'config.json').write_text(json.dumps(config))
  (older / 'test.json').write_text(json.dumps({'step': 6, 'accuracy': 0.3, 'loss': 0.9}))
  (older / 'metrics.jsonl').write_text(''.join(
      json.dumps({k: v for k, v in dict(r, val_accuracy=0.25 * r['epoch']).items()
                  if k != 'time'}) + '\n' for r in rows))

  chart = tmp_path / 'side_by_side.png'
  proc = _run(str(trained), str(older), f'--out={chart}', env=env, module='hhjax.compare')
  lines = proc.stdout.splitlines()
  first = next(l.split() for l in lines if l.startswith(trained.name))
  assert first[1:4] == ['2', '6', f"{rows[-1]['val_accuracy']:.4f}"]
  assert first[-1].count(':') == 1                       # m:ss, from the rows' 'time'
  assert first[-3:-1] == ['-', '-']                      # no test split in that run
  second = next(l.split() for l in lines if l.startswith('older'))
  assert second[3:6] == ['0.5000', '0.5000', '(2)'] and second[-1] == '-'
  assert second[-3:-1] == ['0.3000', '0.9000']           # its test.json
  differing = lines[lines.index('Config fields that differ:') + 2:]
  assert differing[0].split() == ['warmup.learning_rate', '0.01', '0.5'] and not differing[1]
  assert differing[2] == ('Also differ, without changing the result (bookkeeping, or unused): '
                          'data.fake.num_classes, log_every_steps')
  assert compare.legend_labels(['a', 'b'], [compare._config(str(d)) for d in (trained, older)]
                               ) == ['a (warmup.learning_rate=0.01)', 'b (warmup.learning_rate=0.5)']
  image = _png(chart)
  assert image.shape[1] == 1100
  for colour in ((31, 119, 180), (255, 127, 14)):        # one line per run
    assert (np.abs(image - colour).sum(axis=-1) < 30).sum() > 200, colour

  missing = subprocess.run([sys.executable, '-m', 'hhjax.compare', str(trained),
                            str(tmp_path / 'nothing')], env=env, capture_output=True,
                           text=True, cwd=ROOT)
  assert missing.returncode == 2 and missing.stderr.startswith('error: ')
  assert 'nothing' in missing.stderr
