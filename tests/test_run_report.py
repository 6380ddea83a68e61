"""A training run's own account of itself, as a user opens it: report.html rendered by a real
browser (headless Chromium) with every picture loaded and the numbers of eval.json in its
tables; eval.json, the metrics rows and TensorBoard with the evaluation metrics, step-level
points and the config as hyperparameters. One smoke run serves the whole file."""

import html.parser
import json
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import plugin_data_pb2
import tensorflow as tf

from hhjax import eval_metrics
from hhjax import files
from hhjax import run_report
from hhjax.training import evaluation

ROOT = pathlib.Path(__file__).resolve().parents[1]
BROWSERS = ('chromium', 'chromium-headless-shell', 'chromium-browser', 'google-chrome')
# The smoke config without its fine-tuning phase: 2 epochs of 10 steps, a progress row every 5.
FLAGS = ['--config=configs/smoke.py', '--config.finetune.epochs=0']
PROGRESS_STEPS = [5, 10, 15, 20]


@pytest.fixture(scope='module')
def run(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp('report')
  proc = subprocess.run([sys.executable, str(ROOT / 'main.py'), *FLAGS, f'--workdir={workdir}'],
                        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc.stderr


def _browser() -> str:
  for name in BROWSERS:
    path = shutil.which(name)
    if path:
      return path
  pytest.skip('no headless Chromium on this machine (apt-get install chromium-headless-shell; '
              '.ci/run installs it where apt-get works)')


def _chromium(*args: str) -> subprocess.CompletedProcess:
  proc = subprocess.run([_browser(), '--headless', '--no-sandbox', '--disable-gpu',
                         '--hide-scrollbars', *args], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


# Appended to a copy of the page: once it has loaded, how many of its images decoded.
_PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute('data-probe',
      `${loaded}/${images.length} images, ${document.body.scrollHeight} px, ` +
      `${document.body.innerText.trim().length} characters`);
});
</script>"""


class _Cells(html.parser.HTMLParser):
  """The text of each <td data-metric=...> of a page, per evaluation section and table class:
  `sections[evaluation][(table, metric)]`; `cells` is the validation section's."""

  def __init__(self):
    super().__init__()
    self.sections, self._section, self._table, self._metric, self.body = {}, None, None, None, {}

  @property
  def cells(self):
    return self.sections.get('validation', {})

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == 'section':
      self._section = attrs.get('data-evaluation')
    elif tag == 'table':
      self._table = attrs.get('class')
    elif tag == 'td' and 'data-metric' in attrs:
      self._metric = attrs['data-metric']
      self.sections.setdefault(self._section, {})[(self._table, self._metric)] = ''
    elif tag == 'body':
      self.body = attrs

  def handle_endtag(self, tag):
    if tag == 'td':
      self._metric = None
    elif tag == 'section':
      self._section = None

  def handle_data(self, data):
    if self._metric is not None:
      self.sections[self._section][(self._table, self._metric)] += data


@pytest.fixture(scope='module')
def rendered(run, tmp_path_factory):
  """(the DOM Chromium built from the page, its screenshot) of a copy with the probe."""
  workdir, _ = run
  page = (workdir / run_report.REPORT_FILE).read_text()
  probe = tmp_path_factory.mktemp('browser') / 'report.html'
  probe.write_text(page.replace('</body>', _PROBE + '</body>'))
  dom = _chromium('--virtual-time-budget=10000', '--dump-dom', probe.as_uri()).stdout
  shot = probe.with_suffix('.png')
  _chromium('--window-size=1200,1600', f'--screenshot={shot}', probe.as_uri())
  cells = _Cells()
  cells.feed(dom)
  return cells, shot


def test_the_last_log_line_links_the_report(run):
  workdir, log = run
  last = log.rstrip().splitlines()[-1]
  assert last.endswith(f'Run report: {(workdir / "report.html").as_uri()}'), last


def test_the_report_is_one_self_contained_file(run):
  workdir, _ = run
  page = (workdir / run_report.REPORT_FILE).read_text()
  assert '<script' not in page and not re.search(r'(src|href)="(https?:)?//', page)
  sources = re.findall(r'<img src="([^"]*)"', page)
  # accuracy, loss; then the confusion matrix, calibration and misclassified images of the
  # validation and of the test split
  assert len(sources) == 8
  assert all(s.startswith('data:image/png;base64,') for s in sources)


def test_the_report_renders_in_chromium_with_every_image_loaded(rendered):
  cells, shot = rendered
  probe = cells.body.get('data-probe')
  assert probe, 'the page never finished loading'
  loaded, height, characters = re.fullmatch(r'(\d+/\d+) images, (\d+) px, (\d+) characters',
                                            probe).groups()
  assert loaded == '8/8', probe
  assert int(height) > 2000 and int(characters) > 500, probe
  with Image.open(shot) as image:   # not blank: text, tables and pictures on white
    pixels = np.asarray(image.convert('L'))
  assert (pixels < 200).mean() > 0.02, (pixels < 200).mean()


def test_the_report_tables_hold_the_numbers_of_eval_json(run, rendered):
  workdir, _ = run
  saved = json.loads((workdir / 'eval.json').read_text())
  cells, _ = rendered
  shown = {metric: text for (table, metric), text in cells.cells.items() if table == 'metrics'}
  names = ['accuracy', 'loss'] + eval_metrics.scalar_names(saved)
  assert set(names) <= set(shown) and 'roc_auc' in names and 'ece' in names
  for name in names:
    assert shown[name] == f'{saved[name]:.4f}', name
  for class_name, values in saved['per_class'].items():
    for key in ('precision', 'recall', 'f1'):
      assert cells.cells[('per-class', f'{key}/{class_name}')] == f'{values[key]:.4f}'
    assert cells.cells[('per-class', f'support/{class_name}')] == str(values['support'])
  threshold = saved['threshold']
  assert cells.cells[('threshold', 'at_value/threshold')] == f'{threshold["value"]:.4f}'
  assert cells.cells[('threshold', 'at_0.5/f1')] == f'{threshold["at_0.5"]["f1"]:.4f}'
  test = json.loads((workdir / 'test.json').read_text())   # the test split's own section
  for name in ('accuracy', 'loss', 'f1_macro'):
    assert cells.sections['test'][('metrics', name)] == f'{test[name]:.4f}', name


def test_eval_json_and_the_epoch_rows_carry_the_metrics(run):
  workdir, log = run
  saved = json.loads((workdir / 'eval.json').read_text())
  assert set(saved['per_class']) == set(saved['class_names']) == {'class_0', 'class_1'}
  assert saved['threshold']['positive_class'] == 'class_1' and saved['threshold']['rule'] == 'f1'
  assert saved['calibration']['bins'] == 15 and sum(saved['calibration']['count']) == 12
  assert (workdir / 'calibration.png').stat().st_size > 0
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  for name in ('val_f1_macro', 'val_balanced_accuracy', 'val_roc_auc', 'val_log_loss',
               'val_ece', 'val_f1/class_1', 'val_threshold'):
    assert all(name in r for r in rows), name
  assert rows[-1]['val_f1_macro'] == saved['f1_macro']
  assert 'macro mean' in log and 'Decision threshold on p(class_1) maximising F1' in log


def test_tensorboard_has_step_points_epoch_metrics_and_the_config(run):
  workdir, log = run
  acc = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'),
                                           size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()

  def values(tag):
    return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]

  logged = {int(step): float(loss) for step, loss in
            re.findall(r'step (\d+)/\d+  loss ([\d.]+)', log)}
  loss = values('train_steps/loss')
  assert [s for s, _ in loss] == PROGRESS_STEPS
  for step, value in loss:   # the log's progress lines, to their 4 decimals
    assert f'{value:.4f}' == f'{logged[step]:.4f}', step
  assert [v for _, v in values('train_steps/learning_rate')] == pytest.approx([0.01] * 4)
  assert [s for s, _ in values('train_steps/accuracy')] == PROGRESS_STEPS
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  for tag, key in (('val/f1_macro', 'val_f1_macro'), ('val/ece', 'val_ece'),
                   ('val/roc_auc', 'val_roc_auc')):
    assert values(tag) == [(r['step'], pytest.approx(r[key], rel=1e-6)) for r in rows]
  content = acc.PluginTagToContent('hparams')['_hparams_/session_start_info']
  hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
  assert hparams['model.cut'].string_value == 'mixed0'
  assert hparams['finetune.epochs'].number_value == 0
  assert hparams['eval.threshold'].string_value == 'f1'


# ------------------------------------------------------------- the page from given evaluations

def _png(path, shade):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((8, 8, 3), shade, np.uint8)).save(path)


def test_the_report_shows_each_given_split_and_the_gradcam_overview_when_present(tmp_path):
  p = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]], np.float32)
  y = np.array([0, 1, 1, 1])
  result = {'loss': 0.4, 'accuracy': 0.75, 'count': 4, 'confusion': [[1, 0], [1, 2]],
            'metrics': eval_metrics.compute(p, y)}
  for name, shade in (('accuracy.png', 10), ('calibration_test.png', 20),
                      ('explain/overview.png', 30)):
    _png(tmp_path / name, shade)
  files.write_atomic(tmp_path / 'config.json', json.dumps({'data': {'source': 'fake'}}))
  evaluations = [
      run_report.Evaluation('Validation', evaluation.eval_json(result, ['a', 'b'], 3, 'val')),
      run_report.Evaluation('Test', evaluation.eval_json(result, ['a', 'b'], 3, 'test'),
                            (('Reliability diagram', 'calibration_test.png'),
                             ('Not written', 'missing.png')))]
  page = pathlib.Path(run_report.write(str(tmp_path), evaluations)).read_text()
  assert page.index('<h2>Validation</h2>') < page.index('<h2>Test</h2>')
  assert 'data-file="calibration_test.png"' in page and 'missing.png' not in page
  assert 'data-file="explain/overview.png"' in page and 'Grad-CAM' in page
  assert 'data-file="accuracy.png"' in page and 'loss.png' not in page
  # Without eval.json there is no evaluation to show, and no failure.
  assert '<h2>Evaluation' not in run_report.render(str(tmp_path),
                                                   run_report.evaluations_in(str(tmp_path)))
