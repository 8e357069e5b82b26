"""The README's Python example and docs/api.md's examples run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README, API = ROOT / "README.md", ROOT / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_script(code: str, cwd: Path) -> str:
    script = cwd / "example.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_readme_python_example_runs(tmp_path):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python block"
    assert "MQA (2, 7, 1000)" in run_script(blocks[0], tmp_path)


def test_api_doc_examples_run_in_order(tmp_path):
    """The blocks of docs/api.md build on each other, so they run as one script."""
    blocks = python_blocks(API.read_text())
    assert len(blocks) >= 5
    run_script("\n".join(blocks), tmp_path)
    assert (tmp_path / "runs" / "lm" / "config.json").is_file()
