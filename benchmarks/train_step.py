"""Times hhjax's jitted train step, the counterpart of benchmarks/keras_reference.py.

The seed's model (InceptionV3 cut at mixed7, random weights -> Flatten -> Dense(1024, relu) ->
Dropout(0.2) -> Dense(1)), batch 20 at 150x150, RMSprop, on synthetic data already on the
device; the step is the one training runs (`hhjax.training.steps.make_train_step`, jitted with the
same shardings and donation), timed after compilation. Cases:

  warmup           backbone frozen, only the head differentiated (config.warmup).
  forward          the same model's inference forward alone: the floor a warm-up step
                   approaches when the frozen backbone has no backward pass.
  finetune_mixed6  fine-tuning from mixed6 with BatchNorm in inference mode (config.finetune
                   defaults).
  finetune_all     every layer trainable, BatchNorm on batch statistics: what Keras does with
                   every layer trainable, the case to compare with keras_reference.py.
  finetune_all_bn_frozen  every layer trainable, BatchNorm in inference mode.
  warmup_cached    the warm-up step on cached backbone features (config.speed.cache_features,
                   which training uses when augmentation is off): the head alone, its batch
                   gathered on the device from the features of --cache_examples images.

    python benchmarks/train_step.py                       # default cases
    python benchmarks/train_step.py --cases=warmup --set speed.fold_bn=off
    python benchmarks/train_step.py --families=vgg16,resnet50,xception,inception_v3

--families: per backbone family, the whole backbone (cut at its last endpoint) with the seed's
head on global average pooling (GAP -> Dense(1024, relu) -> Dropout(0.2) -> Dense(1)) at a
real size (Keras's default input: 224 px, Xception and InceptionV3 299 px; or
--family_image_size), cases warmup and finetune_all, each timed here and, in the same run, in
Keras 3 with its TensorFlow and JAX backends (benchmarks/keras_reference.py's children on the
same model); each record's 'row' is '<family> <case>', which table.py shows.

Each case runs in its own process (its compile time and peak memory are its own) and prints
one JSON line: images/s (median over repeats), compile seconds (trace + lower + compile of the
step function), peak memory, and the step's float32 arithmetic per image (XLA's count for the
model without the speed rewrites, so comparable across frameworks). One more line gives the
machine's float32 matmul rate.
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # pylint: disable=g-import-not-at-top

# JAX and hhjax are imported inside the functions a child process runs: the parent only
# launches the children, each under its own environment (allocator settings, XLA flags), and
# must not initialise JAX itself.

# case -> (phase name, config overrides)
CASES = {
    'warmup': ('warmup', {}),
    # The inference forward of the warm-up's model (no gradients, no update): what a warm-up
    # step costs beyond it is the head's backward pass and its optimizer update.
    'forward': ('warmup', {}),
    'warmup_cached': ('warmup', {}),
    'finetune_mixed6': ('finetune', {'finetune.unfreeze_from': 'mixed6',
                                     'finetune.train_bn': False}),
    'finetune_all': ('finetune', {'finetune.unfreeze_from': 'stem', 'finetune.train_bn': True}),
    'finetune_all_bn_frozen': ('finetune', {'finetune.unfreeze_from': 'stem',
                                            'finetune.train_bn': False}),
}
DEFAULT_CASES = ('warmup', 'finetune_mixed6', 'finetune_all', 'warmup_cached')
CACHED = ('warmup_cached',)

# --families: the cases timed against both Kerases, and each family's real input size.
FAMILY_CASES = ('warmup', 'finetune_all')
DEFAULT_FAMILY_SIZE = 224
FAMILY_SIZES = {'xception': 299, 'inception_v3': 299}


def _parse_value(text: str):
  low = text.lower()
  if low in ('none', 'null'):
    return None
  if low in ('true', 'false'):
    return low == 'true'
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      continue   # not this type: try the next, else keep the string
  return text


def _set(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def make_config(case: str, batch_size: int, image_size: int, overrides: list[str]):
  """configs/default.py with random init, fake data and the case's phase settings."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.pretrained = None
  config.data.source = 'fake'
  config.data.augment.enabled = False
  config.batch_size = batch_size
  config.data.image_size = image_size
  config.warmup.epochs = 1
  config.finetune.epochs = 1
  for key, value in CASES[case][1].items():
    _set(config, key, value)
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise SystemExit(f'--set expects key=value (e.g. speed.fold_bn=off); found {item!r}.')
    _set(config, key, _parse_value(value))
  return config


def family_overrides(name: str) -> list[str]:
  """--set overrides for a family's whole backbone with the seed's head on GAP (fine-tuning
  from 'stem': every block, whichever the family's first)."""
  from hhjax.model import backbones  # pylint: disable=g-import-not-at-top
  declared = backbones.get(name)
  return [f'model.backbone={name}', f'model.cut={declared.endpoints[-1]}', 'model.head=gap',
          f'data.preprocessing={declared.preprocessing}', 'finetune.unfreeze_from=stem']


def _keras_reference():
  """benchmarks/keras_reference.py, loaded by its path (tests have a module of that name)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'keras_reference.py')
  spec = importlib.util.spec_from_file_location('benchmarks_keras_reference', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def child_argv(case: str, args: argparse.Namespace, image_size: int,
               overrides: list[str]) -> list[str]:
  """The command line of one of our cases' child."""
  argv = [os.path.abspath(__file__), '--child', f'--case={case}',
          f'--batch_size={args.batch_size}', f'--image_size={image_size}',
          f'--repeats={args.repeats}', f'--warmup_steps={args.warmup_steps}',
          f'--image_dtype={args.image_dtype}', f'--cache_examples={args.cache_examples}']
  argv += [f'--set={s}' for s in overrides]
  if args.no_flops:
    argv.append('--no_flops')
  return argv


def child_env(args: argparse.Namespace) -> dict[str, str]:
  return {'TF_CPP_MIN_LOG_LEVEL': '2', **common.malloc_env(args.malloc_tuning)}


def family_children(args: argparse.Namespace, families: list[str]
                    ) -> list[tuple[str, str, list[str], dict[str, str]]]:
  """(row, framework, argv, env) of every child a --families run starts, in order: per
  family and case, ours, then Keras-TF and Keras-JAX on the same model."""
  from hhjax.model import backbones  # pylint: disable=g-import-not-at-top
  keras_reference = _keras_reference()
  children = []
  for name in families:
    declared = backbones.get(name)
    size = args.family_image_size or FAMILY_SIZES.get(name, DEFAULT_FAMILY_SIZE)
    for case in FAMILY_CASES:
      row = f'{name} {case}'
      children.append((row, 'hhjax', child_argv(case, args, size, family_overrides(name) +
                                                (args.set or [])), child_env(args)))
      for backend in keras_reference.BACKENDS:
        argv = keras_reference.child_argv(backend, case, args, application=declared.keras_name,
                                          cut='', head='gap', image_size=size)
        children.append((row, f'keras-{backend}', argv,
                         keras_reference.child_env(backend, args.malloc_tuning)))
  return children


def _flops_per_image(case: str, config, state, batch, extra,
                     overrides: list[str]) -> float | None:
  """XLA's float op count of the case's step for the plain model (speed rewrites off).

  The speed rewrites keep the parameter tree, so the plain step lowers on the same state.
  """
  import jax
  plain = make_config(case, int(config.batch_size), int(config.data.image_size), overrides)
  for key in ('fast_convs', 'fold_bn', 'merge_1x1', 'fast_pools'):
    if key in plain.get('speed', {}):
      plain.speed[key] = 'off'
  step = build_step(plain, case)[0]
  try:
    cost = jax.jit(step).lower(state, batch, *extra).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return None if flops is None else flops / int(config.batch_size)


def build_step(config, case: str):
  """(train step, not jitted; model; parameter labels; optimizer) for the case.

  The step is `(state, batch) -> state`, or `(state, batch, features) -> state` for the
  cached case, whose batch holds indices into `features`.
  """
  import jax.numpy as jnp
  from hhjax import entry  # pylint: disable=g-import-not-at-top
  from hhjax.training import feature_cache  # pylint: disable=g-import-not-at-top
  from hhjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from hhjax.training import steps  # pylint: disable=g-import-not-at-top
  model = entry.model(config, 2)
  phase = next(p for p in entry.phases(config) if p.name == CASES[case][0])
  params = state_lib.abstract_variables(model, config.data.image_size)['params']
  setup = entry.setup_for(config)(phase, params)
  if case == 'forward':
    def forward(state, batch):
      logits = model.apply({'params': state['params'], 'batch_stats': state['batch_stats']},
                           batch['image'], train=False)
      # The logits feed the state, so the forward pass cannot be left out.
      return {**state, 'metrics': {**state['metrics'],
                                   'loss_sum': state['metrics']['loss_sum'] + jnp.sum(logits)}}
    return forward, model, setup.labels, setup.tx
  if case not in CACHED:
    return steps.make_train_step(model, setup), model, setup.labels, setup.tx
  # The step training runs on cached features (FeatureCache.train_step), unjitted.
  on_features = steps.make_train_step(feature_cache.HeadOnFeatures(model), setup)
  return feature_cache.gather_step(on_features), model, setup.labels, setup.tx


def build(config, case: str, image_dtype: str = 'float32', cache_examples: int = 1027):
  """(jitted step, state, batch, extra step arguments, trainable count, model).

  The step is jitted as the training loop jits it: state replicated and donated, batch sharded.
  """
  import jax
  import jax.numpy as jnp
  from hhjax import sharding  # pylint: disable=g-import-not-at-top
  from hhjax.training import feature_cache  # pylint: disable=g-import-not-at-top
  from hhjax.training import optim  # pylint: disable=g-import-not-at-top
  from hhjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  step, model, labels, tx = build_step(config, case)
  variables = jax.jit(
      lambda: state_lib.init_variables(model, config.data.image_size, config.seed),
      out_shardings=repl)()
  state = jax.jit(lambda v: state_lib.build_state(v, tx, config.seed),
                  out_shardings=repl)(variables)
  b, s = int(config.batch_size), int(config.data.image_size)
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  labels_ = jax.random.bernoulli(ky, 0.5, (b,)).astype(jnp.int32)
  extra = ()
  if case in CACHED:
    shape = feature_cache.feature_shape(model, s)
    features = jax.jit(lambda k: jax.nn.relu(jax.random.normal(
        k, (cache_examples,) + shape.shape[1:], shape.dtype)), out_shardings=repl)(kx)
    batch = {'index': jax.random.randint(kx, (b,), 0, cache_examples, jnp.int32),
             'label': labels_}
    extra = (features,)
    in_shardings = (repl, data, repl)
  else:
    if image_dtype == 'uint8':   # pixels: the model normalises them on the device
      images = jax.random.randint(kx, (b, s, s, 3), 0, 256, jnp.int32).astype(jnp.uint8)
    else:
      images = jax.random.uniform(kx, (b, s, s, 3), jnp.float32, -1.0, 1.0)
    batch = {'image': images, 'label': labels_}
    in_shardings = (repl, data)
  batch = jax.device_put(batch, data)
  step = jax.jit(step, in_shardings=in_shardings, out_shardings=repl, donate_argnums=0)
  n_trainable = optim.count(optim.split(variables['params'], labels)[0])
  return step, state, batch, extra, n_trainable, model


def child(args: argparse.Namespace) -> None:
  import jax
  import jax.numpy as jnp
  overrides = args.set or []
  config = make_config(args.case, args.batch_size, args.image_size, overrides)
  t0 = time.perf_counter()
  step, state, batch, extra, n_trainable, model = build(
      config, args.case, args.image_dtype, args.cache_examples)
  setup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered = step.lower(state, batch, *extra)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_only_s = time.perf_counter() - t0

  holder = {'state': state}

  def run_one():
    holder['state'] = compiled(holder['state'], batch, *extra)
    jax.block_until_ready(holder['state']['step'])

  run_one()
  timing = common.time_steps(run_one, images_per_step=args.batch_size,
                             warmup_steps=args.warmup_steps, repeats=args.repeats)
  speed = dict(config.speed) if 'speed' in config else {}
  record = {
      'bench': 'train_step',
      'framework': 'hhjax',
      'case': args.case,
      **timing,
      'compile_s': lower_s + compile_only_s,
      'lower_s': lower_s,
      'xla_compile_s': compile_only_s,
      'setup_s': setup_s,
      'peak_host_mem_mb': common.host_peak_memory_mb(),
      'peak_device_mem_mb': common.jax_device_peak_memory_mb(),
      'batch_size': args.batch_size,
      'image_size': args.image_size,
      'trainable_params': int(n_trainable),
      'speed': speed,
      'lowering': dataclasses.asdict(model.lowering) if hasattr(model, 'lowering') else None,
      'compute_dtype': jnp.dtype(getattr(model, 'dtype', None) or jnp.float32).name,
      'image_dtype': args.image_dtype if args.case not in CACHED else None,
      'cache_examples': args.cache_examples if args.case in CACHED else None,
      'overrides': overrides,
      'device': common.jax_device(),
      'devices': jax.device_count(),
      'jax': jax.__version__,
      **common.machine(),
  }
  if not args.no_flops:
    flops = _flops_per_image(args.case, config, holder['state'], batch, extra, overrides)
    record['gflop_per_image'] = None if flops is None else flops / 1e9
  common.emit(record)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cases', default=','.join(DEFAULT_CASES),
                      help=f'comma-separated, from {list(CASES)}')
  common.add_run_flags(parser)
  parser.add_argument('--warmup_steps', type=int, default=2)
  parser.add_argument('--image_dtype', default='float32', choices=('float32', 'uint8'),
                      help='uint8: batches as pixels, normalised by the model on the device')
  parser.add_argument('--cache_examples', type=int, default=1027,
                      help='training images in the feature cache (warmup_cached)')
  parser.add_argument('--set', action='append', metavar='KEY=VALUE',
                      help='config override, e.g. speed.fold_bn=off (repeatable)')
  parser.add_argument('--no_matmul', action='store_true', help='skip the matmul rate')
  parser.add_argument('--no_flops', action='store_true', help='skip the op count')
  parser.add_argument('--families', default='',
                      help='comma-separated config.model.backbone names: time each whole '
                      'backbone here and in both Kerases (see above) instead of --cases')
  parser.add_argument('--family_image_size', type=int, default=0,
                      help='--families input size (0: each family\'s real size)')
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return

  if args.families:
    from hhjax.model import backbones  # pylint: disable=g-import-not-at-top
    children = family_children(
        args, common.choose(parser, args.families, backbones.NAMES, 'family'))
  else:
    children = [(case, 'hhjax', child_argv(case, args, args.image_size, args.set or []),
                 child_env(args))
                for case in common.choose(parser, args.cases, list(CASES), 'case')]
  if not args.no_matmul:
    common.emit(common.measure_matmul_in_child(common.malloc_env(args.malloc_tuning)))
  for row, framework, argv, env in children:
    case = next(a for a in argv if a.startswith('--case=')).split('=', 1)[1]
    for record in common.run_child(argv, env=env):
      record.setdefault('framework', framework)
      record.setdefault('case', case)
      if args.families:
        record['row'] = row
      common.emit(record)


if __name__ == '__main__':
  main()
