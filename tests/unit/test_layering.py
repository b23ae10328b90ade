"""The package layering, read statically: no import cycles, and each layer imports only what it may.

Imports are read with `ast` from the source files (nothing is imported or run), wherever they stand:
module level, inside functions, under `if TYPE_CHECKING:`, relative or absolute; every one counts,
for cycles too. A name covers its submodules: forbidding `kd_worker.daemon` forbids
`kd_worker.daemon.runtime`, and forbidding `rq` does not forbid `rqlite`. A rule marked `deferred_ok`
forbids only imports that run when the module is imported (not inside a function, not under
`if TYPE_CHECKING:`).
"""

from __future__ import annotations

import ast
import graphlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO

PACKAGES = ("kd_worker", "kd_client", "jobs")


@dataclass(frozen=True)
class Rule:
    layer: str  # a package; the rule covers it and every module below it
    forbidden: tuple[str, ...]  # modules it must not import, submodules included
    why: str
    deferred_ok: bool = False  # True: only imports run at import time are forbidden


# fmt: off
RULES = (
    Rule("kd_worker.engine",   ("rq", "redis", "kd_worker.daemon", "kd_worker.ops", "kd_worker.fixtures",
                                "kd_worker.cli", "kd_worker.settings"),
         "one distillation job: a KDConfig and paths in; no queue, no worker settings or runtime"),
    Rule("kd_worker.daemon",   ("kd_worker.ops", "kd_worker.fixtures", "kd_worker.cli"),
         "serving the queue builds on the engine; ops, fixtures and the CLI sit beside or above it"),
    Rule("kd_worker.ops",      ("kd_worker.daemon", "kd_worker.fixtures", "kd_worker.cli"),
         "running on a machine sits beside the daemon, below fixtures and the CLI"),
    Rule("kd_worker.fixtures", ("kd_worker.cli",),
         "the CLI is the entry point, on top of everything"),
    Rule("jobs",               ("mlx", "mlx_lm", "redis", "rq", "kd_worker", "kd_client"),
         "the job contract shared by producer and worker: no mlx, no Redis client, neither side"),
    Rule("kd_client",          ("kd_worker",),
         "the producer never imports the worker"),
    Rule("kd_client",          ("mlx", "mlx_lm"),
         "importing kd_client needs no MLX: hotswap and follow import it on use", deferred_ok=True),
)
# fmt: on


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. kd_worker.engine.distill
    target: str  # what it imports, resolved to a module where one exists: kd_worker.daemon.runtime, redis
    file: str  # relative to the scanned root
    line: int
    deferred: bool = False  # inside a function or under `if TYPE_CHECKING:`: not run at import time

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def find_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file of the packages under root."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of `from X import ...`, relative levels resolved against the importer."""
    if not node.level:
        return node.module or ""
    anchor = module.split(".") if is_package else module.split(".")[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _deferred_nodes(tree: ast.Module) -> set[ast.AST]:
    """The nodes that do not run when the module is imported: function bodies, `if TYPE_CHECKING:`."""
    roots: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            roots.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            roots += node.body
    return {inner for node in roots for inner in ast.walk(node)}


def read_imports(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    """Every import statement of the packages, anywhere in a file, resolved to absolute names.
    `from X import y` imports X.y when that is one of the scanned modules, otherwise X."""
    modules = find_modules(root, packages)
    found = []
    for module, path in modules.items():
        file = str(path.relative_to(root))
        tree = ast.parse(path.read_text(), filename=file)
        deferred = _deferred_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _base(node, module, path.name == "__init__.py")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            found += [Import(module, t, file, node.lineno, node in deferred) for t in dict.fromkeys(targets)]
    return found


def layer_violations(imports: list[Import], rules: tuple[Rule, ...] = RULES) -> list[str]:
    return [
        f"{imp.where()}: {imp.module} imports {imp.target}{' at import time' if rule.deferred_ok else ''}; "
        f"{rule.layer} must not import {banned} ({rule.why})"
        for rule in rules
        for imp in imports
        if within(imp.module, rule.layer) and not (rule.deferred_ok and imp.deferred)
        for banned in rule.forbidden
        if within(imp.target, banned)
    ]


def import_cycle(imports: list[Import], modules: set[str]) -> list[Import]:
    """The imports that close one cycle among the scanned modules, in order; [] when there is none."""
    edges = {(i.module, i.target): i for i in imports if i.target in modules and i.target != i.module}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for importer, target in edges:
        graph[importer].add(target)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        cycle: list[str] = e.args[1]  # [m1, m2, ..., m1]
        if (cycle[0], cycle[1]) not in edges:  # graphlib may list it against the import direction
            cycle.reverse()
        return [edges[a, b] for a, b in zip(cycle, cycle[1:], strict=False)]
    return []


def describe(cycle: list[Import]) -> str:
    return " -> ".join(f"{i.module} ({i.where()})" for i in cycle) + f" -> {cycle[0].module}"


# --- the real tree --------------------------------------------------------------------------------


def test_the_real_tree_has_no_import_cycle():
    cycle = import_cycle(read_imports(REPO), set(find_modules(REPO)))
    assert not cycle, f"import cycle: {describe(cycle)}"


def rule_id(rule: Rule) -> str:
    return f"{rule.layer}-{rule.forbidden[0]}"


@pytest.mark.parametrize("rule", RULES, ids=rule_id)
def test_the_real_tree_keeps_its_layers(rule):
    imports = read_imports(REPO)
    assert any(within(i.module, rule.layer) for i in imports), f"no imports read under {rule.layer}"
    found = layer_violations(imports, (rule,))
    assert not found, "\n".join(found)


def test_the_scan_sees_every_package_and_every_kind_of_import():
    modules = find_modules(REPO)
    assert {"kd_worker.cli", "kd_worker.engine", "kd_worker.daemon.task", "kd_client", "jobs.models"} <= set(modules)
    targets = {(i.module, i.target) for i in read_imports(REPO)}
    assert ("kd_worker.cli", "kd_worker.daemon.serve") in targets  # function-local
    assert ("kd_worker.ops.console", "rich.progress") in targets  # under TYPE_CHECKING
    assert ("kd_worker.daemon.task", "kd_worker.daemon.ordering") in targets  # from a package import a module
    deferred = {(i.module, i.target) for i in read_imports(REPO) if i.deferred}
    assert {("kd_worker.cli", "kd_worker.daemon.serve"), ("kd_worker.ops.console", "rich.progress")} <= deferred
    assert ("kd_worker.cli", "kd_worker.settings") not in deferred


# --- the checker itself, on tiny synthetic packages -----------------------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Source files by relative path; every directory on the way becomes a package."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in Path(rel).parents:
            if parent != Path("."):
                (root / parent / "__init__.py").touch()
        path.write_text(text)
    return root


def module_file(layer: str) -> str:
    return layer.replace(".", "/") + "/mod.py"


@pytest.mark.parametrize(
    "rule, banned", [(r, b) for r in RULES for b in r.forbidden], ids=lambda x: x.layer if isinstance(x, Rule) else x
)
def test_each_forbidden_import_is_reported_with_module_import_and_line(tmp_path, rule, banned):
    root = write_tree(tmp_path, {module_file(rule.layer): f'"""doc"""\n\nimport os\nimport {banned}\n'})
    found = layer_violations(read_imports(root), (rule,))
    when = " at import time" if rule.deferred_ok else ""
    assert found == [
        f"{module_file(rule.layer)}:4: {rule.layer}.mod imports {banned}{when}; {rule.layer} must not import {banned} "
        f"({rule.why})"
    ]
    assert layer_violations(read_imports(root)) == found  # and no other rule reports it


STYLES = {
    "import": ("import kd_worker.daemon.runtime\n", 1, "kd_worker.daemon.runtime"),
    "from-module": ("from kd_worker.daemon.runtime import Runtime\n", 1, "kd_worker.daemon.runtime"),
    "from-package": ("from kd_worker.daemon import runtime\n", 1, "kd_worker.daemon.runtime"),
    "from-package-name": ("from kd_worker import daemon\n", 1, "kd_worker.daemon"),
    "relative": ("from ..daemon import runtime\n", 1, "kd_worker.daemon.runtime"),
    "function-local": (
        "def f():\n    from kd_worker.daemon.runtime import Runtime\n    return Runtime\n",
        2,
        "kd_worker.daemon.runtime",
    ),
    "type-checking": (
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import kd_worker.daemon.runtime\n",
        4,
        "kd_worker.daemon.runtime",
    ),
    "try-except": ("try:\n    import redis.asyncio\nexcept ImportError:\n    pass\n", 2, "redis.asyncio"),
}


@pytest.mark.parametrize("style", STYLES)
def test_imports_are_found_wherever_and_however_written(tmp_path, style):
    source, line, target = STYLES[style]
    root = write_tree(
        tmp_path, {"kd_worker/engine/step.py": source, "kd_worker/daemon/runtime.py": "", "kd_worker/cli.py": ""}
    )
    found = layer_violations(read_imports(root))
    assert len(found) == 1, found
    assert found[0].startswith(f"kd_worker/engine/step.py:{line}: kd_worker.engine.step imports {target};")


def test_relative_imports_resolve_from_a_package_init(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "kd_worker/engine/__init__.py": "from . import step\nfrom ..daemon import runtime\n",
            "kd_worker/engine/step.py": "",
            "kd_worker/daemon/runtime.py": "",
        },
    )
    targets = [(i.module, i.target, i.line) for i in read_imports(root) if i.module == "kd_worker.engine"]
    assert targets == [
        ("kd_worker.engine", "kd_worker.engine.step", 1),
        ("kd_worker.engine", "kd_worker.daemon.runtime", 2),
    ]


def test_a_deferred_ok_rule_forbids_only_what_runs_at_import_time(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "kd_client/lazy.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    import mlx.core as mx\n"
                "def f():\n    import mlx_lm\n"
                "async def g():\n    from mlx.utils import tree_flatten\n"
            ),
            "kd_client/eager.py": (
                "import typing\n"
                "if typing.TYPE_CHECKING:\n    pass\nelse:\n    import mlx.nn\n"
                "class Swap:\n    import mlx_lm.tuner\n"
                "try:\n    import mlx.core\nexcept ImportError:\n    pass\n"
            ),
        },
    )
    found = layer_violations(read_imports(root))
    assert [f.split(";")[0] for f in found] == [
        "kd_client/eager.py:5: kd_client.eager imports mlx.nn at import time",
        "kd_client/eager.py:7: kd_client.eager imports mlx_lm.tuner at import time",
        "kd_client/eager.py:9: kd_client.eager imports mlx.core at import time",
    ]


def test_allowed_imports_and_look_alike_names_pass(tmp_path):
    root = write_tree(
        tmp_path,
        {
            "kd_worker/engine/step.py": "import numpy\nimport rqlite\nimport redis_tools\nfrom . import types\n",
            "kd_worker/engine/types.py": "",
            "kd_worker/engineer.py": "import redis\nimport kd_worker.cli\n",  # not under kd_worker.engine
            "kd_worker/daemon/task.py": "import rq\nfrom kd_worker.engine import step\nimport kd_worker.settings\n",
            "kd_worker/ops/console.py": "from kd_worker.engine.types import Progress\nimport kd_worker.opsx\n",
            "kd_worker/opsx.py": "",
            "kd_worker/fixtures/demo.py": "import kd_worker.daemon.task\nimport kd_worker.ops.console\n",
            "kd_worker/settings.py": "",
            "kd_worker/cli.py": "import kd_worker.fixtures.demo\nimport kd_worker.daemon.task\nimport kd_worker.ops\n",
            "jobs/models.py": "import pydantic\nimport mlxtend\nimport rqueue\nfrom jobs import errors\n",
            "jobs/errors.py": "",
            "kd_client/api.py": "import redis\nimport rq\nimport jobs.models\n\n\ndef f():\n    import mlx.core\n",
        },
    )
    imports = read_imports(root)
    assert layer_violations(imports) == []
    assert import_cycle(imports, set(find_modules(root))) == []


CYCLES = {
    "two, one function-local": (
        {"kd_worker/a.py": "import kd_worker.b\n", "kd_worker/b.py": "def f():\n    from kd_worker import a\n"},
        {"kd_worker/a.py:1 kd_worker.a -> kd_worker.b", "kd_worker/b.py:2 kd_worker.b -> kd_worker.a"},
    ),
    "three, one under TYPE_CHECKING": (
        {
            "jobs/a.py": "from jobs.b import X\n",
            "jobs/b.py": "from jobs import c\n",
            "jobs/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jobs.a import Y\n",
        },
        {"jobs/a.py:1 jobs.a -> jobs.b", "jobs/b.py:1 jobs.b -> jobs.c", "jobs/c.py:3 jobs.c -> jobs.a"},
    ),
    "across packages, through an __init__": (
        {
            "kd_client/__init__.py": "from kd_client.api import KDClient\n",
            "kd_client/api.py": "import jobs.hook\n",
            "jobs/hook.py": "from kd_client import KDClient\n",
        },
        {
            "kd_client/__init__.py:1 kd_client -> kd_client.api",
            "kd_client/api.py:1 kd_client.api -> jobs.hook",
            "jobs/hook.py:1 jobs.hook -> kd_client",
        },
    ),
}


@pytest.mark.parametrize("case", CYCLES)
def test_an_import_cycle_is_reported_step_by_step(tmp_path, case):
    files, expected = CYCLES[case]
    root = write_tree(tmp_path, {"jobs/ok.py": "import jobs.a_leaf\n", "jobs/a_leaf.py": "", **files})
    cycle = import_cycle(read_imports(root), set(find_modules(root)))
    assert {f"{i.where()} {i.module} -> {i.target}" for i in cycle} == expected
    assert all(a.target == b.module for a, b in zip(cycle, [*cycle[1:], cycle[0]], strict=True))  # a closed path
    assert describe(cycle).count(" -> ") == len(expected)


def test_a_package_importing_its_own_submodules_is_no_cycle(tmp_path):
    # kd_client/__init__ re-exports from api; api imports a sibling module through the package name
    root = write_tree(
        tmp_path,
        {
            "kd_client/__init__.py": "from kd_client.api import KDClient\n",
            "kd_client/api.py": "from kd_client import queue as Q\n",
            "kd_client/queue.py": "import jobs.models\n",
            "jobs/models.py": "",
        },
    )
    assert import_cycle(read_imports(root), set(find_modules(root))) == []
