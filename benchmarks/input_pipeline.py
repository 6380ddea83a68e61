"""Throughput of the training input pipeline: images per second and host CPU-seconds per image.

Measures `create_dataset(config, 'train')` as training consumes it (decode, resize, Keras
augmentation, normalise, batch) on the real image folder, when present, with and without
config.data.cache_decoded, and on synthetic images ('fake', no decoding), with one tf.data
thread and with all cores; with the augmentation on the host (config.data.augment.on='host':
the warp in tf.data) and on the device ('device': the host only decodes, draws the parameters
and ships uint8 pixels; the warp's own cost is then the train step's). The CPU-seconds are the
process's user + system time over the timed batches, divided by their images. Prints numbers,
asserts nothing; run it on a quiet machine.

    python benchmarks/input_pipeline.py
    python benchmarks/input_pipeline.py --sources=folder --threads=1,2 --steps=100
    python benchmarks/input_pipeline.py --augment_on=host,device --cache_decoded=off,on
"""

import argparse
import os
import pathlib
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from hhjax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from hhjax.data import spec  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_DATA = ROOT.parent / 'shared' / 'data' / 'horse-or-human'


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default=os.environ.get('HHJAX_SHARED_DATA', str(DEFAULT_DATA)),
                      help='image folder <split>/<class>/<image> (skipped when absent)')
  parser.add_argument('--sources', default='folder,fake', help='comma-separated: folder, fake')
  parser.add_argument('--threads', default=f'1,{os.cpu_count()}',
                      help='comma-separated tf.data thread counts (num_parallel_calls and the '
                      'private thread pool)')
  parser.add_argument('--augment', default='on', help="comma-separated: 'on', 'off'")
  parser.add_argument('--augment_on', default='host,device',
                      help="comma-separated: 'host', 'device' (config.data.augment.on)")
  parser.add_argument('--cache_decoded', default='off,on',
                      help="comma-separated: 'off', 'on' (config.data.cache_decoded; folder only)")
  parser.add_argument('--batch_size', type=int, default=20)
  parser.add_argument('--image_size', type=int, default=150)
  parser.add_argument('--warmup_steps', type=int, default=5)
  parser.add_argument('--steps', type=int, default=50, help='timed batches per measurement')
  return parser.parse_args(argv)


def _spec(args, source: str, threads: int | None, augment: bool,
          cache: bool = False, on: str = 'host') -> spec.DataSpec:
  config = default.get_config()
  config.data.augment.on = on
  config.batch_size = args.batch_size
  config.data.image_size = args.image_size
  config.data.num_parallel_calls = threads
  config.data.augment.enabled = augment
  config.data.cache_decoded = cache
  config.data.source = source
  if source == 'folder':
    config.data.dir = args.data_dir
    config.data.validation_split, config.data.test_split = 'validation', None
  else:
    config.data.fake.num_train_examples = 1024
  return spec.DataSpec.from_config(config)


def _measure(data: spec.DataSpec, args) -> tuple[float, float]:
  """(images/s, host CPU-seconds per image) over the timed batches."""
  ds = pipeline.create_dataset(data, data.train_split, process_index=0, process_count=1)
  batches = ds.as_numpy_iterator()
  for _ in range(args.warmup_steps):
    next(batches)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(args.steps):
    next(batches)
  images = args.steps * args.batch_size
  return (images / (time.perf_counter() - start),
          (time.process_time() - cpu_start) / images)


def main(argv=None):
  args = _parse_args(argv)
  sources = args.sources.split(',')
  if 'folder' in sources and not os.path.isdir(os.path.join(args.data_dir, 'train')):
    print(f'No image folder at {args.data_dir}: measuring fake only.')
    sources.remove('folder')
  print(f'{os.cpu_count()} CPUs, batch {args.batch_size}, {args.image_size}x{args.image_size}, '
        f'{args.steps} timed batches after {args.warmup_steps}')
  if 'folder' in sources:
    start = time.perf_counter()
    info = pipeline.dataset_info(_spec(args, 'folder', None, True))
    print(f'folder check (decode every file once): {sum(info.num_examples.values())} files in '
          f'{time.perf_counter() - start:.1f} s')
  print(f'{"source":8} {"augment":8} {"on":7} {"cached":7} {"threads":>7} {"images/s":>9} '
        f'{"CPU ms/img":>10}')
  for source in sources:
    for augment in args.augment.split(','):
      for on in args.augment_on.split(',') if augment == 'on' else ['host']:
        for cache in args.cache_decoded.split(',') if source == 'folder' else ['off']:
          for threads in (int(t) for t in args.threads.split(',')):
            data = _spec(args, source, threads, augment == 'on', cache == 'on', on)
            rate, cpu = _measure(data, args)
            print(f'{source:8} {augment:8} {on:7} {cache:7} {threads:7d} {rate:9.0f} '
                  f'{cpu * 1e3:10.2f}', flush=True)


if __name__ == '__main__':
  main()
