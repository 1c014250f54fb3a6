"""The architecture as a contract: the layer order (pyproject.toml ``[tool.importlinter]``, checked by
import-linter) and imports at module top (a function-local import of the project's own modules says why)."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "rsd"


def test_layer_contract_is_kept() -> None:
    """``lint-imports`` (import-linter) passes: every module imports only from its own layer or lower ones."""
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = out.stdout + out.stderr
    assert out.returncode == 0 and "KEPT" in report and "BROKEN" not in report, report


def _comment_lines(source: str) -> set[int]:
    """Line numbers that hold a comment (on their own or after code)."""
    return {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type == tokenize.COMMENT}


def _is_project_import(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "rsd" or a.name.startswith("rsd.") for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.level > 0 or node.module == "rsd" or (node.module or "").startswith("rsd.")
    return False


def undocumented_local_imports(path: Path) -> list[str]:
    """``file:line`` of every function-local import of an ``rsd`` module without a comment on its own lines or
    on the line above it (for a run of consecutive imports: above the run's first one)."""
    source = path.read_text()
    comments = _comment_lines(source)
    found = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        imports = [n for n in ast.walk(func) if isinstance(n, ast.Import | ast.ImportFrom)]
        import_lines = {ln for n in imports for ln in range(n.lineno, (n.end_lineno or n.lineno) + 1)}
        for node in imports:
            if not _is_project_import(node):
                continue
            own = set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
            above = node.lineno - 1
            while above in import_lines:  # the run of imports this one belongs to
                above -= 1
            if not (own & comments or above in comments):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return sorted(set(found))


def test_local_project_imports_say_why() -> None:
    """Imports sit at module top; a function-local import of an ``rsd`` module (an optional heavy dependency,
    torch kept out of a config check, an import cycle) carries a comment saying why."""
    bad = [hit for path in sorted(SRC.rglob("*.py")) for hit in undocumented_local_imports(path)]
    assert not bad, ("function-local imports of rsd modules without a comment saying why (move them to the "
                     "module top, or comment why they must stay lazy):\n" + "\n".join(bad))


def test_the_import_check_sees_an_undocumented_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    import os\n    from rsd.utils import errors\n\n\n"
                   "def g():\n    # lazy: keeps torch out\n    from rsd.a import b\n    from rsd.c import d\n\n\n"
                   "def h():\n    from rsd.e import (  # lazy: cycle\n        f,\n    )\n")
    assert undocumented_local_imports(mod) == ["m.py:3"]
