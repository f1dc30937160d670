"""The layering of the code base, checked from the source.

1. No import cycle between modules, nor between sub-packages (``meshpilot.orchestrator.sim``,
   ``meshpilot.strategies.zo``, ``meshpilot.launch`` ...). Every import statement counts, also those
   inside functions and under ``TYPE_CHECKING``: a cycle hidden in a lazy import is still a cycle.
2. The driver commands work with torch not importable (the driver never imports torch).
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from no_torch import no_torch_code, run_without

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"orchestrator": "meshpilot.orchestrator", "strategies": "meshpilot.strategies", "comm": "meshpilot.comm",
            "launch": "meshpilot.launch", "cluster_configs": "meshpilot.cluster_configs"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The meshpilot modules that ``name`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    base = name if _is_package(path) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                anchor = base.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                mod = ".".join(anchor + ([mod] if mod else []))
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            # the longest known module that prefixes the target (``from pkg import submodule`` included)
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def _owner(mod: str, packages: set[str]) -> str:
    """The node of ``mod`` in the sub-package graph: its package (itself for a package), except that the
    modules at the root of ``meshpilot.orchestrator`` (errors, atomic_io, the worker shim) are nodes of
    their own, since that root is a namespace of layers rather than one layer."""
    owner = mod if mod in packages else mod.rpartition(".")[0]
    return mod if owner == "meshpilot.orchestrator" else owner


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes, first == last), or None. Iterative DFS."""
    colour: dict[str, int] = {}
    for start in sorted(graph):
        if colour.get(start):
            continue
        stack = [(start, iter(sorted(graph.get(start, ()))))]
        path = [start]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            c = colour.get(nxt, 0)
            if c == 1:
                return path[path.index(nxt):] + [nxt]
            if c == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_between_modules():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
    graph = _graph()
    packages = {m for m, p in _modules().items() if _is_package(p)}
    pkg_graph: dict[str, set[str]] = {}
    for mod, deps in graph.items():
        src = _owner(mod, packages)
        for d in deps:
            dst = _owner(d, packages)
            if dst != src:
                pkg_graph.setdefault(src, set()).add(dst)
    cycle = _find_cycle(pkg_graph)
    assert cycle is None, "sub-package cycle: " + " -> ".join(cycle)


def test_launch_depends_on_the_protocol_not_the_controller():
    graph = _graph()
    bad = {m: sorted(d for d in deps if d == "meshpilot.orchestrator.run.controller")
           for m, deps in graph.items() if m.startswith("meshpilot.launch")}
    assert not any(bad.values()), bad


# --- the driver without torch ---------------------------------------------------------------

JOB = textwrap.dedent("""
    model: {arch: llama, layers: 2, hidden: 64, heads: 4, vocab: 256}
    cluster: local
    train: {seq_len: 32, global_batch: 4, steps: 2}
    plan: {dp: 1}
""")


def _no_torch(args: list[str], home: Path) -> subprocess.CompletedProcess:
    return run_without(args, home)


@pytest.mark.parametrize("args", [
    ["presets"],
    ["validate", "{job}", "cluster.gpus_per_node=1"],
    ["simulate", "{job}", "cluster.gpus_per_node=1"],
    ["plan", "{job}", "plan=auto", "cluster.gpus_per_node=1", "--top", "3"],
    ["status"],
])
def test_driver_commands_work_without_torch(tmp_path, args):
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    r = _no_torch([a.format(job=job) for a in args], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("cmd", [["logs", "no-such-run"], ["cancel", "no-such-run"]])
def test_run_commands_fail_cleanly_without_torch(tmp_path, cmd):
    r = _no_torch(cmd, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no-such-run" in r.stderr, r.stdout + r.stderr


def test_the_no_torch_harness_blocks_torch(tmp_path):
    r = subprocess.run([sys.executable, "-c", no_torch_code(body="import torch")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "not importable" in r.stderr
