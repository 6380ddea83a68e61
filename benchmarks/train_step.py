"""Times hhjax's jitted train step, the counterpart of benchmarks/keras_reference.py.

The seed's model (InceptionV3 cut at mixed7, random weights -> Flatten -> Dense(1024, relu) ->
Dropout(0.2) -> Dense(1)), batch 20 at 150x150, RMSprop, on synthetic data already on the
device; the step is the one training runs (`hhjax.train.make_train_step`, jitted with the
same shardings and donation), timed after compilation. Cases:

  warmup           backbone frozen, only the head differentiated (config.warmup).
  finetune_mixed6  fine-tuning from mixed6 with BatchNorm in inference mode (config.finetune
                   defaults).
  finetune_all     every layer trainable, BatchNorm on batch statistics: what Keras does with
                   every layer trainable, the case to compare with keras_reference.py.
  finetune_all_bn_frozen  every layer trainable, BatchNorm in inference mode.

    python benchmarks/train_step.py                       # default cases
    python benchmarks/train_step.py --cases=warmup --set speed.fold_bn=off

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

# case -> (phase name, config overrides)
CASES = {
    'warmup': ('warmup', {}),
    'finetune_mixed6': ('finetune', {'finetune.unfreeze_from': 'mixed6',
                                     'finetune.train_bn': False}),
    'finetune_all': ('finetune', {'finetune.unfreeze_from': 'stem', 'finetune.train_bn': True}),
    'finetune_all_bn_frozen': ('finetune', {'finetune.unfreeze_from': 'stem',
                                            'finetune.train_bn': False}),
}
DEFAULT_CASES = ('warmup', 'finetune_mixed6', 'finetune_all')


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
      pass
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


def _flops_per_image(case: str, config, state, batch) -> float | None:
  """XLA's float op count of the case's step for the plain model (speed rewrites off).

  The speed rewrites keep the parameter tree, so the plain step lowers on the same state.
  """
  import jax
  plain = make_config(case, int(config.batch_size), int(config.data.image_size), [])
  for key in ('fast_convs', 'fold_bn', 'merge_1x1'):
    if key in plain.get('speed', {}):
      plain.speed[key] = 'off'
  step = build_step(plain, case)[0]
  try:
    cost = jax.jit(step).lower(state, batch).cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return None if flops is None else flops / int(config.batch_size)


def build_step(config, case: str):
  """(train step, not jitted; model; parameter labels; optimizer) for the case."""
  import jax
  from hhjax import models, optim, train  # pylint: disable=g-import-not-at-top
  model = models.create_model(config, num_classes=2)
  phase = next(p for p in train.make_phases(config) if p.name == CASES[case][0])
  abstract = jax.eval_shape(lambda: train.init_variables(model, config))
  labels = optim.param_labels(abstract['params'], phase.rules)
  tx = train.make_optimizer(config, phase, labels)
  return train.make_train_step(model, phase, labels, tx), model, labels, tx


def build(config, case: str):
  """(jitted step, state, batch, trainable parameter count, model), as train.py jits it."""
  import jax
  import jax.numpy as jnp
  from hhjax import optim, sharding, train  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
  step, model, labels, tx = build_step(config, case)
  variables = jax.jit(lambda: train.init_variables(model, config), out_shardings=repl)()
  state = jax.jit(lambda v: train.build_state(v, tx, config.seed), out_shardings=repl)(variables)
  b, s = int(config.batch_size), int(config.data.image_size)
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  batch = {'image': jax.random.uniform(kx, (b, s, s, 3), jnp.float32, -1.0, 1.0),
           'label': jax.random.bernoulli(ky, 0.5, (b,)).astype(jnp.int32)}
  batch = jax.device_put(batch, data)
  step = jax.jit(step, in_shardings=(repl, data), out_shardings=repl, donate_argnums=0)
  n_trainable = optim.count(optim.split(variables['params'], labels)[0])
  return step, state, batch, n_trainable, model


def child(args: argparse.Namespace) -> None:
  import jax
  import jax.numpy as jnp
  overrides = args.set or []
  config = make_config(args.case, args.batch_size, args.image_size, overrides)
  t0 = time.perf_counter()
  step, state, batch, n_trainable, model = build(config, args.case)
  setup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_only_s = time.perf_counter() - t0

  holder = {'state': state}

  def run_one():
    holder['state'] = compiled(holder['state'], batch)
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
      'overrides': overrides,
      'device': common.jax_device(),
      'devices': jax.device_count(),
      'jax': jax.__version__,
      **common.machine(),
  }
  if not args.no_flops:
    flops = _flops_per_image(args.case, config, holder['state'], batch)
    record['gflop_per_image'] = None if flops is None else flops / 1e9
  common.emit(record)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cases', default=','.join(DEFAULT_CASES),
                      help=f'comma-separated, from {list(CASES)}')
  parser.add_argument('--batch_size', type=int, default=20)
  parser.add_argument('--image_size', type=int, default=150)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--warmup_steps', type=int, default=2)
  parser.add_argument('--set', action='append', metavar='KEY=VALUE',
                      help='config override, e.g. speed.fold_bn=off (repeatable)')
  parser.add_argument('--no_matmul', action='store_true', help='skip the matmul rate')
  parser.add_argument('--no_flops', action='store_true', help='skip the op count')
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return

  cases = [c for c in args.cases.split(',') if c]
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    parser.error(f'unknown case(s) {unknown}; choose from {list(CASES)}.')
  if not args.no_matmul:
    common.emit(common.measure_matmul_in_child())
  for case in cases:
    argv = [os.path.abspath(__file__), '--child', f'--case={case}',
            f'--batch_size={args.batch_size}', f'--image_size={args.image_size}',
            f'--repeats={args.repeats}', f'--warmup_steps={args.warmup_steps}']
    argv += [f'--set={s}' for s in args.set or []]
    if args.no_flops:
      argv.append('--no_flops')
    for record in common.run_child(argv, env={'TF_CPP_MIN_LOG_LEVEL': '2'}):
      record.setdefault('framework', 'hhjax')
      record.setdefault('case', case)
      common.emit(record)


if __name__ == '__main__':
  main()
