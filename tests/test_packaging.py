"""The package builds as pip builds it on a first `scripts/bootstrap`, without warnings."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_the_package_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    """A newcomer's first start printed ~50 lines of setuptools' "`project.license` as a TOML table is
    deprecated" (three times over) before the engine's first line: the license is an SPDX string."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "engine", src / "engine", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr
    assert [p.name for p in (tmp_path / "dist").glob("radbridge-*.whl")], out.stderr
    assert "deprecated" not in out.stderr.lower(), out.stderr
    assert "BuildBackendWarning" not in out.stderr, out.stderr
