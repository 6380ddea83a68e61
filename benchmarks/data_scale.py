"""Start-up time, memory and bytes read of the input pipeline as the dataset grows.

Generates, once, under --data_root (which also keeps each run's log in logs/): for each N an
image folder of N training and N/10 validation images (JPEG and PNG, 200-500 px, three classes,
a handful of bad files) and the same readable images as a TFDS dataset prepared on disk twice,
as TFRecord and as ArrayRecord.
Then measures, for each N, source and number of processes:

  start     `main.py` (configs/smoke.py on that data, so the model costs little) from launch to
            its first progress line, in a fresh workdir and again as a resume of it: seconds,
            CPU seconds (until it is stopped just after that line), peak resident memory and
            bytes read (`rchar` of /proc/PID/io) per process.
  pipeline  the training stream alone (`dataset_info`, then `create_dataset` as training
            consumes it): seconds to the first batch, steady images/s, bytes read per image.

Sources: 'folder', 'tfds' (the ArrayRecord copy), 'tfds_tfrecord' (the TFRecord copy) and
'fake' (synthetic images: the floor that does not depend on the data). With 2 processes they
run under jax.distributed over a loopback coordinator, one CPU device each. Prints JSON lines
and asserts nothing; the machine's load is in every record. --code measures other checkouts of
the code on the same data, back to back case by case (e.g. an older commit unpacked with
`git archive`).

    python benchmarks/data_scale.py --sizes=1000 --sources=folder,tfds --processes=1
    python benchmarks/data_scale.py --sizes=1000,10000,50000 > /tmp/after.jsonl
    python benchmarks/data_scale.py --code=before=/tmp/hhjax-before,after=. > /tmp/both.jsonl
    python benchmarks/data_scale.py --table /tmp/both.jsonl
"""

import argparse
import collections
import contextlib
import io
import json
import multiprocessing
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = pathlib.Path(__file__).resolve().parents[1]

CLASSES = ('bicycles', 'boats', 'trains')
SOURCES = ('folder', 'tfds', 'tfds_tfrecord', 'fake')
MEASURES = ('start', 'pipeline')
# Files that are not readable images, in every folder (a handful, whatever N).
BAD_FILES = {
    'train': ('empty.jpg', 'truncated.jpg', 'truncated.png', 'text.png', 'one_bit.bmp'),
    'validation': ('empty.png', 'truncated.jpg'),
}
# A progress line of the training loop (hhjax/training/loop.py).
PROGRESS = re.compile(r' step \d+/\d+  loss ')


def _parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_root', default='/tmp/hhjax-data-scale',
                      help='generated datasets, workdirs and the compilation cache (kept)')
  parser.add_argument('--sizes', default='1000,10000,50000',
                      help='comma-separated numbers of training images N')
  parser.add_argument('--sources', default=','.join(SOURCES),
                      help=f'comma-separated, of {SOURCES}')
  parser.add_argument('--processes', default='1,2', help="comma-separated: '1', '2'")
  parser.add_argument('--measures', default=','.join(MEASURES),
                      help=f'comma-separated, of {MEASURES}')
  parser.add_argument('--code', default=f'after={ROOT}',
                      help='comma-separated LABEL=PATH: the checkouts whose code is measured, '
                      'one after the other for each case (back to back)')
  parser.add_argument('--steps', type=int, default=30,
                      help='timed batches of 20 (150 px) per pipeline measurement')
  parser.add_argument('--warmup_steps', type=int, default=15,
                      help='batches before the timed ones: enough for a process to have opened '
                      "every ArrayRecord shard (the first read of one reads its ~1 MB index)")
  parser.add_argument('--timeout_s', type=float, default=1800,
                      help='a start measurement that takes longer is recorded as an error')
  parser.add_argument('--generate_only', action='store_true',
                      help='generate the datasets of --sizes and stop')
  parser.add_argument('--table', nargs='+', metavar='JSONL',
                      help='print the markdown table of these record files and stop')
  parser.add_argument('--child', choices=('pipeline',), help=argparse.SUPPRESS)
  parser.add_argument('--source', help=argparse.SUPPRESS)
  parser.add_argument('--n', type=int, help=argparse.SUPPRESS)
  parser.add_argument('--process_index', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--process_count', type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument('--repo', help=argparse.SUPPRESS)
  parser.add_argument('--label', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.code = [tuple(c.split('=', 1)) for c in args.code.split(',') if c]
  for name, valid in (('sources', SOURCES), ('measures', MEASURES), ('processes', ('1', '2'))):
    chosen = [x for x in getattr(args, name).split(',') if x]
    unknown = sorted(set(chosen) - set(valid))
    if unknown:
      parser.error(f'unknown --{name} {unknown}; choose from {list(valid)}.')
    setattr(args, name, chosen)
  args.sizes = [int(x) for x in args.sizes.split(',') if x]
  args.processes = [int(x) for x in args.processes]
  return args


def _cpu() -> dict:
  model = 'unknown'   # where /proc/cpuinfo is missing or names no model
  with contextlib.suppress(OSError, StopIteration), open('/proc/cpuinfo') as f:
    model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  return {'cpu': model, 'cpus': os.cpu_count(), 'load_avg_1m': round(os.getloadavg()[0], 2)}


def _emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


# ----------------------------------------------------------------------------- generation


def _image_bytes(seed: int) -> tuple[bytes, str]:
  """A smooth picture with a few shapes and mild noise; a quarter PNG, the rest JPEG."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  w, h = (int(x) for x in rng.integers(200, 501, 2))
  y, x = np.mgrid[0:h, 0:w]
  t = ((x / w + y / h) / 2)[..., None]
  base = rng.integers(0, 256, 3) * (1 - t) + rng.integers(0, 256, 3) * t
  image = Image.fromarray(base.astype(np.uint8))
  draw = ImageDraw.Draw(image)
  for _ in range(int(rng.integers(3, 9))):
    x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
    box = [x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))]
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
  noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 3, (h, w, 3)).astype(np.int16)
  image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
  buffer = io.BytesIO()
  if seed % 4 == 0:
    image.save(buffer, 'PNG')
    return buffer.getvalue(), 'png'
  image.save(buffer, 'JPEG', quality=int(rng.integers(80, 96)))
  return buffer.getvalue(), 'jpg'


def _write_image(task: tuple[str, int]) -> None:
  stem, seed = task
  data, ext = _image_bytes(seed)
  with open(f'{stem}.{ext}', 'wb') as f:
    f.write(data)


def _bad_bytes(name: str) -> bytes:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if name.startswith('empty'):
    return b''
  if name.startswith('text'):
    return b'not a picture\n'
  if name == 'one_bit.bmp':
    buffer = io.BytesIO()
    Image.fromarray(np.eye(40, dtype=bool)).save(buffer, 'BMP')
    return buffer.getvalue()
  seed = 0 if name.endswith('.png') else 1
  data, _ = _image_bytes(seed)
  return data[:len(data) // 3]


def _counts(n: int) -> dict[str, int]:
  return {'train': n, 'validation': max(len(CLASSES) * 2, n // 10)}


def make_folder(root: pathlib.Path, n: int) -> pathlib.Path:
  """root/folder_N/<split>/<class>/<image>, generated once (a marker file says it is whole)."""
  folder = root / f'folder_{n}'
  if (folder / '.complete').exists():
    return folder
  tasks = []
  for split, count in _counts(n).items():
    for c in CLASSES:
      (folder / split / c).mkdir(parents=True, exist_ok=True)
    offset = 0 if split == 'train' else 10**8
    for i in range(count):
      c = CLASSES[i % len(CLASSES)]
      tasks.append((str(folder / split / c / f'{i:06d}'), offset + i))
    for k, name in enumerate(BAD_FILES[split]):
      (folder / split / CLASSES[k % len(CLASSES)] / f'bad_{name}').write_bytes(_bad_bytes(name))
  start = time.perf_counter()
  with multiprocessing.Pool(os.cpu_count()) as pool:
    for done, _ in enumerate(pool.imap_unordered(_write_image, tasks, chunksize=64), 1):
      if done % 5000 == 0:
        print(f'  {folder}: {done}/{len(tasks)} images', file=sys.stderr, flush=True)
  (folder / '.complete').write_text(f'{len(tasks)} images in {time.perf_counter() - start:.0f} s\n')
  return folder


def tfds_name(n: int) -> str:
  return f'scale_images{n}'


_BUILDERS = {}


def _builder_class(n: int, folder: pathlib.Path):
  """A builder of our own, as a user would write one for their images (one class per N)."""
  if n in _BUILDERS:
    return _BUILDERS[n]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class ScaleImages(tfds.core.GeneratorBasedBuilder):
    """Generated images in three classes."""
    name = tfds_name(n)
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(),
          'label': tfds.features.ClassLabel(names=CLASSES)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(folder / split) for split in _counts(n)}

    def _generate_examples(self, split_dir):
      for c in CLASSES:
        for path in sorted((split_dir / c).iterdir()):
          if not path.name.startswith('bad_'):
            yield f'{c}/{path.name}', {'image': path, 'label': c}

  _BUILDERS[n] = ScaleImages
  return ScaleImages


def make_tfds(root: pathlib.Path, n: int, file_format: str) -> pathlib.Path:
  """The folder's readable images as a TFDS dataset prepared in root/tfds_N_FORMAT (a data_dir).

  main.py then finds the prepared dataset by its name in the data_dir, without this code.
  """
  data_dir = root / f'tfds_{n}_{file_format}'
  if (data_dir / '.complete').exists():
    return data_dir
  builder = _builder_class(n, make_folder(root, n))(data_dir=str(data_dir))
  start = time.perf_counter()
  builder.download_and_prepare(file_format=file_format)
  (data_dir / '.complete').write_text(f'prepared in {time.perf_counter() - start:.0f} s\n')
  return data_dir


def generate(root: pathlib.Path, n: int, sources: list[str]) -> None:
  for source in sources:
    start = time.perf_counter()
    if source == 'folder':
      path = make_folder(root, n)
    elif source.startswith('tfds'):
      path = make_tfds(root, n, 'tfrecord' if source == 'tfds_tfrecord' else 'array_record')
    else:
      continue
    print(f'{path}: ready ({time.perf_counter() - start:.0f} s)', file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _process_envs(count: int, root: pathlib.Path) -> list[dict[str, str]]:
  """One environment per process: jax.distributed over loopback when there are several."""
  base = {'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': str(root / 'jax_cache'),
          'HHJAX_CACHE_DIR': str(root / 'hhjax_cache')}
  if count == 1:
    return [base]
  address = f'127.0.0.1:{_free_port()}'
  return [dict(base, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(count),
               JAX_PROCESS_ID=str(i)) for i in range(count)]


def _io(pid: int) -> dict[str, float]:
  """Bytes this process read through system calls (rchar) and from storage (read_bytes)."""
  try:
    with open(f'/proc/{pid}/io') as f:
      fields = dict(line.split(': ') for line in f.read().splitlines())
  except OSError:
    return {}
  return {'rchar_mb': int(fields['rchar']) / 2**20,
          'storage_read_mb': int(fields['read_bytes']) / 2**20}


class _Child:
  """A process whose stderr lines are read as they come, with the time each arrived."""

  def __init__(self, argv: list[str], env: dict[str, str], cwd: str):
    self.start = time.perf_counter()
    self.proc = subprocess.Popen([sys.executable, *argv], env=dict(os.environ, **env), cwd=cwd,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self.lines: list[tuple[float, str]] = []
    self.stdout: list[str] = []
    self._threads = [threading.Thread(target=self._read, args=(s, l), daemon=True)
                     for s, l in ((self.proc.stderr, self.lines), (self.proc.stdout, None))]
    for t in self._threads:
      t.start()

  def _read(self, stream, lines):
    for line in stream:
      if lines is None:
        self.stdout.append(line)
      else:
        lines.append((time.perf_counter() - self.start, line.rstrip('\n')))

  def exited(self) -> bool:
    """Whether the process has ended; it is left to `stop` to reap (and read its rusage)."""
    info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None

  def wait(self, timeout_s: float) -> None:
    deadline = time.perf_counter() + timeout_s
    while not self.exited() and time.perf_counter() < deadline:
      time.sleep(0.2)

  def first(self, pattern: re.Pattern) -> float | None:
    return next((t for t, line in list(self.lines) if pattern.search(line)), None)

  def stop(self) -> dict[str, float]:
    """Kills the process (if still running); its bytes read and peak resident memory."""
    record = _io(self.proc.pid)
    if not self.exited():
      os.kill(self.proc.pid, signal.SIGKILL)
    _, status, usage = os.wait4(self.proc.pid, 0)
    self.proc.returncode = os.waitstatus_to_exitcode(status)
    for t in self._threads:
      t.join(timeout=5)
    record['peak_rss_mb'] = usage.ru_maxrss / 1024
    # CPU seconds of all its threads: what the start cost, less blurred by a busy machine.
    record['cpu_s'] = usage.ru_utime + usage.ru_stime
    return record

  def tail(self, n: int = 5) -> str:
    return ' | '.join(line for _, line in self.lines[-n:])


def split_flags(repo: str | pathlib.Path) -> list[str]:
  """The flags that validate on the 'validation' split, in the checkout `repo`'s terms (before
  validation and test were apart, its config had eval_split)."""
  if 'validation_split' in (pathlib.Path(repo) / 'configs' / 'default.py').read_text():
    return ['--config.data.validation_split=validation', '--config.data.test_split=None']
  return ['--config.data.eval_split=validation']


def _data_flags(args, source: str, n: int, repo: str | pathlib.Path = ROOT) -> list[str]:
  root = pathlib.Path(args.data_root)
  if source == 'fake':
    return ['--config.data.source=fake', f'--config.data.fake.num_train_examples={n}']
  flags = [*split_flags(repo), '--config.data.bad_files=skip']
  if source == 'folder':
    return flags + ['--config.data.source=folder',
                    f'--config.data.dir={root / f"folder_{n}"}']
  file_format = 'tfrecord' if source == 'tfds_tfrecord' else 'array_record'
  return flags + ['--config.data.source=tfds', f'--config.data.name={tfds_name(n)}',
                  f'--config.data.dir={root / f"tfds_{n}_{file_format}"}']


def _checkpointed(workdir: pathlib.Path) -> bool:
  directory = workdir / 'checkpoints'
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def measure_start(args, label: str, repo: str, source: str, n: int, count: int) -> None:
  """main.py to its first progress line: fresh, then resumed from a checkpoint of that run."""
  root = pathlib.Path(args.data_root)
  workdir = root / 'work' / f'{label}_{source}_{n}_{count}p'
  subprocess.run(['rm', '-rf', str(workdir)], check=True)
  argv = [str(pathlib.Path(repo) / 'main.py'), '--config=configs/smoke.py',
          f'--workdir={workdir}', '--config.steps_per_epoch=100000',
          '--config.warmup.epochs=1', '--config.finetune.epochs=0',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=1',
          f'--config.data.num_parallel_calls={2 // count}', *_data_flags(args, source, n, repo)]
  for run in ('fresh', 'resume'):
    if run == 'fresh':  # the first run on this data: no image-check verdicts kept yet
      subprocess.run(['rm', '-rf', str(root / 'hhjax_cache')], check=True)
    load = os.getloadavg()[0]
    children = [_Child(argv, env, repo) for env in _process_envs(count, root)]
    deadline = time.perf_counter() + args.timeout_s
    while time.perf_counter() < deadline:
      # Process 0's line: a step is collective, so every process has taken it then (processes
      # other than 0 log warnings only).
      done = children[0].first(PROGRESS) is not None
      if done and (run == 'resume' or _checkpointed(workdir)):
        break
      if any(c.exited() for c in children):
        break
      time.sleep(0.2)
    for i, child in enumerate(children):
      first = child.first(PROGRESS)
      if first is None and i > 0:
        first = children[0].first(PROGRESS)   # launched together: the same time from launch
      stats = child.stop()
      log = root / 'logs' / f'{workdir.name}_{run}_{i}.log'
      log.parent.mkdir(exist_ok=True)
      log.write_text(''.join(f'{t:8.2f} {line}\n' for t, line in child.lines))
      record = {'bench': 'data_scale', 'code': label, 'measure': 'start', 'run': run,
                'source': source, 'n': n, 'processes': count, 'process': i,
                'first_step_s': first, **stats, **_cpu(), 'load_avg_1m_at_launch': load}
      if first is None:
        record['error'] = f'no progress line (exit {child.proc.returncode}): {child.tail()}'
      _emit(record)
    if children[0].first(PROGRESS) is None:
      return


def measure_pipeline(args, label: str, repo: str, source: str, n: int, count: int) -> None:
  """The training stream alone, in `count` processes at once."""
  root = pathlib.Path(args.data_root)
  subprocess.run(['rm', '-rf', str(root / 'hhjax_cache')], check=True)  # info_s: a full check
  children = []
  for i, env in enumerate(_process_envs(count, root)):
    argv = [str(pathlib.Path(__file__).resolve()), '--child=pipeline', f'--source={source}',
            f'--n={n}', f'--process_index={i}', f'--process_count={count}',
            f'--data_root={args.data_root}', f'--repo={repo}', f'--steps={args.steps}',
            f'--warmup_steps={args.warmup_steps}',
            f'--label={label}']
    children.append(_Child(argv, env, repo))
  for i, child in enumerate(children):
    child.wait(args.timeout_s)
    stats = child.stop()
    records = [json.loads(line) for line in child.stdout if line.startswith('{')]
    if not records:
      records = [{'bench': 'data_scale', 'code': label, 'measure': 'pipeline',
                  'source': source, 'n': n, 'processes': count, 'process': i,
                  'error': f'exit {child.proc.returncode}: {child.tail()}'}]
    for record in records:
      record['peak_rss_mb'] = stats['peak_rss_mb']
      record['cpu_s'] = stats['cpu_s']
      _emit(record)


def pipeline_child(args) -> None:
  """Runs in --repo's code: the stream of one process, timed, with its bytes read."""
  sys.path.insert(0, args.repo)
  from configs import smoke  # pylint: disable=g-import-not-at-top
  from hhjax import sharding  # pylint: disable=g-import-not-at-top
  from hhjax.data import pipeline  # pylint: disable=g-import-not-at-top

  def flag_value(flag):
    key, value = flag[len('--config.'):].split('=', 1)
    return key.split('.'), value

  config = smoke.get_config()
  config.batch_size = 20
  config.data.image_size = 150
  config.data.num_parallel_calls = 2 // args.process_count
  for flag in _data_flags(args, args.source, args.n, args.repo):
    keys, value = flag_value(flag)
    node = config
    for key in keys[:-1]:
      node = node[key]
    node[keys[-1]] = int(value) if value.isdigit() else None if value == 'None' else value
  try:
    from hhjax.data import spec as data_spec  # pylint: disable=g-import-not-at-top
    data = data_spec.DataSpec.from_config(config)
  except ImportError:   # code from before the data spec reads the config itself
    data = config
  sharding.maybe_initialize_distributed()
  pid = os.getpid()
  io_start = _io(pid)
  t0, cpu0 = time.perf_counter(), time.process_time()
  info = pipeline.dataset_info(data)
  t_info, cpu_info = time.perf_counter(), time.process_time()
  io_info = _io(pid)
  batches = pipeline.create_dataset(data, config.data.train_split,
                                    process_index=args.process_index,
                                    process_count=args.process_count).as_numpy_iterator()
  next(batches)
  t_first = time.perf_counter()
  for _ in range(args.warmup_steps):
    next(batches)
  io_before = _io(pid)
  start = time.perf_counter()
  images = 0
  for _ in range(args.steps):
    images += len(next(batches)['label'])
  seconds = time.perf_counter() - start
  io_after = _io(pid)
  _emit({'bench': 'data_scale', 'code': args.label, 'measure': 'pipeline',
         'source': args.source, 'n': args.n, 'processes': args.process_count,
         'process': args.process_index, 'train_examples': info.num_examples['train'],
         'info_s': t_info - t0, 'info_cpu_s': cpu_info - cpu0, 'first_batch_s': t_first - t0,
         'info_read_mb': io_info['rchar_mb'] - io_start['rchar_mb'],
         'images_per_s': images / seconds,
         'rchar_kb_per_image': (io_after['rchar_mb'] - io_before['rchar_mb']) * 1024 / images,
         **_cpu()})


# ----------------------------------------------------------------------------- the table


def table(paths: list[str]) -> str:
  """Markdown: one row per (source, N, processes), the codes side by side in each cell."""
  rows = collections.defaultdict(dict)
  labels = []
  for path in paths:
    for line in open(path):
      if not line.startswith('{'):
        continue
      r = json.loads(line)
      if r.get('bench') != 'data_scale' or 'error' in r or 'skipped' in r:
        continue
      if r['code'] not in labels:
        labels.append(r['code'])
      cell = rows[(r['source'], r['n'], r['processes'])].setdefault(
          r['code'], collections.defaultdict(list))
      if r['measure'] == 'start':
        cell[f'{r["run"]}_s'].append(r['first_step_s'])
        cell[f'{r["run"]}_cpu'].append(r['cpu_s'])
        cell['peak_mb'].append(r['peak_rss_mb'])
        cell[f'{r["run"]}_read'].append(r['rchar_mb'])
      else:
        cell['ips'].append(r['images_per_s'])
        cell['kb'].append(r['rchar_kb_per_image'])
        cell['check_s'].append(r['info_s'])
        cell['first_batch_s'].append(r['first_batch_s'])
        if 'info_cpu_s' in r:
          cell['check_cpu'].append(r['info_cpu_s'])
        cell['check_read'].append(r['info_read_mb'])

  start = [('fresh s', 'fresh_s', max, 1), ('fresh CPU s', 'fresh_cpu', max, 0),
           ('resume s', 'resume_s', max, 1), ('resume CPU s', 'resume_cpu', max, 0),
           ('peak RSS MB', 'peak_mb', max, 0), ('MB read, resume', 'resume_read', max, 0)]
  alone = [('sizes + check s', 'check_s', max, 1), ('check CPU s', 'check_cpu', max, 1),
           ('check MB read', 'check_read', max, 0), ('first batch s', 'first_batch_s', max, 1),
           ('img/s', 'ips', sum, 0), ('KB read / image', 'kb', max, 0)]

  def cell_text(row, key, how, digits):
    values = [how(row[label][key]) if label in row and row[label].get(key) else None
              for label in labels]
    return ' / '.join('–' if v is None else f'{v:,.{digits}f}' for v in values)

  order = {s: k for k, s in enumerate(SOURCES)}
  text = [f'Each cell: {" / ".join(labels)}. Times and memory: the slowest / largest process; '
          'img/s: all processes together; bytes read: per process (rchar).']
  for title, columns in (('main.py to its first progress line', start),
                         ('the pipeline alone', alone)):
    keys = [k for k in rows if any(c[1] in cell for cell in rows[k].values() for c in columns)]
    text += ['', title, '',
             '| source | N | processes | ' + ' | '.join(c[0] for c in columns) + ' |',
             '|---|---:|---:|' + '---:|' * len(columns)]
    for key in sorted(keys, key=lambda k: (order.get(k[0], 9), k[1], k[2])):
      source, n, count = key
      cells = [cell_text(rows[key], *column[1:]) for column in columns]
      text.append(f'| {source} | {n:,} | {count} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(text)


def main():
  args = _parse_args()
  if args.table:
    print(table(args.table))
    return
  if args.child:
    pipeline_child(args)
    return
  root = pathlib.Path(args.data_root)
  root.mkdir(parents=True, exist_ok=True)
  for n in args.sizes:
    generate(root, n, args.sources)
  if args.generate_only:
    return
  print(f'{_cpu()}, code {args.code}', file=sys.stderr, flush=True)
  for n in args.sizes:
    for source in args.sources:
      for count in args.processes:
        for measure in args.measures:
          for label, repo in args.code:
            if source == 'tfds' and not (pathlib.Path(repo) / 'hhjax/data/records.py').exists():
              # This code reads TFDS only through as_dataset, which has no ArrayRecord reader.
              _emit({'bench': 'data_scale', 'code': label, 'measure': measure, 'source': source,
                     'n': n, 'processes': count, 'skipped': 'no ArrayRecord reader'})
              continue
            if measure == 'start':
              measure_start(args, label, repo, source, n, count)
            else:
              measure_pipeline(args, label, repo, source, n, count)


if __name__ == '__main__':
  main()
