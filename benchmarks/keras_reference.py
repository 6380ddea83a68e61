"""The seed's Keras model and recipe, timed as benchmarks/train_step.py times ours.

The seed: InceptionV3 (weights=None here: the numbers do not depend on the weights) cut at
mixed7 -> Flatten -> Dense(1024, relu) -> Dropout(0.2) -> Dense(1, sigmoid), RMSprop 1e-4,
binary cross-entropy, batch 20 at 150x150. `train_on_batch` on in-memory batches already
converted to the backend's tensors, after warm-up steps. Cases:

  warmup        the backbone frozen (every backbone layer trainable=False, as the seed does,
                so its BatchNorms run in inference mode); only the head trains.
  finetune_all  every layer trainable (BatchNorms on batch statistics, as Keras does for a
                trainable BatchNormalization).

Backends: Keras 3 with TensorFlow and with JAX. A Keras backend is fixed at import, so each
(backend, case) runs in its own process; that also keeps each case's peak memory its own.

    python benchmarks/keras_reference.py                   # both backends, both cases
    python benchmarks/keras_reference.py --backends=jax --cases=warmup --repeats=3
    python benchmarks/keras_reference.py --application=ResNet50 --cut= --head=gap \
        --image_size=224                                   # another backbone, all of it

`benchmarks/train_step.py --families=...` runs this script's cases beside its own, per family.

Prints one JSON line per case (images/s median over repeats, first-step seconds = trace +
compile + one step, peak memory) and one for the machine's float32 matmul rate.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top

BACKENDS = ('tensorflow', 'jax')
CASES = ('warmup', 'finetune_all')


def build_seed_model(image_size: int, case: str, jit_compile: str | bool = 'auto',
                     application: str = 'InceptionV3', cut: str = 'mixed7',
                     head: str = 'flatten'):
  """The seed's model (or `application` cut at the layer `cut`, '' for all of it, with the
  seed's head on `head` pooling), compiled with its optimizer and loss."""
  import keras
  base = getattr(keras.applications, application)(
      include_top=False, weights=None, input_shape=(image_size, image_size, 3))
  if case == 'warmup':
    for layer in base.layers:
      layer.trainable = False
  features = base.get_layer(cut).output if cut else base.output
  pool = keras.layers.Flatten() if head == 'flatten' else keras.layers.GlobalAveragePooling2D()
  x = pool(features)
  x = keras.layers.Dense(1024, activation='relu')(x)
  x = keras.layers.Dropout(0.2)(x)
  x = keras.layers.Dense(1, activation='sigmoid')(x)
  model = keras.Model(base.input, x)
  model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=1e-4),
                loss='binary_crossentropy', metrics=['accuracy'], jit_compile=jit_compile)
  return model


def add_model_flags(parser) -> None:
  parser.add_argument('--application', default='InceptionV3',
                      help='the keras.applications model (the seed: InceptionV3)')
  parser.add_argument('--cut', default='mixed7',
                      help="the layer the head reads ('' : the whole backbone)")
  parser.add_argument('--head', default='flatten', choices=('flatten', 'gap'))


def child_argv(backend: str, case: str, args: argparse.Namespace, *, application: str,
               cut: str, head: str, image_size: int) -> list[str]:
  """The command line of one (backend, case) child."""
  return [os.path.abspath(__file__), '--child', f'--backend={backend}', f'--case={case}',
          f'--batch_size={args.batch_size}', f'--image_size={image_size}',
          f'--repeats={args.repeats}', f'--warmup_steps={args.warmup_steps}',
          f'--jit_compile={getattr(args, "jit_compile", "auto")}',
          f'--application={application}', f'--cut={cut}', f'--head={head}']


def child_env(backend: str, malloc_tuning: str) -> dict[str, str]:
  # TF_CPP_MIN_LOG_LEVEL keeps TensorFlow's start-up chatter off stderr.
  return {'KERAS_BACKEND': backend, 'TF_CPP_MIN_LOG_LEVEL': '2',
          **common.malloc_env(malloc_tuning)}


def _device_and_peak(backend: str) -> tuple[str, float | None]:
  """The device Keras computes on and its peak memory in MiB (None where not reported)."""
  if backend == 'jax':
    return common.jax_device(), common.jax_device_peak_memory_mb()
  import tensorflow as tf
  gpus = tf.config.list_logical_devices('GPU')
  if not gpus:
    return 'cpu', None
  info = tf.config.experimental.get_memory_info(gpus[0].name)
  return 'gpu', info['peak'] / 2**20


def child(args: argparse.Namespace) -> None:
  """One (backend, case) in this process; KERAS_BACKEND was set by the parent."""
  import keras
  import numpy as np
  backend = keras.backend.backend()
  if backend != args.backend:
    raise SystemExit(f'expected Keras backend {args.backend!r}, found {backend!r}: set '
                     'KERAS_BACKEND before importing keras.')
  keras.utils.set_random_seed(0)
  jit_compile = {'auto': 'auto', 'true': True, 'false': False}[args.jit_compile]
  model = build_seed_model(args.image_size, args.case, jit_compile, args.application,
                           args.cut, args.head)
  rng = np.random.default_rng(0)
  b, s = args.batch_size, args.image_size
  x = keras.ops.convert_to_tensor(rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32))
  y = keras.ops.convert_to_tensor(rng.integers(0, 2, (b, 1)).astype(np.float32))

  t0 = time.perf_counter()
  model.train_on_batch(x, y)   # returns Python floats: it waits for the step.
  first_step_s = time.perf_counter() - t0
  timing = common.time_steps(lambda: model.train_on_batch(x, y), images_per_step=b,
                             warmup_steps=args.warmup_steps, repeats=args.repeats)
  device, device_peak = _device_and_peak(backend)
  backend_module = __import__(backend)
  common.emit({
      'bench': 'keras_reference',
      'framework': f'keras-{backend}',
      'case': args.case,
      **timing,
      'compile_s': first_step_s,
      'peak_host_mem_mb': common.host_peak_memory_mb(),
      'peak_device_mem_mb': device_peak,
      'batch_size': b,
      'image_size': s,
      'trainable_params': int(sum(np.prod(w.shape) for w in model.trainable_weights)),
      'jit_compile': bool(model.jit_compile),
      'application': args.application,
      'cut': args.cut,
      'head': args.head,
      'device': device,
      'keras': keras.__version__,
      backend: backend_module.__version__,
      **common.machine(),
  })


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--backends', default=','.join(BACKENDS))
  parser.add_argument('--cases', default=','.join(CASES))
  common.add_run_flags(parser)
  parser.add_argument('--warmup_steps', type=int, default=2)
  parser.add_argument('--jit_compile', default='auto', choices=('auto', 'true', 'false'),
                      help="model.compile(jit_compile=...); 'auto' is Keras's default, "
                      'what the seed ran')
  add_model_flags(parser)
  parser.add_argument('--no_matmul', action='store_true', help='skip the matmul rate')
  parser.add_argument('--backend', help=argparse.SUPPRESS)
  parser.add_argument('--case', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return

  backends = common.choose(parser, args.backends, BACKENDS, 'backend')
  cases = common.choose(parser, args.cases, CASES, 'case')
  if not args.no_matmul:
    common.emit(common.measure_matmul_in_child(common.malloc_env(args.malloc_tuning)))
  for backend in backends:
    for case in cases:
      argv = child_argv(backend, case, args, application=args.application, cut=args.cut,
                        head=args.head, image_size=args.image_size)
      for record in common.run_child(argv, env=child_env(backend, args.malloc_tuning)):
        record.setdefault('framework', f'keras-{backend}')
        record.setdefault('case', case)
        common.emit(record)


if __name__ == '__main__':
  main()
