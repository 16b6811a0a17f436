"""The package layout docs/architecture.md describes: layers import downwards only, no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {
    # module (or package) of rec_rllib -> layer: a module imports only from its own layer or below
    "columns": 0,
    "config": 0,
    "fsutil": 0,
    "topk": 0,
    "retrieval": 0,
    "data": 0,
    "recommender": 1,
    "models": 1,
    "finetune": 1,
    "finetune_ray": 1,
    "eval": 1,
    "exposure": 1,
    "explore": 1,
    "replay": 2,
    "simulator": 2,
    "env": 2,
    "rl": 3,
    "loop": 3,
}


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every project module ``path`` imports, at the top or inside a function (``from a import b`` counts
    ``a.b`` when ``a.b`` is a module, else ``a``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in ("rec_rllib", "serving", "jobs")}


def _is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _graph(package: str) -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted((REPO / package).rglob("*.py"))}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1]]


def test_every_library_module_has_a_layer():
    assert all(m.split(".")[1] in LAYERS for m in _graph("rec_rllib") if m != "rec_rllib")


def test_the_library_imports_downwards_only_and_never_jobs_or_serving():
    upward = []
    for module, imports in _graph("rec_rllib").items():
        for imp in imports:
            outside = not imp.startswith("rec_rllib.")
            if outside or (module != "rec_rllib" and _layer(imp) > _layer(module)):
                upward.append(f"{module} -> {imp}")
    assert not upward, upward


def test_no_import_cycles():
    graph = {m: deps for pkg in ("rec_rllib", "serving", "jobs") for m, deps in _graph(pkg).items()}
    # a module importing its own package's __init__ (``from rec_rllib.data import fetch``) is not a cycle
    edges = {m: {d for d in deps if d in graph and not m.startswith(d + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join([*path[path.index(d) :], d]))
            elif d not in state:
                visit(d, [*path, d])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_the_code_passes_the_linter_and_the_formatter():
    """ruff with the project's rules (pyproject.toml: lines of at most 110 characters, no per-line
    exemptions) and its formatting, as `make lint` checks them."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is in the dev extra: pip install -e '.[dev]'"
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([ruff, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    code = [
        p
        for d in ("rec_rllib", "serving", "jobs", "bench", "tests", "cluster")
        for p in (REPO / d).rglob("*.py")
    ]
    marker = "# fmt" + ": skip"  # (spelt in two parts so that this file does not count)
    skips = [p for p in code if marker in p.read_text()]
    assert len(skips) <= 3, skips
