"""The layers of hhjax, as the README's code map draws them, hold in the code.

Each module belongs to one layer; a module may import its own layer and those below it, never
one above. The config is read at the entry layer and handed down as values: below it no module
takes a ConfigDict. Private JAX modules are reached from one place, hhjax/compat.py.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'hhjax'

# Lowest first. A module not named here takes its folder's layer.
LAYERS = (
    ('base', {'hhjax.errors', 'hhjax.files', 'hhjax.trees', 'hhjax.durations', 'hhjax.compat',
              'hhjax.best'}),
    ('runtime', {'hhjax.checkpointing', 'hhjax.workdir', 'hhjax.workdir_lock', 'hhjax.metrics',
                 'hhjax.eval_metrics',
                 'hhjax.peers', 'hhjax.preemption', 'hhjax.sharding', 'hhjax.host_malloc',
                 'hhjax.compilation'}),
    ('model', {'hhjax.model'}),
    ('weights', {'hhjax.weights'}),
    ('data', {'hhjax.data', 'hhjax.pictures'}),
    ('training', {'hhjax.training'}),
    ('entry', {'hhjax.entry', 'hhjax.config_checks', 'hhjax.agreement', 'hhjax.data_listing',
               'hhjax.train', 'hhjax.evaluate', 'hhjax.predict', 'hhjax.explain',
               'hhjax.export', 'hhjax.import_keras', 'hhjax.preview', 'hhjax.compare',
               'hhjax.run_report'}),
)
# Below the entry layer, the modules that may hold a config: the data spec's one constructor,
# and the workdir's config.json.
CONFIG_READERS = {'hhjax.data.spec', 'hhjax.workdir'}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(ROOT).with_suffix('').parts
    if parts[-1] == '__init__':
      continue
    out['.'.join(parts)] = path
  return out


def _layer(module: str) -> int:
  for i, (_, members) in enumerate(LAYERS):
    if module in members:
      return i
  for i, (_, members) in enumerate(LAYERS):
    if any(module.startswith(m + '.') for m in members):
      return i
  raise AssertionError(f'{module} is in no layer: add it to LAYERS (and the README code map).')


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, module) for every import of the file, at the top or inside functions."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      found.append((node.lineno, node.module))
      found += [(node.lineno, f'{node.module}.{alias.name}') for alias in node.names]
  return found


def _hhjax_target(name: str, modules: dict[str, pathlib.Path]) -> str | None:
  """The hhjax module an import name refers to (`from hhjax import x` names hhjax.x)."""
  while name:
    if name in modules:
      return name
    name = name.rpartition('.')[0]
  return None


def test_every_module_has_a_layer():
  for module in _modules():
    _layer(module)


def test_no_import_runs_up_a_layer():
  modules = _modules()
  upward = []
  for module, path in modules.items():
    here = _layer(module)
    for line, name in _imports(path):
      target = _hhjax_target(name, modules)
      if target and _layer(target) > here:
        upward.append(f'{path.relative_to(ROOT)}:{line} ({LAYERS[here][0]}) imports {target} '
                      f'({LAYERS[_layer(target)][0]})')
  assert not upward, 'Imports that run up a layer:\n' + '\n'.join(sorted(set(upward)))


def test_below_the_entry_layer_no_module_takes_a_config():
  entry = [name for name, _ in LAYERS].index('entry')
  readers = [module for module, path in _modules().items()
             if _layer(module) < entry and module not in CONFIG_READERS
             and any(name.startswith('ml_collections') for _, name in _imports(path))]
  assert not readers, f'These modules take a ConfigDict; hand them values instead: {readers}'


@pytest.mark.parametrize('private', ['jax._src'])
def test_private_library_modules_are_reached_from_compat_only(private):
  users = sorted(str(path.relative_to(ROOT)) for module, path in _modules().items()
                 if any(name == private or name.startswith(private + '.')
                        for _, name in _imports(path)))
  assert users in ([], ['hhjax/compat.py']), users
