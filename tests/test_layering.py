"""The package's import graph: data flows one way and nothing imports in a circle.

Every `import` is read from the source (function-level ones too, which hide cycles from Python
itself): `nn/` and `diffusion/` are the core and import nothing of the jobs built on them, and
the module graph has no cycle.
"""

from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "imagen_jax")
CORE = ("imagen_jax.nn", "imagen_jax.diffusion")
CORE_MAY_IMPORT = (*CORE, "imagen_jax.errors", "imagen_jax.utils")


def _modules() -> dict[str, str]:
  found = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        rel = os.path.relpath(path, os.path.dirname(PACKAGE))[: -len(".py")]
        found[rel.replace(os.sep, ".").removesuffix(".__init__")] = path
  return found


def _import_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from imagen_jax import cascade` names a module; `from x.y import f` names x.y.
        deps.update(
          f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
          for a in node.names
        )
    graph[module] = {d for d in deps if d in modules and d != module}
  return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  cycles, state, stack = [], {}, []

  def visit(node: str) -> None:
    state[node] = "open"
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == "open":
        cycles.append([*stack[stack.index(dep) :], dep])
      elif dep not in state:
        visit(dep)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  return cycles


def test_the_walker_sees_function_level_imports():
  graph = _import_graph()
  assert "imagen_jax.nn.unet" in graph and "imagen_jax.cli" in graph
  # training/job.py imports the data pipeline inside `run()` only.
  assert "imagen_jax.data.input_pipeline" in graph["imagen_jax.training.job"]
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_core_imports_nothing_of_the_jobs_built_on_it():
  graph = _import_graph()
  offenders = {
    module: sorted(d for d in deps if not d.startswith(CORE_MAY_IMPORT))
    for module, deps in graph.items()
    if module.startswith(CORE)
  }
  assert not {m: d for m, d in offenders.items() if d}, offenders


def test_no_import_cycles():
  assert _cycles(_import_graph()) == []
