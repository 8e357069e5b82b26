"""The README's Python example and docs/api.md's examples run as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README, API = ROOT / "README.md", ROOT / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_script(code: str, path: Path, monkeypatch) -> str:
    """Run code as a script of its own (fresh globals, cwd = its folder); return stdout."""
    path.write_text(code)
    monkeypatch.chdir(path.parent)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(path), "exec"), {"__name__": "__main__"})
    return out.getvalue()


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    assert "MQA (2, 7, 1000)" in run_script(blocks[0], tmp_path / "readme.py", monkeypatch)


def test_api_doc_examples_run_in_order(tmp_path, monkeypatch):
    """The blocks of docs/api.md build on each other, so they run as one script."""
    blocks = python_blocks(API.read_text())
    assert len(blocks) >= 5
    run_script("\n".join(blocks), tmp_path / "api.py", monkeypatch)
    assert (tmp_path / "runs" / "lm" / "config.json").is_file()
