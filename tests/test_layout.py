"""The package's shape: one namespace, imports one way
(cli -> pipeline, report -> stages -> core, targets, stores)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "apdkit": {"pipeline", "stages"},
    "cli": {"cli", "pipeline", "report", "stages", "core", "targets", "stores"},
    "pipeline": {"pipeline", "stages", "core", "targets", "stores"},
    "report": {"report", "stages", "core", "targets", "stores"},
    "stages": {"stages", "core", "targets", "stores"},
    "targets": {"targets", "core"},
    "core": {"core"},
    "stores": {"stores"},
}
TOP_LEVEL = {"cli", "pipeline", "report", "stages", "core", "targets", "stores"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_imports_run_one_way_and_only_through_the_namespace():
    wrong = []
    for folder, allowed in ALLOWED.items():
        for path in (ROOT / folder).rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] in TOP_LEVEL:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name} outside the apdkit namespace")
                elif parts[0] == "apdkit" and len(parts) > 1 and parts[1] not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_configs_are_a_leaf():
    assert not any(n.startswith("apdkit") for n in _imports(ROOT / "stages" / "config.py"))
