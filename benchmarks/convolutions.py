"""Each convolution of the seed's backbone, timed alone: XLA (our lowering) against TensorFlow.

Where does a train step's time go, and which convolutions does TensorFlow's oneDNN run
faster than XLA? This takes every Conv2D of Keras's InceptionV3 up to mixed7 (its input
shape, kernel, stride, padding at --image_size), and times conv + bias + ReLU at --batch_size
in a jitted JAX function (`hhjax.fast_convs.conv_general_dilated`, the lowering the model uses
on CPU, or plain `lax.conv_general_dilated` with --lowering=plain) and in a `tf.function`
(oneDNN on CPU), each framework in its own process. Prints one JSON line per convolution
and framework (median milliseconds over repeats, GFLOP/s) and a summary line per framework.

    python benchmarks/convolutions.py                      # forward, batch 20, 150x150
    python benchmarks/convolutions.py --lowering=plain --frameworks=jax
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

FRAMEWORKS = ('jax', 'tensorflow')


def backbone_convolutions(image_size: int) -> list[dict]:
  """Keras InceptionV3's Conv2D layers up to mixed7, in Keras's layer order."""
  import keras  # pylint: disable=g-import-not-at-top
  model = keras.applications.InceptionV3(include_top=False, weights=None,
                                         input_shape=(image_size, image_size, 3))
  convs = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.Conv2D):
      convs.append({'name': layer.name, 'input': list(layer.input.shape[1:]),
                    'kernel': list(layer.kernel_size), 'filters': int(layer.filters),
                    'stride': int(layer.strides[0]), 'padding': layer.padding.upper()})
    if layer.name == 'mixed7':
      break
  return convs


def _output_hw(conv: dict) -> tuple[int, int]:
  (h, w, _), (kh, kw), s = conv['input'], conv['kernel'], conv['stride']
  if conv['padding'] == 'SAME':
    return -(-h // s), -(-w // s)
  return (h - kh) // s + 1, (w - kw) // s + 1


def gflop(conv: dict, batch: int) -> float:
  ho, wo = _output_hw(conv)
  kh, kw = conv['kernel']
  return 2.0 * batch * ho * wo * kh * kw * conv['input'][2] * conv['filters'] / 1e9


def _time_ms(fn, repeats: int) -> float:
  timing = common.time_steps(fn, images_per_step=1, warmup_steps=2, repeats=repeats,
                             min_repeat_s=0.1)
  return timing['step_ms']


def child(args: argparse.Namespace) -> None:
  import numpy as np  # pylint: disable=g-import-not-at-top
  convs = json.loads(args.convs)
  rng = np.random.default_rng(0)
  if args.framework == 'jax':
    import jax  # pylint: disable=g-import-not-at-top
    from jax import lax  # pylint: disable=g-import-not-at-top
    from hhjax.model import fast_convs  # pylint: disable=g-import-not-at-top
    conv_fn = (fast_convs.conv_general_dilated if args.lowering == 'fast'
               else lax.conv_general_dilated)

    def build(conv, x, k, b):
      s = conv['stride']
      f = jax.jit(lambda x, k, b: jax.nn.relu(conv_fn(
          x, k, (s, s), conv['padding'], dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b))
      return lambda: f(x, k, b).block_until_ready()
    to_tensor = jax.numpy.asarray
    version = jax.__version__
  else:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def build(conv, x, k, b):
      s = conv['stride']
      f = tf.function(lambda x, k, b: tf.nn.relu(tf.nn.bias_add(
          tf.nn.conv2d(x, k, s, conv['padding']), b)))
      return lambda: f(x, k, b).numpy()
    to_tensor = tf.constant
    version = tf.__version__
  total_ms, total_gflop = 0.0, 0.0
  for conv in convs:
    kh, kw = conv['kernel']
    x = to_tensor(rng.uniform(-1, 1, [args.batch_size, *conv['input']]).astype(np.float32))
    k = to_tensor((rng.standard_normal((kh, kw, conv['input'][2], conv['filters'])) * 0.1)
                  .astype(np.float32))
    b = to_tensor(np.zeros(conv['filters'], np.float32))
    ms = _time_ms(build(conv, x, k, b), args.repeats)
    g = gflop(conv, args.batch_size)
    total_ms += ms
    total_gflop += g
    common.emit({'bench': 'convolutions', 'framework': args.framework, **conv, 'ms': ms,
                 'gflops': g / ms * 1e3, 'lowering': args.lowering})
  common.emit({'bench': 'convolutions', 'framework': args.framework, 'name': 'total',
               'ms': total_ms, 'gflops': total_gflop / total_ms * 1e3,
               'convolutions': len(convs), 'lowering': args.lowering, 'version': version,
               'batch_size': args.batch_size, **common.machine()})


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--frameworks', default=','.join(FRAMEWORKS))
  common.add_run_flags(parser)
  parser.add_argument('--lowering', default='fast', choices=('fast', 'plain'),
                      help='JAX: fast_convs.conv_general_dilated (the model on CPU) or lax')
  parser.add_argument('--framework', help=argparse.SUPPRESS)
  parser.add_argument('--convs', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(args)
    return
  frameworks = common.choose(parser, args.frameworks, FRAMEWORKS, 'framework')
  convs = backbone_convolutions(args.image_size)
  env = {'TF_CPP_MIN_LOG_LEVEL': '2', 'KERAS_BACKEND': 'tensorflow',
         **common.malloc_env(args.malloc_tuning)}
  for framework in frameworks:
    argv = [os.path.abspath(__file__), '--child', f'--framework={framework}',
            f'--batch_size={args.batch_size}', f'--repeats={args.repeats}',
            f'--lowering={args.lowering}', f'--convs={json.dumps(convs)}']
    for record in common.run_child(argv, env=env):
      common.emit(record)


if __name__ == '__main__':
  main()
