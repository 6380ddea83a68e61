"""Every config field is checked before any work starts, with a message that says what to fix."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from configs import default
from hhjax import config_checks
from hhjax import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]
LEGACY_CONFIG = ROOT / 'tests' / 'data' / 'legacy_workdir' / 'config.json'

# Fields with no fixed set or range: any name, split or path may be right.
FREE_FIELDS = {'data.name', 'data.train_split', 'model.pretrained',
               'data.dir'}   # data.dir: needed with source='folder', tested below

# (field, a bad value, what the message must show of it; None: the value's repr).
BAD_VALUES = [
    ('seed', 1.5, None),
    ('batch_size', 0, None),
    ('eval_batch_size', 0, None),
    ('steps_per_epoch', 0, None),
    ('log_every_steps', -1, None),
    ('checkpoint_every_steps', -5, None),
    ('keep_checkpoints', 0, None),
    ('data.source', 'imagenet', None),
    ('data.image_size', 74, None),
    ('data.resize_method', 'bicubic', None),
    ('data.preprocessing', 'torch', None),
    ('data.image_dtype', 'float16', None),
    ('data.bad_files', 'ignore', None),
    ('data.cache_decoded', 'yes', None),
    ('data.validation_fraction', 1.0, None),
    ('data.validation_fraction', 0.0, None),     # nothing held out, and no split named
    ('data.validation_split', 'train', None),    # the training split itself
    ('data.test_split', 'train', None),
    ('data.eval_split', 'validation', None),     # replaced: the message says by what
    ('data.num_parallel_calls', 0, None),
    ('data.fake.num_train_examples', 0, None),
    ('data.fake.num_eval_examples', 0, None),
    ('data.fake.num_classes', 1, None),
    ('data.augment.enabled', 1, None),
    ('data.augment.rotation_range', -40.0, None),
    ('data.augment.width_shift_range', -0.2, None),
    ('data.augment.height_shift_range', 'x', None),
    ('data.augment.shear_range', float('nan'), None),
    ('data.augment.zoom_range', 1.0, None),
    ('data.augment.zoom_range', (1.2, 0.8), None),
    ('data.augment.zoom_range', (0.0, 1.2), None),
    ('data.augment.zoom_range', (0.8,), None),
    ('data.augment.horizontal_flip', 'true', None),
    ('data.augment.vertical_flip', None, None),
    ('data.augment.fill_mode', 'mirror', None),
    ('data.augment.cval', 'black', None),
    ('data.augment.on', 'gpu', None),
    ('data.crop.random_resized_crop', 'yes', None),
    ('data.crop.scale', (0.5, 0.1), None),
    ('data.crop.ratio', (0.0, 2.0), None),
    ('data.crop.eval_fraction', 1.5, None),
    ('data.random_erasing.probability', 2.0, None),
    ('data.random_erasing.scale', (0.1, 1.5), None),
    ('data.random_erasing.ratio', (3.0, 0.3), None),
    ('data.random_erasing.value', 'grey', None),
    ('data.mix.mixup_alpha', -0.2, None),
    ('data.mix.cutmix_alpha', float('inf'), None),
    ('data.mix.prob', 1.5, None),
    ('data.mix.switch_prob', -0.1, None),
    ('model.backbone', 'resnet18', None),
    ('model.cut', 'mixed11', None),
    ('model.head', 'mlp', None),
    ('model.hidden', -1, None),
    ('model.dropout', 1.0, None),
    ('model.drop_connect_rate', 1.0, None),
    ('speed.fast_convs', 'fast', None),
    ('speed.fold_bn', 'sometimes', None),
    ('speed.merge_1x1', 2, None),
    ('speed.fast_pools', 'maybe', None),
    ('speed.compute_dtype', 'float16', None),
    ('speed.cache_features', 'always', None),
    ('speed.cache_features_max_mb', 0.0, None),
    ('optimizer.name', 'adagrad', None),
    ('optimizer.rho', 1.0, None),
    ('optimizer.epsilon', 0.0, None),
    ('optimizer.momentum', 1.5, None),
    ('optimizer.nesterov', 'yes', None),
    ('optimizer.beta_1', 1.0, None),
    ('optimizer.beta_2', -0.1, None),
    ('optimizer.weight_decay', -0.01, None),
    ('optimizer.weight_decay_exclude', 'bias', None),
    ('optimizer.weight_decay_exclude', ('(bias',), "'(bias'"),
    ('optimizer.global_clipnorm', 0.0, None),
    ('optimizer.amsgrad', 'yes', None),
    ('optimizer.clipnorm', 0.0, None),
    ('optimizer.clipvalue', -1.0, None),
    ('optimizer.gradient_accumulation_steps', 1, None),
    ('optimizer.use_ema', 1, None),
    ('optimizer.ema_momentum', 1.1, None),
    ('optimizer.ema_overwrite_frequency', 0, None),
    ('reduce_lr_on_plateau.monitor', 'loss', None),
    ('reduce_lr_on_plateau.factor', 1.0, None),
    ('reduce_lr_on_plateau.patience', -1, None),
    ('reduce_lr_on_plateau.min_delta', -1e-4, None),
    ('reduce_lr_on_plateau.cooldown', 0.5, None),
    ('reduce_lr_on_plateau.min_lr', -1.0, None),
    *[(f'{phase}.schedule.{field}', value, None) for phase in ('warmup', 'finetune')
      for field, value in (('name', 'linear'), ('decay_steps', 0), ('alpha', 2.0),
                           ('warmup_target', -1.0), ('warmup_steps', -1),
                           ('decay_rate', 0.0), ('staircase', 'no'), ('boundaries', (3, 1)),
                           ('values', (0.1, 0.0)))],
    ('warmup.epochs', -1, None),
    ('warmup.learning_rate', 0.0, None),
    ('warmup.param_labels', (('^head/', 'thaw'),), "('^head/', 'thaw')"),
    ('warmup.param_labels', (('(head', 'train'),), "('(head', 'train')"),
    ('warmup.param_labels', ('^head/',), "'^head/'"),
    ('warmup.param_labels', '^head/', None),
    ('finetune.epochs', -1, None),
    ('finetune.learning_rate', -1e-5, None),
    ('finetune.param_labels', (('^head/', 'train', 'x'),), "('^head/', 'train', 'x')"),
    ('finetune.unfreeze_from', 'block7', None),
    ('finetune.unfreeze_from', 'mixed8', None),     # after the default cut, mixed7
    ('finetune.train_bn', 'no', None),
    ('early_stopping.metric', 'accuracy', None),
    ('early_stopping.mode', 'maximum', None),
    ('early_stopping.threshold', 'high', None),
    ('eval.top_k', (0,), None),
    ('eval.threshold', 'accuracy', None),
    ('eval.calibration_bins', 0, None),
    ('loss.label_smoothing', 1.0, None),
    ('loss.label_smoothing', -0.1, None),
    ('loss.class_weight', 'equal', None),
    ('loss.class_weight', 'horses=heavy', None),
    ('loss.class_weight', {'horses': -1.0}, 'horses'),
    ('loss.class_weight', 2.0, None),
    ('warmup.param_labels', (('^head/', 0.0),), "('^head/', 0.0)"),
    ('finetune.param_labels', (('^head/', float('inf')),), "('^head/', inf)"),
    ('warmup.layer_decay', 0.0, None),
    ('finetune.layer_decay', 1.5, None),
] + [(f'{phase}.early_stopping.{field}', value, None)
     for phase in ('warmup', 'finetune')
     for field, value in (('monitor', 'val_auc'), ('min_delta', -0.01), ('patience', -1),
                          ('patience', 2.5), ('mode', 'up'), ('baseline', 'low'),
                          ('restore_best_weights', 'yes'), ('start_from_epoch', -1))]


def _set(tree: dict, path: str, value) -> None:
  *parents, name = path.split('.')
  for key in parents:
    tree = tree[key]
  tree[name] = value


def _config(**overrides) -> ml_collections.ConfigDict:
  """The default config with `overrides` ('a__b': value sets a.b), rebuilt as a workdir's
  config.json is loaded, so that any type can be set."""
  tree = default.get_config().to_dict()
  for key, value in overrides.items():
    _set(tree, key.replace('__', '.'), value)
  return ml_collections.ConfigDict(tree)


def _message(config) -> str:
  with pytest.raises(errors.ConfigError) as raised:
    config_checks.validate(config)
  return str(raised.value)


def _leaves(tree: dict, prefix: str = '') -> list[str]:
  out = []
  for key, value in tree.items():
    if isinstance(value, dict):
      out += _leaves(value, f'{prefix}{key}.')
    else:
      out.append(f'{prefix}{key}')
  return out


@pytest.mark.parametrize('field, value, shown', BAD_VALUES,
                         ids=[f'{f}={v!r}' for f, v, _ in BAD_VALUES])
def test_a_bad_value_is_rejected_naming_the_field_and_the_value(field, value, shown):
  message = _message(_config(**{field.replace('.', '__'): value}))
  assert f'config.{field}' in message
  assert (shown or repr(value)) in message
  assert '\n' not in message      # one bad field: one line


def test_every_field_of_the_default_config_is_checked_or_free_by_design():
  tested = {field for field, _, _ in BAD_VALUES}
  assert set(_leaves(default.get_config().to_dict())) == tested | FREE_FIELDS


def test_the_replaced_eval_split_is_refused_naming_what_replaced_it():
  message = _message(_config(data__eval_split='validation'))
  assert 'config.data.validation_split' in message and 'config.data.test_split' in message


def test_a_test_split_that_also_validates_is_refused():
  message = _message(_config(data__validation_split='test', data__test_split='test'))
  assert 'config.data.test_split' in message and 'chooses' in message


def test_a_named_validation_split_ignores_the_fraction_and_a_legacy_eval_split_validates():
  config_checks.validate(_config(data__validation_split='validation',
                                 data__validation_fraction=0.0, data__test_split=None))
  legacy = default.get_config().to_dict()
  for field in ('validation_split', 'validation_fraction', 'test_split'):
    del legacy['data'][field]
  legacy['data']['eval_split'] = 'test'      # what a workdir's config.json held before
  config_checks.validate(ml_collections.ConfigDict(legacy))


@pytest.mark.parametrize('name', sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                                        if p.stem != '__init__'))
def test_every_shipped_config_validates(name):
  config_checks.validate(importlib.import_module(f'configs.{name}').get_config())


def test_a_legacy_workdir_config_validates_even_without_optional_sections():
  tree = json.loads(LEGACY_CONFIG.read_text())
  config_checks.validate(ml_collections.ConfigDict(tree))
  for section in ('speed', 'early_stopping', 'optimizer'):
    del tree[section]
  del tree['data']['augment'], tree['data']['fake'], tree['warmup']['param_labels']
  config_checks.validate(ml_collections.ConfigDict(tree))


@pytest.mark.parametrize('boundaries, values, field', [
    ((10, 5), (0.1, 0.01, 0.001), 'boundaries'),
    ((5, 10), (0.1, 0.01), 'values'),
    ((5,), (0.1, -0.01), 'values'),
])
def test_a_piecewise_schedule_needs_increasing_boundaries_and_one_more_value(
    boundaries, values, field):
  message = _message(_config(finetune__schedule__name='piecewise',
                             finetune__schedule__boundaries=boundaries,
                             finetune__schedule__values=values))
  assert message.startswith(f'config.finetune.schedule.{field} = ') and '\n' not in message
  config_checks.validate(_config(finetune__schedule__name='piecewise',
                                 finetune__schedule__boundaries=(5, 10),
                                 finetune__schedule__values=(0.1, 0.01, 0.001)))


def test_reduce_lr_on_plateau_refuses_a_schedule():
  message = _message(_config(reduce_lr_on_plateau__monitor='val_loss',
                             warmup__schedule__name='cosine'))
  assert message.startswith("config.warmup.schedule.name = 'cosine': must be 'constant' while "
                            'config.reduce_lr_on_plateau.monitor is set')
  config_checks.validate(_config(reduce_lr_on_plateau__monitor='val_loss'))


def test_one_clipping_and_amsgrad_with_adam_only_as_keras():
  message = _message(_config(optimizer__clipnorm=1.0, optimizer__clipvalue=0.5))
  assert message == ('config.optimizer.clipnorm = 1.0 and config.optimizer.clipvalue = 0.5: '
                     'only one of global_clipnorm, clipnorm and clipvalue may be set (as in '
                     'Keras); set the others to None.')
  message = _message(_config(optimizer__amsgrad=True))   # the default rmsprop
  assert message == ("config.optimizer.amsgrad = True: must be False unless "
                     "config.optimizer.name is 'adam' or 'adamw' (Keras's amsgrad is theirs).")
  for name in ('adam', 'adamw'):
    config_checks.validate(_config(optimizer__name=name, optimizer__amsgrad=True,
                                   optimizer__clipvalue=0.5))


def test_the_message_lists_the_allowed_values():
  message = _message(_config(data__resize_method='bicubic'))
  assert message == ("config.data.resize_method = 'bicubic': must be one of 'bilinear', "
                     "'nearest'.")


def test_a_folder_source_needs_a_folder():
  message = _message(_config(data__source='folder'))
  assert 'config.data.dir = None' in message and "source='folder'" in message
  config_checks.validate(_config(data__source='folder', data__dir='/images'))


def test_nothing_to_train_names_both_phases():
  message = _message(_config(warmup__epochs=0, finetune__epochs=0))
  assert 'config.warmup.epochs = 0' in message and 'config.finetune.epochs = 0' in message


def test_unfreeze_from_after_the_cut_is_fine_when_fine_tuning_is_off():
  config_checks.validate(_config(model__cut='mixed2', finetune__epochs=0))
  message = _message(_config(model__cut='mixed2'))
  assert "config.finetune.unfreeze_from = 'mixed6'" in message and "'mixed2'" in message


@pytest.mark.parametrize('backbone, field, value, listed', [
    ('resnet50', 'model__cut', 'mixed7', "'conv2_block1_out', 'conv2_block2_out'"),
    ('vgg16', 'model__cut', 'block6_pool', "'block1_pool', 'block2_pool'"),
    ('xception', 'finetune__unfreeze_from', 'mixed6', "'block2_add', 'block3_add'"),
])
def test_cut_and_unfreeze_from_must_be_endpoints_of_the_backbone(backbone, field, value,
                                                                   listed):
  valid = {'resnet50': 'conv4_block6_out', 'vgg16': 'block5_pool',
           'xception': 'block14_sepconv2_act'}[backbone]
  config = _config(model__backbone=backbone, model__cut=valid, finetune__unfreeze_from=valid)
  config_checks.validate(config)
  message = _message(_config(**{'model__backbone': backbone, 'model__cut': valid,
                                'finetune__unfreeze_from': valid, field: value}))
  assert f'config.{field.replace("__", ".")} = {value!r}' in message and listed in message


def test_image_size_below_the_backbones_minimum_is_rejected():
  message = _message(_config(model__backbone='xception', model__cut='block14_sepconv2_act',
                             finetune__unfreeze_from='block13_add', data__image_size=64))
  assert 'config.data.image_size = 64' in message and '>= 71 (Xception)' in message


def test_every_bad_field_is_reported_at_once():
  message = _message(_config(batch_size=0, model__head='mlp', early_stopping__mode='up'))
  lines = message.splitlines()
  assert lines[0] == '3 config fields have bad values:'
  assert [line.split()[0] for line in lines[1:]] == [
      'config.batch_size', 'config.model.head', 'config.early_stopping.mode']


def test_a_config_error_is_a_value_error_for_library_callers():
  with pytest.raises(ValueError, match='config.model.hidden'):
    config_checks.validate(_config(model__hidden=-1))


def test_the_checks_and_the_data_fields_allowed_values_load_without_tensorflow():
  # main.py checks the config before TensorFlow loads, so that a mistake is reported at once.
  code = ('import sys, main, hhjax.config_checks, hhjax.data.spec; '
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'; "
          "assert 'sklearn' not in sys.modules, 'sklearn was imported'")
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------------ the command line

@pytest.fixture(scope='module')
def env():
  env = dict(os.environ, HHJAX_MALLOC_TUNING='off', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return env


# main.py, reporting at its exit which of the heavy libraries it had loaded (main.py re-executes
# itself first unless HHJAX_MALLOC_TUNING=off, which would leave this wrapper behind).
_MAIN_WITH_MODULES = r'''
import atexit, runpy, sys
sys.path.insert(0, sys.argv[1])
HEAVY = ('tensorflow', 'tensorflow_datasets', 'orbax', 'keras', 'tf_keras')
atexit.register(lambda: print('loaded: ' + ','.join(m for m in HEAVY if m in sys.modules),
                              file=sys.stderr))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def _main_fails_fast(args: list[str], env: dict, field: str) -> None:
  """main.py stops with a one-line error naming `field` before it loads TensorFlow, orbax or
  Keras (the seconds of imports, the data and the model come after the checks)."""
  proc = subprocess.run([sys.executable, '-c', _MAIN_WITH_MODULES, str(ROOT), 'main.py', *args],
                        env=dict(env, HHJAX_MALLOC_TUNING='off'), cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == errors.EXIT_USER_ERROR, proc.stderr[-3000:]
  *_, last, loaded = proc.stderr.strip().splitlines()
  assert last.startswith('error: ') and field in last, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  assert loaded.strip() == 'loaded:', f'{loaded} before reporting a config error'


@pytest.mark.parametrize('overrides, field', [
    (['--config.data.resize_method=bicubic'], 'config.data.resize_method'),
    (['--config.model.head=mlp'], 'config.model.head'),
    (['--config.speed.fold_bn=sometimes'], 'config.speed.fold_bn'),
    (['--config.warmup.epochs=0', '--config.finetune.epochs=0'], 'config.finetune.epochs'),
    (['--config.early_stopping.mode=maximum'], 'config.early_stopping.mode'),
    (["--config.loss.class_weight={'class_1': -1.0}"], 'config.loss.class_weight'),
], ids=['data', 'model', 'speed', 'phases', 'early_stopping', 'class_weight_mapping'])
def test_main_reports_a_bad_override_before_loading_the_libraries(overrides, field, env,
                                                                  tmp_path):
  _main_fails_fast(['--config=configs/smoke.py', f'--workdir={tmp_path}', *overrides], env,
                   field)


def test_main_checks_the_config_a_workdir_saved_before_evaluating(env, tmp_path):
  tree = json.loads(LEGACY_CONFIG.read_text())
  tree['data']['augment']['fill_mode'] = 'mirror'
  (tmp_path / 'config.json').write_text(json.dumps(tree))
  _main_fails_fast(['--mode=eval', f'--workdir={tmp_path}'], env,
                   'config.data.augment.fill_mode')


def test_processes_that_differ_are_named_with_what_differs():
  from hhjax import agreement  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  base = agreement.description('train', config, {'checkpoint': 'latest'})
  other = json.loads(json.dumps(base))
  other['config']['warmup.learning_rate'] = 0.5
  other['code'] = 'abcdef123456'
  same = json.loads(json.dumps(base))
  assert agreement.differences([base, same]) == []
  assert agreement.differences([base, same, other]) == [
      f"code version {base['code']} on process 0, abcdef123456 on process 2 (another checkout "
      'or edited files), config.warmup.learning_rate: 0.0001 on process 0, 0.5 on process 2']
  assert len(agreement.code_version()) == 12
