"""The package's import graph: no cycles, no import from a lower layer to a higher one, and every
module imports on its own (none relies on another of ours having been imported first).

Layers, lowest first (a module may import modules of its own layer or below):
  0  config, quickstart, cli, precision,     run defaults, the command-line convention, dtype,
     hugepages, view_draws                    the allocator setting of the training program,
                                              the augmentation's random draws
  1  models, data, algorithm.mapping,         building blocks with no algorithm inside
     run.metrics, run.checkpoints, privacy
     (all but privacy.attack)
  2  algorithm                                state, per-party functions, the pool step
  3  parallel                                 the step on the whole federation, devices
  4  experiment                               a config resolved to data, model, step config
  5  evaluation, privacy.attack               kNN, probes, features, protocols, the model-
                                              inversion attack on a checkpoint
  6  run                                      the training loop
  7  deploy, costs, remote                    export of the client slice, cost tables, the
                                              server's and clients' sides of remote training
  8  main, evaluate, and other commands       command-line entry points
  9  benchmarks                               speed and memory measurements of all the above
"""
import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import mocosfl_jax

PACKAGE_DIR = Path(mocosfl_jax.__file__).parent

# Longest matching prefix wins.
LAYERS = {
    'mocosfl_jax': 0, 'mocosfl_jax.config': 0, 'mocosfl_jax.quickstart': 0, 'mocosfl_jax.cli': 0,
    'mocosfl_jax.precision': 0, 'mocosfl_jax.hugepages': 0,
    'mocosfl_jax.view_draws': 0,
    'mocosfl_jax.models': 1, 'mocosfl_jax.data': 1, 'mocosfl_jax.algorithm.mapping': 1,
    'mocosfl_jax.run.metrics': 1, 'mocosfl_jax.run.checkpoints': 1,
    'mocosfl_jax.privacy': 1, 'mocosfl_jax.privacy.attack': 5,
    'mocosfl_jax.algorithm': 2,
    'mocosfl_jax.parallel': 3,
    'mocosfl_jax.experiment': 4,
    'mocosfl_jax.evaluation': 5,
    'mocosfl_jax.run': 6,
    'mocosfl_jax.deploy': 7, 'mocosfl_jax.costs': 7, 'mocosfl_jax.remote': 7,
    'mocosfl_jax.benchmarks': 9,
}
COMMAND_LAYER = 8   # any other top-level module: a command (main, evaluate, ...)


def _modules() -> dict:
  """{module name: source path} of every module of the package."""
  out = {}
  for info in pkgutil.walk_packages([str(PACKAGE_DIR)], 'mocosfl_jax.'):
    spec = importlib.util.find_spec(info.name)
    out[info.name] = Path(spec.origin)
  out['mocosfl_jax'] = PACKAGE_DIR / '__init__.py'
  return out


MODULES = _modules()


def _layer(name: str) -> int:
  best = max((p for p in LAYERS if name == p or name.startswith(p + '.')), key=len,
             default=None)
  if best is None or (best == 'mocosfl_jax' and name != 'mocosfl_jax'):
    return COMMAND_LAYER
  return LAYERS[best]


def _imports(name: str, path: Path) -> set:
  """Modules of ours that `name` imports anywhere in its source (functions included)."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:   # `from pkg import module` names a module; else the attribute's home
        found.add(f'{base}.{a.name}' if f'{base}.{a.name}' in MODULES else base)
  return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_every_module_is_placed_in_a_layer():
  commands = sorted(m for m in MODULES if _layer(m) == COMMAND_LAYER)
  assert all(m.count('.') == 1 for m in commands), commands   # commands sit at the top level
  assert 'mocosfl_jax.main' in commands


def upward_imports(graph: dict) -> list:
  return sorted(f'{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})'
                for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))


def find_cycles(graph: dict) -> list:
  state, cycles = {}, []

  def visit(m, path):
    state[m] = 'active'
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 'active':
        cycles.append(' -> '.join(path[path.index(d):] + [d]))
      elif d not in state:
        visit(d, path + [d])
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  return cycles


def test_no_import_from_a_lower_layer_to_a_higher_one():
  assert not upward_imports(GRAPH), '\n'.join(upward_imports(GRAPH))


def test_no_import_cycles():
  assert not find_cycles(GRAPH), '\n'.join(find_cycles(GRAPH))


def test_the_checks_see_function_level_imports_and_can_fail():
  assert 'mocosfl_jax.parallel' in GRAPH['mocosfl_jax.run.train']
  bad = dict(GRAPH)
  bad['mocosfl_jax.algorithm.step'] = GRAPH['mocosfl_jax.algorithm.step'] | {
      'mocosfl_jax.run.train'}
  assert upward_imports(bad) == ['mocosfl_jax.algorithm.step (layer 2) imports '
                                 'mocosfl_jax.run.train (layer 6)']
  assert find_cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a -> b -> c -> a']


_IMPORT_EACH_ALONE = r'''
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
  for m in [m for m in sys.modules if m == 'mocosfl_jax' or m.startswith('mocosfl_jax.')]:
    del sys.modules[m]
  try:
    importlib.import_module(name)
  except Exception:
    failed.append(name + '\n' + traceback.format_exc(limit=3))
print('\n'.join(failed))
sys.exit(1 if failed else 0)
'''


def test_every_module_imports_alone():
  """Each module imports in an interpreter where no other module of ours was imported."""
  proc = subprocess.run([sys.executable, '-c', _IMPORT_EACH_ALONE, *sorted(MODULES)],
                        capture_output=True, text=True, timeout=600,
                        env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin',
                             **{k: v for k, v in __import__('os').environ.items()
                                if k in ('PYTHONPATH', 'HOME')}})
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize('module', ['mocosfl_jax.algorithm.step', 'mocosfl_jax.parallel'])
def test_the_step_does_not_depend_on_the_run(module):
  reach, todo = set(), [module]
  while todo:
    for d in GRAPH[todo.pop()] - reach:
      reach.add(d)
      todo.append(d)
  assert not {m for m in reach if m.startswith(('mocosfl_jax.run', 'mocosfl_jax.experiment',
                                                 'mocosfl_jax.evaluation'))}, reach


def test_the_device_client_loads_no_jax():
  """export/edge_client.py runs where only numpy, onnxruntime, grpcio and safetensors are
  installed: its modules import no JAX (nor flax, optax, tensorflow)."""
  code = ('import sys, mocosfl_jax.deploy.edge_client; '
          'print(sorted({m.split(".")[0] for m in sys.modules} & '
          '{"jax", "jaxlib", "flax", "optax", "tensorflow", "orbax"}))')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == '[]'
