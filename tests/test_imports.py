"""The package's import graph, read from the source (every import statement that runs, function-level
ones included): no module imports itself through others, no subpackage does, and every module opens
with a docstring saying what it is for."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "d2v2scale"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _run_time_nodes(tree: ast.AST):
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:``: imports for the type checker
    never run (the hooks of ``d2v2scale.modality_registry`` are typed with ``Config`` that way)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            type_only = isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            todo.extend(child.orelse if type_only else [child])


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports; ``from . import x`` counts as importing ``x`` only."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in _run_time_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            found.update(subs if subs and len(subs) == len(node.names) else [base, *subs])
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one member (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _room(name: str) -> str:
    """A module's room: its subpackage (``d2v2scale.train``) or, at the top level, itself."""
    parts = name.split(".")
    return ".".join(parts[:2])


def test_no_module_import_cycle():
    assert _cycles(GRAPH) == []


def test_no_subpackage_import_cycle():
    rooms: dict[str, set[str]] = {}
    for name, deps in GRAPH.items():
        rooms.setdefault(_room(name), set()).update(_room(d) for d in deps if _room(d) != _room(name))
    rooms.pop("d2v2scale", None)  # the package's __init__ imports nothing of its own
    assert _cycles({k: v & rooms.keys() for k, v in rooms.items()}) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_sees_function_level_and_relative_imports():
    """Before the planner's core left ``plan.py``, ``planning/search.py`` imported it inside a
    function: such an import must count."""
    assert "d2v2scale.planning.planner" in GRAPH["d2v2scale.planning.search"]
    assert "d2v2scale.planning.planner" in GRAPH["d2v2scale.plan"]
    assert "d2v2scale.counter_rng" in GRAPH["d2v2scale.model.masking"]  # from .. import counter_rng


def test_every_module_says_what_it_is_for():
    missing = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert missing == []


def test_the_model_and_distributed_rooms_stay_apart_from_training():
    """Model code is single-device (its TP plan aside); ``distributed`` knows no model."""
    assert not any(d.startswith("d2v2scale.model") for n, ds in GRAPH.items() if n.startswith("d2v2scale.distributed")
                   for d in ds)
    for name, deps in GRAPH.items():
        if name.startswith("d2v2scale.model") and name != "d2v2scale.model.parallelize":
            assert not any(d.startswith(("d2v2scale.distributed", "d2v2scale.train")) for d in deps), name


def test_backends_are_found_in_the_registry_the_config_names():
    from d2v2scale.config import BACKENDS
    from d2v2scale.train.backend import REGISTRY

    assert tuple(REGISTRY) == BACKENDS
    for name, load in REGISTRY.items():
        module = load()
        assert module.__name__ == f"d2v2scale.train.backend.{name}" and callable(module.check_spec)


# Modules that may dispatch by name: the registry itself, and each modality's own module.
DISPATCHERS = ("d2v2scale.modality_registry", "d2v2scale.modalities")
# (module, the comparison's source) that name a data kind without branching on one.
ALLOWED = {
    ("d2v2scale.config", "cfg.data.kind in kinds"),  # validation: data.kind is one the modality registered
    ("d2v2scale.prepare", 'args.what == "images"'),  # the prepare tool's two subcommands, images and audio
}


def _names_literal(node: ast.AST, names: frozenset[str]) -> bool:
    """A string literal naming a registered modality or data kind, or a tuple, list or set holding one."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_names_literal(e, names) for e in node.elts)
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names


def _name_attribute(node: ast.AST, data_only: bool) -> bool:
    """``….modality`` or ``….kind`` (``data_only``: ``….data.kind``; masks and failures have kinds too)."""
    if not isinstance(node, ast.Attribute) or node.attr not in ("modality", "kind"):
        return False
    owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
    return node.attr == "modality" or not data_only or owner == "data"


def branches_on_a_name(source: str, names: frozenset[str]) -> list[tuple[int, str]]:
    """(line, the code) of every place ``source`` branches on a modality or data-kind name: a
    comparison (==, !=, in, not in; either side) with a literal naming one or with ``….modality`` /
    ``….data.kind``, a table indexed by ``….modality`` / ``….kind``, a ``match`` on one or with a
    case naming one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = (node.left, *node.comparators)
            if any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops) and any(
                    _names_literal(side, names) or _name_attribute(side, data_only=True) for side in sides):
                found.append((node.lineno, ast.get_source_segment(source, node)))
        elif isinstance(node, ast.Subscript) and _name_attribute(node.slice, data_only=False):
            found.append((node.lineno, ast.get_source_segment(source, node)))
        elif isinstance(node, ast.Match):
            values = [p.value for case in node.cases for p in ast.walk(case.pattern) if isinstance(p, ast.MatchValue)]
            if _name_attribute(node.subject, data_only=False) or any(_names_literal(v, names) for v in values):
                found.append((node.lineno, f"match {ast.get_source_segment(source, node.subject)}"))
    return found


def _registered_names() -> frozenset[str]:
    from d2v2scale import modality_registry

    return frozenset(modality_registry.names()) | frozenset(modality_registry.data_kinds())


@pytest.mark.parametrize("planted", [
    'if modality == "image":\n    pass',
    'if "image" == cfg.model.modality:\n    pass',
    'step = TABLE[cfg.model.modality]',
    'match cfg.model.modality:\n    case _:\n        pass',
    'if kind == "images":\n    pass',
    'if cfg.model.modality != name:\n    pass',
    'ok = cfg.data.kind not in wanted',
    'ok = kind in ("images", "audio")',
    'read = READERS[spec.kind]',
    'match x:\n    case "text":\n        pass',
])
def test_the_branch_finder_finds_each_form(planted):
    assert len(branches_on_a_name(planted, _registered_names())) == 1, planted


def test_the_branch_finder_leaves_other_code_alone():
    clean = ('m = modality_registry.get(cfg.model.modality)\nif cfg.masking.kind != "auto":\n    pass\n'
             'rows = table[key]\nmatch mode:\n    case "fast":\n        pass\nlabel = "audio"\n'
             'if unit == "audio samples":\n    pass\n')
    assert branches_on_a_name(clean, _registered_names()) == []


def test_the_core_never_branches_on_a_modality_name():
    """What a modality is lives in its module under ``modalities/``; the core asks the registry
    (``d2v2scale.modality_registry``) and never compares a modality's or a data kind's name, indexes a table
    by it or matches on it: a plugin modality then needs no change outside its own module."""
    names = _registered_names()
    assert {"image", "audio", "text", "images", "digits", "synthetic"} <= names
    found = [f"{path.relative_to(PACKAGE)}:{line}: {code}" for name, path in MODULES.items()
             if not name.startswith(DISPATCHERS)
             for line, code in branches_on_a_name(path.read_text(), names) if (name, code) not in ALLOWED]
    assert found == []


def test_an_indexed_data_kind_carries_its_index_rules():
    """The indexer learns how to index a kind only from the kind's own rules (no name lookup):
    each data kind with files to index brings rules under its own name."""
    from d2v2scale import modality_registry

    kinds = [k for m in modality_registry.names() for k in modality_registry.get(m).data_kinds]
    assert {k.name for k in kinds if k.index is not None} >= {"images", "audio"}
    for kind in kinds:
        if kind.index is not None:
            assert kind.index.kind == kind.name and kind.index.suffixes, kind.name


def test_every_exception_class_is_in_the_errors_table():
    """errors.py lists every exception class the package defines (where it lives, which exit code
    it ends a launch with): a new one that is not there fails here."""
    import ast

    table = (PACKAGE / "errors.py").read_text()
    defined = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id in defined)
                    for b in node.bases):
                defined.append(node.name)
    assert len(defined) >= 9
    missing = [name for name in defined if f"``{name}``" not in table]
    assert not missing, missing
