"""The package's shape: no import cycle among c3l_jax's modules, the core never imports the scenes
testbed, and every reference to a design document in the code resolves to a file in the repository.

Run alone it is the command that shows there is no cycle: `pytest -q tests/test_layout.py` (the
failing assertion prints the cycle)."""

from __future__ import annotations

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PACKAGE = "c3l_jax"
TESTBED = "c3l_jax.scenes"


def _modules() -> dict[str, str]:
  """Dotted module name -> path, for every .py file of the package."""
  out = {}
  root = os.path.join(REPO, PACKAGE)
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[dotted.removesuffix(".__init__")] = path
  return out


def _imports(path: str, module: str, modules: dict[str, str]) -> set[str]:
  """The package modules `module` imports, anywhere in the file (function-level imports included)."""
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      # `from a.b import c`: the module a.b.c when it is one, else a.b.
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    else:
      continue
    for name in names:
      while name and name not in modules:  # `import a.b.c` of a non-module attribute path
        name = name.rpartition(".")[0]
      if name.startswith(PACKAGE) and name != module:
        out.add(name)
  return out


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(p, m, modules) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle (a list of modules, first == last) or None; depth-first search with colours."""
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_graph_sees_imports():
  """The parser finds the imports it must: plain, `from` (module and name), relative, in functions."""
  graph = import_graph()
  assert "c3l_jax.scenes.world" in graph["c3l_jax.scenes.text"]
  assert "c3l_jax.registry" in graph["c3l_jax.data.sources"]
  assert "c3l_jax.pipeline.train" in graph["c3l_jax.scenes.pretrain"]  # a function-level import
  assert "c3l_jax.data.prompts" in graph["c3l_jax.pipeline.common"]
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
  graph = import_graph()
  cycle = find_cycle(graph)
  assert cycle is None, " -> ".join(cycle)


def test_the_core_never_imports_the_testbed():
  graph = import_graph()
  offenders = {m: sorted(d for d in deps if d == TESTBED or d.startswith(TESTBED + "."))
               for m, deps in graph.items() if not (m == TESTBED or m.startswith(TESTBED + "."))}
  assert {m: d for m, d in offenders.items() if d} == {}
  # ... nor branches on it by name.
  for module, path in _modules().items():
    if not module.startswith(TESTBED):
      text = open(path, encoding="utf-8").read()
      assert not re.search(r"""==\s*["']scenes["']|["']scenes["']\s*==""", text), module


def _headings(path: str) -> list[str]:
  return [h.strip() for h in re.findall(r"^#+ (.*)$", open(path, encoding="utf-8").read(), flags=re.M)]


def _anchor(heading: str) -> str:
  """GitHub's anchor of a markdown heading."""
  return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_design_references_resolve():
  """Every `docs/<name>.md` a module, config, test or the README names exists (the old design sketch,
  not in the repository, is named nowhere), every `docs/<name>.md, "Section"` names a heading of that
  file, and every markdown link to a .md file (and #anchor) of the README and docs/ resolves."""
  old_sketch = "DESIGN" + ".md"
  files = list(_modules().values())
  for folder in ("configs", "tests", "bench"):
    files += [os.path.join(REPO, folder, f) for f in os.listdir(os.path.join(REPO, folder))
              if f.endswith(".py")]
  files += [os.path.join(REPO, "launch.py"), os.path.join(REPO, "README.md")]
  files += [os.path.join(REPO, "docs", f) for f in os.listdir(os.path.join(REPO, "docs"))]
  seen = 0
  for path in files:
    text = open(path, encoding="utf-8").read()
    assert old_sketch not in text, f"{path} names {old_sketch}, which is not in the repository"
    for doc, section in re.findall(r'docs/([\w-]+\.md)(?:,\s*"([^"]+)")?', text.replace("\n", " ")):
      target = os.path.join(REPO, "docs", doc)
      assert os.path.isfile(target), f"{path} names docs/{doc}"
      if section:
        assert section in _headings(target), f"{path} names section {section!r} of docs/{doc}"
      seen += 1
    if path.endswith(".md"):
      for link, anchor in re.findall(r"\]\(([\w./-]*\.md)?(?:#([\w-]+))?\)", text):
        target = os.path.normpath(os.path.join(os.path.dirname(path), link)) if link else path
        assert os.path.isfile(target), f"{path} links {link}"
        if anchor:
          assert anchor in [_anchor(h) for h in _headings(target)], f"{path} links {link}#{anchor}"
        seen += 1
  assert seen > 0
