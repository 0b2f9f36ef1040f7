"""The layout holds: imports point one way between wings, no import cycles, no private name crosses a module,
no module outgrows ~400 lines, and planning never loads the heavy packages.

Wings, lowest first (README, "How memplan is built"): the foundation (``memplan``, ``errors``, ``units``,
``fileio``) <- ``catalog`` <- ``plan`` <- ``measure`` <- ``integrations`` | ``reports`` <- ``cli``. A module may
import its own wing and the wings below it; ``integrations`` and ``reports`` are siblings and do not import
each other. Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memplan"
MAX_LINES = 400
RANK = {"foundation": 0, "catalog": 1, "plan": 2, "measure": 3, "integrations": 4, "reports": 4, "cli": 5,
        "main": 6}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("errors", "units", "fileio"):
        return "foundation"
    if parts[1] == "__main__":
        return "main"
    return parts[1]


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``import from`` names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports for annotations only: never executed)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(module: str, *, runtime_only: bool = False) -> list[tuple[str, list[str], int]]:
    """(imported memplan module, names imported from it, line) for every import in ``module``'s file;
    ``runtime_only`` leaves out the imports under ``if TYPE_CHECKING:``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree) if runtime_only else set()
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "memplan"]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target.split(".")[0] != "memplan":
                continue
            names = [a.name for a in node.names]
            # `from memplan.catalog import paths` imports the module memplan.catalog.paths
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if submodules:
                out += [(s, [], node.lineno) for s in submodules]
            out.append((target, [n for n in names if f"{target}.{n}" not in MODULES], node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("memplan.")):
            out.append((node.args[0].value, [], node.lineno))  # importlib.import_module("memplan.x") is an import
    return out


# The two places a lower wing loads the measurement wing, by design and only on demand: deriving the spec and the
# traced activation terms of an architecture without a hand-written family needs torch + transformers
# (memplan.measure); the planning layers load it only when a config has no family and nothing is cached
# (docs/memory-model.md, "Architectures without a family"). Every other upward import is an error.
PLUGIN_BOUNDARIES = {
    ("memplan.catalog.models.derive", "memplan.measure.derive_build"),
    ("memplan.plan.derived", "memplan.measure.derive_trace"),
}


def test_every_module_is_in_a_wing():
    assert set(map(_wing, MODULES)) <= set(RANK), sorted(set(map(_wing, MODULES)) - set(RANK))


def test_imports_point_one_way():
    wrong = []
    for module in MODULES:
        mine = _wing(module)
        for target, _, line in _imports(module):
            theirs = _wing(target)
            if theirs == mine:
                continue
            sibling = RANK[theirs] == RANK[mine]
            if (module, target) in PLUGIN_BOUNDARIES:
                continue
            if RANK[theirs] > RANK[mine] or sibling:
                wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the wing order:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in _imports(m, runtime_only=True) if t in MODULES and t != m} for m in MODULES}
    # a package's __init__ is imported by its submodules' import machinery, not by their code: ignore the
    # edge from a package to its own submodules (memplan.integrations -> .hf_callback is a lazy re-export)
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_name_crosses_a_module():
    crossing = []
    for module in MODULES:
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        aliases = {}  # local name -> memplan module it stands for
        for target, names, line in _imports(module):
            if target == module:
                continue
            crossing += [f"{MODULES[module].relative_to(ROOT)}:{line} imports {target}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("memplan.") and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node)
                for a in node.names:
                    if f"{target}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossing.append(f"{MODULES[module].relative_to(ROOT)}:{node.lineno} uses "
                                f"{aliases[node.value.id]}.{node.attr}")
    assert not crossing, "private names used outside their module:\n" + "\n".join(crossing)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_planning_wings_import_only_the_standard_library_and_rich():
    allowed = set(sys.stdlib_module_names) | {"rich", "memplan"}
    heavy = []
    for module in MODULES:
        if _wing(module) not in ("foundation", "catalog", "plan"):
            continue
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            heavy += [f"{module}:{node.lineno} {n}" for n in names if n.split(".")[0] not in allowed]
    # pynvml is the one exception: the local card for --gpu cuda, imported inside a function, optional
    assert [h for h in heavy if not h.endswith(" pynvml")] == []


# ---- what actually gets imported when planning ------------------------------------------------------------
HEAVY = ["torch", "transformers", "peft", "bitsandbytes", "pynvml", "accelerate", "pandas", "matplotlib"]

SCRIPT = """
import contextlib, io, json, sys
from memplan.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes = [main(["fit", "opt-13b", "--gpu", "3090"]), main(["estimate", "llama-2-7b", "--bits", "4"]),
             main(["models", "--json"]), main(["gpus", "--json"]),
             main(["fit", "mistral-7b-v0.1", "--gpu", "a6000", "--json"])]
heavy = %r
print(json.dumps({"codes": codes, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


def test_planning_leaves_heavy_packages_unimported():
    proc = subprocess.run([sys.executable, "-c", SCRIPT % HEAVY], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0, 0]
    assert result["loaded"] == []


def test_import_memplan_is_cheap():
    code = "import sys, memplan; print(sorted(m for m in sys.modules if m.startswith('memplan')))"
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "['memplan']"


CONFIG_SCRIPT = """
import contextlib, io, json, sys
import memplan.integrations.training_configs
from memplan.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    codes = [main(["estimate", "--model", "llama-2-7b", "--config", "tests/fixtures/training_args.json",
                   "--config", "tests/fixtures/adapter_config.json", "--config", "tests/fixtures/bnb_config.json"])]
heavy = %r
print(json.dumps({"codes": codes, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


def test_json_training_configs_leave_heavy_packages_and_yaml_unimported():
    proc = subprocess.run([sys.executable, "-c", CONFIG_SCRIPT % (HEAVY + ["yaml"])], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0]
    assert result["loaded"] == []
