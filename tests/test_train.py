"""The training loop in-process, on a tiny model: phases, freezing, outputs, eval and predict."""

import functools
import glob
import json
import os
import shutil

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import smoke
from hhjax import checkpointing
from hhjax import config_checks
from hhjax import entry
from hhjax import errors
from hhjax import evaluate
from hhjax import predict
from hhjax import sharding
from hhjax import train
from hhjax import workdir as workdir_lib
from hhjax.training import phases as phases_lib
from hhjax.training import state as state_lib
from hhjax.training import steps
from hhjax.weights import pretrained


def _init(model, config):
  """The model's random initial variables, as a function of nothing (to jit or eval_shape)."""
  return functools.partial(state_lib.init_variables, model, config.data.image_size,
                           config.seed)


def tiny_config():
  """InceptionV3 up to mixed0 at 75x75, batch 2, 3 steps per epoch."""
  config = smoke.get_config()
  config.batch_size = 2
  config.steps_per_epoch = 3
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 10
  config.data.fake.num_train_examples = 16
  config.data.fake.num_eval_examples = 6
  config.model.cut = 'mixed0'
  config.model.hidden = 8
  config.finetune.unfreeze_from = 'mixed0'
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory, keras_notop_h5):
  """One run from a Keras .h5 (random weights in the official file's layout): warm-up stopped
  early after its first epoch (step 3), then a fine-tuning epoch."""
  config = tiny_config()
  config.model.pretrained = str(keras_notop_h5)
  config.warmup.epochs = 2
  config.finetune.epochs = 1
  config.early_stopping.metric = 'train_accuracy'
  config.early_stopping.threshold = -1.0     # always reached: each phase stops after 1 epoch
  workdir = str(tmp_path_factory.mktemp('trained'))
  built = []
  with pytest.MonkeyPatch.context() as patch:   # counts the optimizers the run builds
    make = phases_lib.optim.make_optimizer
    patch.setattr(phases_lib.optim, 'make_optimizer',
                  lambda *a, **k: built.append(1) or make(*a, **k))
    result = train.train_and_evaluate(config, workdir)
  result['optimizers_built'] = len(built)
  return config, workdir, result


def test_each_phase_builds_its_optimizer_once_and_saves_its_phase_by_name(trained):
  _, workdir, result = trained
  assert result['optimizers_built'] == 2          # warm-up and fine-tuning, once each
  with checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True) as c:
    info = c.info(c.latest_step())
  assert info['phase'] == info['progress']['phase'] == 'finetune'
  assert 'phase_index' not in info['progress']


def _arrays(workdir, step):
  with checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True) as c:
    return c.restore_arrays(step)


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


def test_run_writes_metrics_plots_tensorboard_and_eval(trained):
  _, workdir, result = trained
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [(r['step'], r['epoch'], r['phase']) for r in rows] == [(3, 1, 'warmup'),
                                                                 (6, 2, 'finetune')]
  for row in rows:
    assert 0 <= row['val_accuracy'] <= 1 and np.isfinite(row['train_loss'])
  for name in ('loss.png', 'accuracy.png', 'config.json', 'eval.json'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, 'eval.json')) as f:
    saved = json.load(f)
  assert np.sum(saved['confusion']) == 6 == saved['count']   # every eval image once
  assert saved['accuracy'] == pytest.approx(np.trace(saved['confusion']) / 6)
  assert saved['accuracy'] == result['accuracy'] == rows[-1]['val_accuracy']
  import tensorflow as tf
  events = glob.glob(os.path.join(workdir, 'tensorboard', 'events.*'))
  tags = {v.tag for e in tf.compat.v1.train.summary_iterator(events[0]) for v in e.summary.value}
  assert {'train/loss', 'train/accuracy', 'val/loss', 'val/accuracy'} <= tags


def test_early_stopping_ends_a_phase_at_the_threshold(trained):
  _, _, result = trained
  assert 'train_accuracy' in result['stop_reason']


def test_warmup_leaves_the_pretrained_backbone_bit_identical(trained, keras_notop_h5):
  config, workdir, _ = trained
  _, keras = pretrained.load_pretrained(keras_notop_h5, final_endpoint=config.model.cut)
  after_warmup = _arrays(workdir, 3)
  for collection in ('params', 'batch_stats'):
    want, got = _flat(keras[collection]), _flat(after_warmup[collection]['backbone'])
    assert want.keys() == got.keys()
    for k in want:   # the run started from the file, and warm-up did not touch it
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # ... while the head did train.
  model = entry.model(config, 2)
  initial = jax.jit(_init(model, config))()
  assert not np.array_equal(after_warmup['params']['head']['output']['kernel'],
                            initial['params']['head']['output']['kernel'])


def test_finetuning_opens_only_the_blocks_from_unfreeze_from(trained):
  _, workdir, _ = trained
  start, end = _arrays(workdir, 3), _arrays(workdir, 6)
  a, b = _flat(start['params']['backbone']), _flat(end['params']['backbone'])
  changed = {k for k in a if not np.array_equal(a[k], b[k])}
  assert changed and all(k.startswith('mixed0/') for k in changed)
  assert not any(k.startswith('stem/') for k in changed)
  # BatchNorm stays in inference mode (config.finetune.train_bn=False).
  sa, sb = _flat(start['batch_stats']), _flat(end['batch_stats'])
  assert all(np.array_equal(sa[k], sb[k]) for k in sa)


def _count_primitive(jaxpr, name):
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          n += _count_primitive(inner, name)
  return n


def test_warmup_step_has_no_backward_pass_through_the_backbone():
  config = tiny_config()
  model = entry.model(config, 2)
  mesh = sharding.make_mesh()
  batch = {'image': jnp.zeros((2, 75, 75, 3)), 'label': jnp.zeros((2,), jnp.int32)}
  variables = state_lib.abstract_variables(model, config.data.image_size)
  forward = jax.make_jaxpr(lambda v: model.apply(v, batch['image']))(variables)
  convs_forward = _count_primitive(forward.jaxpr, 'conv_general_dilated')
  counts = {}
  for phase in entry.phases(config):
    setup = entry.setup_for(config)(phase, variables['params'])
    state = state_lib.abstract_state(model, config.data.image_size, config.seed, setup.tx, mesh)
    step = steps.make_train_step(model, setup)
    counts[phase.name] = _count_primitive(jax.make_jaxpr(step)(state, batch).jaxpr,
                                          'conv_general_dilated')
  assert convs_forward > 0
  assert counts['warmup'] == convs_forward       # the forward pass only
  assert counts['finetune'] > convs_forward      # mixed0's backward (the check can fail)


def test_evaluate_reproduces_the_final_evaluation(trained):
  config, workdir, result = trained
  again = evaluate.evaluate(workdir_lib.load_config(workdir), workdir)
  assert again['accuracy'] == result['accuracy']
  assert again['loss'] == pytest.approx(result['loss'], rel=1e-6)
  assert again['confusion'] == result['confusion']


def test_predict_takes_files_folders_and_globs(trained, tmp_path):
  _, workdir, _ = trained
  rng = np.random.default_rng(0)
  (tmp_path / 'folder' / 'sub').mkdir(parents=True)
  paths = [tmp_path / 'folder' / 'a.png', tmp_path / 'folder' / 'sub' / 'b.jpg',
           tmp_path / 'c.png', tmp_path / 'd.png']
  for p in paths:
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), np.uint8)).save(p)
  results = predict.predict(workdir_lib.load_config(workdir), workdir,
                          [str(tmp_path / 'folder'), str(paths[2]), str(tmp_path / 'd.*')])
  assert [r[0] for r in results] == [str(p) for p in paths]
  for _, name, prob in results:
    assert name in ('class_0', 'class_1') and 0.5 <= prob <= 1.0


def test_predict_reports_missing_images(trained, tmp_path):
  _, workdir, _ = trained
  with pytest.raises(FileNotFoundError, match='nothing_here'):
    predict.predict(workdir_lib.load_config(workdir), workdir,
                    [str(tmp_path / 'nothing_here*.png')])


def test_rerunning_a_finished_run_trains_nothing(trained, tmp_path):
  config, workdir, result = trained
  rows_before = open(os.path.join(workdir, 'metrics.jsonl')).read()
  # Precedence: the workdir's checkpoint wins over config.model.pretrained (never read here).
  config = config.copy_and_resolve_references()
  config.model.pretrained = str(tmp_path / 'missing.h5')
  again = train.train_and_evaluate(config, workdir)
  assert again['step'] == 6 and again['accuracy'] == result['accuracy']
  assert open(os.path.join(workdir, 'metrics.jsonl')).read() == rows_before


def test_checkpoint_of_another_model_is_a_clear_error(trained):
  config, workdir, _ = trained
  other = config.copy_and_resolve_references()
  other.model.cut = 'mixed1'
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"(?s)config\.model\.cut: checkpoint 'mixed0', now 'mixed1'.*mixed1"):
    train.train_and_evaluate(other, workdir)


def test_a_resume_that_would_hold_out_other_rows_is_refused(trained):
  # Holding out a share of train changes the training table the stream's position points into.
  config, workdir, _ = trained
  before = open(os.path.join(workdir, 'config.json')).read()
  other = config.copy_and_resolve_references()
  other.data.validation_split = None    # now 10 % of train would validate
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"another held-out validation share.*checkpoint nothing held out, "
                           r"now train_split 'train', validation_fraction 0\.1, seed 0"):
    train.train_and_evaluate(other, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before


def _disagreeing_folder(root):
  """train/ of dark (class_0) and bright (class_1) images; validation/ three dark and two
  bright; test/ the same five images with their labels swapped: whatever a model predicts, its
  test accuracy is 1 - its validation accuracy, and the two are never equal."""
  rng = np.random.default_rng(0)
  def write(path, level):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(level + rng.integers(-20, 20, (75, 75, 3)), 0, 255)
                    .astype(np.uint8)).save(path)
  for i in range(4):
    write(root / 'train' / 'class_0' / f'{i}.png', 40)
    write(root / 'train' / 'class_1' / f'{i}.png', 215)
  for i, (level, true, swapped) in enumerate([(40, 0, 1)] * 3 + [(215, 1, 0)] * 2):
    write(root / 'validation' / f'class_{true}' / f'{i}.png', level)
    shutil.copy(root / 'validation' / f'class_{true}' / f'{i}.png',
                (root / 'test' / f'class_{swapped}').mkdir(parents=True, exist_ok=True) or
                root / 'test' / f'class_{swapped}' / f'{i}.png')
  return root


def test_early_stopping_and_the_best_checkpoint_read_validation_never_test(tmp_path):
  config = tiny_config()
  config.data.source, config.data.dir = 'folder', str(_disagreeing_folder(tmp_path / 'data'))
  config.data.validation_split, config.data.test_split = 'validation', 'test'
  config.warmup.epochs, config.finetune.epochs = 1, 0
  config.early_stopping.metric, config.early_stopping.threshold = 'val_accuracy', 0.5
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  row, = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  validation = json.load(open(os.path.join(workdir, 'eval.json')))
  test = json.load(open(os.path.join(workdir, train.TEST_FILE)))
  assert (validation['split'], test['split']) == ('validation', 'test')
  assert validation['step'] == test['step'] == row['step'] == result['step']
  assert validation['count'] == test['count'] == 5
  assert row['val_accuracy'] == validation['accuracy'] == result['accuracy']
  assert row['val_loss'] == pytest.approx(validation['loss'], rel=1e-6)
  assert test['accuracy'] == pytest.approx(1 - validation['accuracy'])    # they disagree
  assert result['test']['accuracy'] == test['accuracy']
  # The stop is decided by validation's accuracy; test's would decide the other way.
  assert bool(result['stop_reason']) == (validation['accuracy'] > 0.5) != (test['accuracy'] > 0.5)
  # The metrics that rank checkpoints for --checkpoint=best are validation's.
  with checkpointing.Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True) as c:
    ranked = c._manager.metrics(row['step'])   # pylint: disable=protected-access
  assert ranked['val_accuracy'] == validation['accuracy'] != test['accuracy']
  assert os.path.exists(os.path.join(workdir, train.TEST_PICTURES, 'confusion_matrix.png'))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_config()
  config.warmup.epochs, config.finetune.epochs = 2, 0
  config.warmup.learning_rate = 1e38   # the first update overflows: the next loss is not finite
  config.checkpoint_every_steps = 1
  with pytest.raises(errors.NonFiniteLossError,
                     match=r'NaN or infinite at step (\d+).*last good checkpoint \(step 1\)'):
    train.train_and_evaluate(config, str(tmp_path))
  with checkpointing.Checkpoints(tmp_path / 'checkpoints', read_only=True) as ckpts:
    assert ckpts.all_steps() == [1]


def test_global_batch_must_divide_by_the_device_count(monkeypatch):
  monkeypatch.setattr(sharding.jax, 'device_count', lambda: 8)
  with pytest.raises(ValueError, match=r'batch_size=20 does not divide by the 8 devices.*16'):
    sharding.check_batch_size(20)
  sharding.check_batch_size(24)


def test_config_errors_name_the_field():
  config = tiny_config()
  config.finetune.unfreeze_from = 'mixed5'
  with pytest.raises(ValueError, match=r"unfreeze_from='mixed5'.*'stem'.*'mixed0'"):
    entry.phases(config)
  config = tiny_config()
  config.warmup.epochs = config.finetune.epochs = 0
  with pytest.raises(ValueError, match='Nothing to train'):
    entry.phases(config)
  config = tiny_config()
  config.early_stopping.metric = 'accuracy'
  with pytest.raises(ValueError, match='early_stopping.metric'):
    config_checks.validate(config)


def test_refused_resume_leaves_the_saved_config_for_eval(trained):
  config, workdir, result = trained
  before = open(os.path.join(workdir, 'config.json')).read()
  other = config.copy_and_resolve_references()
  other.model.hidden = 4
  with pytest.raises(errors.CheckpointMismatchError, match='hidden'):
    train.train_and_evaluate(other, workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before
  again = evaluate.evaluate(workdir_lib.load_config(workdir), workdir)
  assert again['accuracy'] == result['accuracy']


def test_predict_lists_every_unreadable_file_or_skips_them(trained, tmp_path):
  _, workdir, _ = trained
  Image.fromarray(np.full((80, 80, 3), 99, np.uint8)).save(tmp_path / 'a.png')
  (tmp_path / 'b.jpg').write_text('not a jpeg')
  (tmp_path / 'c.png').write_bytes(b'')
  (tmp_path / 'notes.txt').write_text('not an image name: never read')
  config = workdir_lib.load_config(workdir)
  with pytest.raises(ValueError) as e:
    predict.predict(config, workdir, [str(tmp_path)])
  message = str(e.value)
  assert '2 of the 3 files' in message and 'function_node' not in message
  assert 'b.jpg: Unknown image file format' in message and 'c.png: empty file' in message
  config.data.bad_files = 'skip'
  results = predict.predict(config, workdir, [str(tmp_path)])
  assert [os.path.basename(r[0]) for r in results] == ['a.png']


def test_resume_finds_the_phase_by_name_when_warmup_epochs_change(tmp_path):
  config = tiny_config()
  config.steps_per_epoch = 1
  config.warmup.epochs, config.finetune.epochs = 1, 2
  train.train_and_evaluate(config, str(tmp_path))          # checkpoints at steps 1, 2, 3
  shutil.rmtree(tmp_path / 'checkpoints' / '3')          # as if killed during the last epoch
  config.warmup.epochs = 0                                  # the warm-up is done anyway
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 3                                # fine-tuning ends its 2nd epoch
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['step'], r['phase']) for r in rows] == [(1, 'warmup'), (2, 'finetune'),
                                                     (3, 'finetune')]


def test_predict_prints_on_the_first_process_only(trained, tmp_path, capsys, monkeypatch):
  _, workdir, _ = trained
  Image.fromarray(np.full((80, 80, 3), 99, np.uint8)).save(tmp_path / 'a.png')
  monkeypatch.setattr(predict.jax, 'process_index', lambda: 1)
  results = predict.predict(workdir_lib.load_config(workdir), workdir, [str(tmp_path / 'a.png')])
  assert len(results) == 1 and capsys.readouterr().out == ''


def test_a_nonfinite_loss_before_any_checkpoint_does_not_promise_a_resume():
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  for latest, needle in ((None, 'No checkpoint had been written yet. Lower the learning rate '
                          '(config.finetune.learning_rate) or check the input data; running the '
                          'same command again starts from the beginning.'),
                         (4, 'The last good checkpoint (step 4) is kept in /w/checkpoints. '
                          'Lower the learning rate (config.finetune.learning_rate) or check the '
                          'input data; running the same command again resumes from that '
                          'checkpoint.')):
    ckpts = SimpleNamespace(wait=lambda: None, latest_step=lambda l=latest: l,
                            directory='/w/checkpoints')
    with pytest.raises(errors.NonFiniteLossError) as raised:
      train._check_finite(SimpleNamespace(ckpts=ckpts), {'nonfinite_step': np.int32(7)},
                         'finetune')
    assert str(raised.value).endswith(needle), str(raised.value)


def test_lines_of_metrics_jsonl_that_are_not_rows_are_left_out_with_a_warning(tmp_path, caplog):
  from hhjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  (tmp_path / 'metrics.jsonl').write_text(
      '{"step": 10, "val_accuracy": 0.5}\n{"step": 20, "val_acc\n\ngarbage\n7\n'
      '{"step": 30, "val_accuracy": 0.75}\n')
  with caplog.at_level('WARNING', logger='absl'):
    rows = metrics_lib.read_rows(str(tmp_path))
  assert [r['step'] for r in rows] == [10, 30]
  assert (f"Left out 3 line(s) of {tmp_path}/metrics.jsonl that are not JSON rows (line 2: "
          """'{"step": 20, "val_acc'; line 4: 'garbage'; line 5: '7'); the other 2 rows are """
          'used.') in caplog.text


def test_a_finished_run_given_more_epochs_trains_them_exactly(tmp_path, caplog):
  # Keras's fit(initial_epoch=...): the added fine-tuning epochs continue the finished phase,
  # ending where a run given them from the start ends. Validation is held out of train here:
  # the resumed run trains on the rows the first one did.
  config = tiny_config()
  config.steps_per_epoch = 1
  config.warmup.epochs, config.finetune.epochs = 0, 1
  config.data.validation_split = None   # 10 % of each class of the 16 training images
  train.train_and_evaluate(config, str(tmp_path / 'short'))     # step 1
  split = json.load(open(tmp_path / 'short' / train.DATA_SPLIT_FILE))
  assert split['validation_per_class'] == [1, 1] and split['training_per_class'] == [7, 7]
  assert json.load(open(tmp_path / 'short' / 'eval.json'))['count'] == 2
  config.finetune.epochs = 3
  with caplog.at_level('INFO'):
    longer = train.train_and_evaluate(config, str(tmp_path / 'short'))
  assert longer['step'] == 3
  assert 'trains only the head' not in caplog.text   # fine-tuning opens the random backbone
  assert 'Phase finetune ended after 1 epoch; config.finetune.epochs is now 3: training 2 ' \
         'more from step 1.' in caplog.text
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  assert whole['step'] == 3 and whole['accuracy'] == longer['accuracy']
  rows = [json.loads(line) for line in open(tmp_path / 'short' / 'metrics.jsonl')]
  assert [(r['step'], r['epoch']) for r in rows] == [(1, 1), (2, 2), (3, 3)]
  mesh = sharding.make_mesh()
  short, whole_state = (checkpointing.Checkpoints(str(tmp_path / d / 'checkpoints'))
                        for d in ('short', 'whole'))
  target = entry.restore_target(config, mesh)
  from hhjax.training import restore  # pylint: disable=g-import-not-at-top
  a, b = restore.restore(short, 3, target).state, restore.restore(whole_state, 3, target).state
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a['params']),
               jax.device_get(b['params']))


def test_an_early_stopped_phase_given_more_epochs_stays_done_and_says_so(trained, caplog):
  config, workdir, result = trained
  config = config.copy_and_resolve_references()
  config.finetune.epochs = 3
  config.warmup.epochs = 4
  with caplog.at_level('INFO'):
    again = train.train_and_evaluate(config, workdir)
  assert again['step'] == 6
  assert 'Phase finetune stopped early after 1 epoch (train_accuracy' in caplog.text
  assert 'config.warmup.epochs went from 2 to 4, but phase warmup is over' in caplog.text


def test_a_head_on_a_frozen_random_backbone_is_warned_of():
  config = tiny_config()            # random init; warm-up freezes the backbone
  model = entry.model(config, 2)
  params = jax.eval_shape(_init(model, config))['params']
  warnings = phases_lib.heads_on_random_features(entry.phases(config), params, 2)
  assert len(warnings) == 1 and warnings[0].startswith(
      'Phase warmup trains only the head, on a frozen backbone with random weights')
  for needle in ('near chance (50 % for 2 classes)', '--config.model.pretrained=PATH',
                 '--config.warmup.epochs=0 --config.finetune.unfreeze_from=stem'):
    assert needle in warnings[0]
  config.warmup.epochs = 0          # fine-tuning opens mixed0: the backbone learns
  assert not phases_lib.heads_on_random_features(entry.phases(config), params, 2)
