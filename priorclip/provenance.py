"""Where a result came from: the source revision recorded in every benchmark and export report."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_revision(repo: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` (+dirty) of the source tree, else ``$PRIORCLIP_GIT_REVISION`` (for copies without .git)."""
    repo = repo or Path(__file__).resolve().parents[1]  # the checkout holding this package
    env = os.environ.get("PRIORCLIP_GIT_REVISION") or None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return env
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return env
