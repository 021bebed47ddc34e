"""The house's shape, checked on the source: every import runs down the layers and none closes a
loop. Read with `ast` (no import is executed), so a lazy import inside a function counts too.

The layers, lowest first (README, "Architecture"): a module may import its own layer and the
layers below it, never one above.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("acquisition", "features", "triggers", "closedloop", "gui")
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("acquisition", ("acquisition",)),
    ("features", ("features",)),
    ("triggers", ("triggers",)),
    ("shared nouns", ("closedloop.bus", "closedloop.control", "closedloop.errors")),
    ("participant and telemetry", ("closedloop.participant", "closedloop.telemetry")),
    ("engine", ("closedloop",)),
    ("tuning and export", ("closedloop.tuning", "closedloop.export")),
    ("gui", ("gui",)),
    ("entry points", ("closedloop.app", "closedloop.testing")),
)


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the five packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its body (top level or inside functions)."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` runs a, a.b and a.b.c: the innermost project module is the edge
            module = target
            while module and module not in known:
                module = module.rpartition(".")[0]
            if module and module != name:
                found.add(module)
    return found


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix that holds `module`."""
    best, best_len = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best >= 0, f"{module} is in no layer: add it to LAYERS"
    return best


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_no_import_loop():
    assert cycles(import_graph()) == []


def test_cycle_finder_finds_a_loop():  # the check above can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Each import of a module in a higher layer, as a sentence."""
    return [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]


def test_every_import_runs_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_upward_finder_finds_an_upward_import():  # as triggers/outputs.py once did
    graph = {"triggers.outputs": {"closedloop.bus", "features.types"}, "gui.app": {"closedloop"}}
    assert upward_imports(graph) == [
        "triggers.outputs (triggers) imports closedloop.bus (shared nouns)"
    ]


def test_package_inits_import_nothing():
    """Every package `__init__` is a docstring (closedloop's adds one lazy name): importing a
    package never loads mne, pylsl or Qt behind a caller's back."""
    heavy = []
    for name, path in module_files().items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import) or (
                isinstance(node, ast.ImportFrom) and node.module != "__future__"
            ):
                heavy.append(f"{name}: line {node.lineno}")
    assert heavy == []


def test_check_config_loads_no_mqtt_audio_or_qt():
    """`closedloop check-config` in a fresh interpreter: no MQTT client, audio or Qt module."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from closedloop.app.cli import main\n"
        "assert main(['check-config', 'configs/default.yaml']) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'aiomqtt', 'paho', 'miniaudio', 'PySide6', 'pyqtgraph', 'gui'} or m in "
        "{'closedloop.telemetry.bridge', 'closedloop.telemetry.client', "
        "'closedloop.telemetry.protocol', 'closedloop.participant.audio', "
        "'closedloop.participant.feedback'})\n"
        "print(heavy)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def unreachable_statements(source: str) -> list[int]:
    """Line numbers of statements that follow a return / raise / continue / break in the same
    block (ruff has no stable rule for this: PLW0101 is not in the pinned ruff)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        for field in ("body", "orelse", "finalbody", "handlers"):
            block = getattr(node, field, None)
            if not isinstance(block, list):
                continue
            for stmt, following in itertools.pairwise(block):
                if isinstance(stmt, (ast.Return, ast.Raise, ast.Continue, ast.Break)):
                    lines.append(following.lineno)
    return lines


def test_no_unreachable_code():
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sorted(module_files().values())
        for line in unreachable_statements(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_unreachable_finder_finds_code_after_return():  # as pipeline.py once had
    source = "def f(x):\n    return x\n    y = x + 1\n    return y\n"
    assert unreachable_statements(source) == [3]
