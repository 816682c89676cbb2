"""The package's structure: imports point one way, and no module keeps state of its own.

Import graph (:func:`import_graph`): one node per module under ``kvtune/``; an edge for every
``import`` and ``from … import`` statement anywhere in a module, at module level or inside a
function, absolute or relative, that names a kvtune module (``from kvtune import fused`` is an edge
to ``kvtune.fused``; ``from kvtune.plan import Plan`` to ``kvtune.plan``). A package's
``__init__`` that Python runs on the way to a submodule is not an edge: the question is which
module uses which, not which files Python happens to open first.

Module-level mutable state (:func:`module_state`) in the modules that serve a model at run time:
no ``global`` statement anywhere, and no module-level binding of a mutable value (a dict, list or
set literal or comprehension, or a call to dict/list/set/defaultdict/OrderedDict/Counter/deque),
whatever its name. Constants are tuples, strings, numbers, frozensets and frozen dataclasses.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvtune"
STATELESS_MODULES = ("simulate.py", "fused.py")
_MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Counter", "deque"}


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name → the kvtune modules it imports (see the module docstring for what counts)."""
    files = {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}

    def resolve(name: str) -> str | None:
        """The module ``name`` denotes, or None outside kvtune (an imported attribute names its module)."""
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    anchor = module.split(".")[: len(module.split(".")) - (node.level - is_package)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from kvtune import fused` names a submodule; `from kvtune.plan import Plan` an attribute
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                found = resolve(target)
                if found and found != module and found.split(".")[0] == "kvtune":
                    graph[module].add(found)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, …, a]``, or None (depth-first search, colouring the path)."""
    on_path: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return on_path[on_path.index(node):] + [node]
        if node in done:
            return None
        on_path.append(node)
        for nxt in sorted(graph[node]):
            cycle = visit(nxt)
            if cycle:
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of modules that import each other (for the failure message)."""
    index, low, stack, groups, counter = {}, {}, [], [], [0]

    def strongconnect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return groups


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "kvtune.cache" in graph and "kvtune.plan" in graph["kvtune.cache"]  # the graph is really built
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}; modules importing each other: {all_cycles(graph)}"


def test_the_graph_counts_imports_inside_functions_and_relative_ones(tmp_path):
    package = tmp_path / "kvtune"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from kvtune.b import thing\n")
    (package / "b.py").write_text("from . import c\n")
    (package / "c.py").write_text("import kvtune.sub.d\n")
    (package / "sub" / "__init__.py").write_text("from .d import x\n")
    (package / "sub" / "d.py").write_text("from ..a import f\nimport torch\n")
    graph = import_graph(package)
    assert graph == {"kvtune": set(), "kvtune.a": {"kvtune.b"}, "kvtune.b": {"kvtune.c"}, "kvtune.c": {"kvtune.sub.d"},
                     "kvtune.sub": {"kvtune.sub.d"}, "kvtune.sub.d": {"kvtune.a"}}
    assert find_cycle(graph) == ["kvtune.a", "kvtune.b", "kvtune.c", "kvtune.sub.d", "kvtune.a"]


def module_state(path: Path) -> list[str]:
    """What in ``path`` is module-level mutable state, one line each (the rule: module docstring)."""
    tree = ast.parse(path.read_text(), str(path))
    found = [f"line {n.lineno}: global {', '.join(n.names)}" for n in ast.walk(tree) if isinstance(n, ast.Global)]
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            value = node.value
            mutable = isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)) or (
                isinstance(value, ast.Call) and getattr(value.func, "id", getattr(value.func, "attr", None)) in _MUTABLE_CALLS
            )
            if mutable:
                found.append(f"line {node.lineno}: {ast.unparse(node).splitlines()[0]}")
    return found


@pytest.mark.parametrize("name", STATELESS_MODULES)
def test_no_module_level_mutable_state(name):
    state = module_state(PACKAGE / name)
    assert not state, f"kvtune/{name} keeps state at module level: {state}"


def test_the_state_rule_catches_globals_and_mutable_bindings(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import collections\nNAMES = ('a',)\n_seen = {}\nCACHE = collections.defaultdict(list)\n"
                    "def f():\n    global _flag\n    _flag = True\n")
    assert [line.split(":")[0] for line in module_state(path)] == ["line 6", "line 3", "line 4"]


def _attention_state(model) -> tuple:
    """How ``model`` attends: each config's implementation, and what kvtune hung on its modules (the
    architecture :func:`kvtune.arch.describe` keeps beside its fingerprint is a memo, not a switch)."""
    configs = {id(m.config): m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    hung = sorted((name, attr) for name, m in model.named_modules() for attr in vars(m)
                  if attr.startswith("_kvtune") and attr != "_kvtune_architecture")
    return model.config._attn_implementation, sorted(configs.values()), hung


def test_the_model_is_left_as_it_was_found(monkeypatch):
    """load_cache switches nothing; fused decoding, simulation and the probes switch the attention
    for their block only, also when the block fails. CUDA's default is forced: fused.available."""
    import torch

    from .conftest import tiny_llama
    from kvtune import fused
    from kvtune.cache import load_cache
    from kvtune.plan import Plan
    from kvtune.simulate import simulate_quantization

    monkeypatch.setattr(fused, "available", lambda model: True)
    model = tiny_llama(layers=2)
    model.set_attn_implementation("eager")  # not the default, so a "restore" to the default shows
    ids = torch.randint(3, 256, (1, 10))
    before, logits = _attention_state(model), model(input_ids=ids).logits
    plan = Plan.uniform("k4v2", 2, group_size=8, residual=4)

    cache = load_cache(model, plan)
    assert _attention_state(model) == before
    with cache.fused_decoding(model):
        assert model.config._attn_implementation == fused.ATTN_NAME
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, cache=cache, pad_token_id=0)
    assert cache.layers[0]._k.num_quantized > 0  # the fused layers were really built and filled
    assert _attention_state(model) == before
    with pytest.raises(ValueError, match="inside"), simulate_quantization(model, plan):
        model(input_ids=ids, use_cache=False)
        raise ValueError("inside")
    assert _attention_state(model) == before
    assert torch.equal(model(input_ids=ids).logits, logits)
