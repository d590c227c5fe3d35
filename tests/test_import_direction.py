"""Imports flow one way (docs/architecture.md): read every module's imports with ``ast`` and check the arrows.

Every import counts, at module level or inside a function (a lazy import is still an arrow). An
import of ``a.b.c`` is an arrow to the module ``a.b.c``, not to its parent packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# source folder -> import name (pyproject/setup.py ``package-dir``: the side folders live inside miles_envs)
FOLDERS = {
    "miles_envs": "miles_envs", "agents": "miles_envs.agents", "registry": "miles_envs.registry",
    "sandbox": "miles_envs.sandbox", "trainer": "miles_envs.trainer",
}
SIDE = ("miles_envs.agents", "miles_envs.trainer", "miles_envs.sandbox")
OUTER = ("miles_envs.cli", "miles_envs.pipeline")  # the CLI and the orchestration layer may import anything

# Declared arrows from the core into a side folder, each with its reason.
ALLOWED = {
    ("miles_envs.envs.code_exec", "miles_envs.sandbox"): "the code-execution envs run code in a sandbox",
    ("miles_envs.envs.code_exec", "miles_envs.sandbox.budget"): "the code-execution envs meter their sandbox use",
    ("miles_envs.envs.code_exec_repo", "miles_envs.sandbox"): "the repository env family runs commands in a sandbox",
    ("miles_envs.envs.code_exec_repo", "miles_envs.sandbox.budget"): "the repository env family meters its sandbox use",
    ("miles_envs.envs.exec_feedback", "miles_envs.sandbox"): "describes a sandbox's ExecResult to the model",
    ("miles_envs.integrations.miles", "miles_envs.agents.sglang"): "the Miles rollout function is an SGLang client",
    ("miles_envs.integrations.miles", "miles_envs.agents.sglang_wire"): "it reads Miles' SGLang sampling params",
}
# What the trainer may not reach: it consumes batches and produces weights and metrics.
TRAINER_MUST_NOT_IMPORT = (
    "miles_envs.agents", "miles_envs.sandbox", "miles_envs.registry", "miles_envs.pipeline", "miles_envs.cli",
    "miles_envs.loop", "miles_envs.multi_loop", "miles_envs.session", "miles_envs.runner", "miles_envs.envs",
    "miles_envs.parsers",
)


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def import_graph() -> nx.DiGraph:
    """module -> modules it imports (anywhere in its body), with the line of the first such import."""
    known = modules()

    def target(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for module, path in known.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                names = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in ``base``
            else:
                continue
            for name in names:
                imported = target(name)
                if imported is not None and imported != module and not graph.has_edge(module, imported):
                    graph.add_edge(module, imported, line=node.lineno)
    return graph


def within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def is_core(module: str) -> bool:
    return not within(module, SIDE + OUTER)


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    return import_graph()


def arrow(graph: nx.DiGraph, a: str, b: str) -> str:
    return f"{a} -> {b} ({modules()[a].relative_to(ROOT)}:{graph.edges[a, b]['line']})"


def test_the_graph_sees_the_package_dir_mapping_and_lazy_imports(graph):
    assert graph.has_edge("miles_envs.agents.embedded", "miles_envs.engine")  # agents/ is miles_envs.agents
    assert graph.has_edge("miles_envs.registry.core", "miles_envs.envs")  # an import inside a function
    assert graph.has_edge("miles_envs.checker", "miles_envs.checker_multi")


def test_the_core_reaches_side_folders_only_through_declared_arrows(graph):
    found = {(a, b) for a, b in graph.edges if is_core(a) and within(b, SIDE + OUTER)}
    undeclared = sorted(found - set(ALLOWED))
    assert not undeclared, "new arrows from the core into agents/trainer/sandbox/cli/pipeline:\n" + "\n".join(
        arrow(graph, a, b) for a, b in undeclared
    )
    assert not set(ALLOWED) - found, f"declared arrows that no longer exist (drop them): {sorted(set(ALLOWED) - found)}"


def test_agents_sandbox_and_registry_never_import_the_trainer(graph):
    bad = [(a, b) for a, b in graph.edges
           if within(a, ("miles_envs.agents", "miles_envs.sandbox", "miles_envs.registry")) and within(b, ("miles_envs.trainer",))]
    assert not bad, "\n".join(arrow(graph, a, b) for a, b in bad)


def test_the_trainer_consumes_batches_and_drives_no_rollout(graph):
    bad = [(a, b) for a, b in graph.edges if within(a, ("miles_envs.trainer",)) and within(b, TRAINER_MUST_NOT_IMPORT)]
    assert not bad, "\n".join(arrow(graph, a, b) for a, b in bad)


def test_no_import_circles(graph):
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    described = [" -> ".join(a for a, _ in nx.find_cycle(graph.subgraph(c))) for c in circles]
    assert not circles, "import circles:\n" + "\n".join(described)
