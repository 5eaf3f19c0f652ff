"""Where a result came from: the source revision recorded in every benchmark and export report, and the identity of
the weights that made an embedding (an index or a merge refuses vectors of other weights: they share no space)."""

from __future__ import annotations

import hashlib
import json
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


def config_digest(cfg) -> str:
    """A short digest of a model config: two models of one name but other widths or gate never mix."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def checkpoint_sha256(checkpoint: str | Path | None) -> str:
    """The checkpoint file's SHA-256, or ``random-init`` for the seeded random weights the CLIs build without one."""
    if checkpoint is None:
        return "random-init"
    from priorclip.checkpoint import file_sha256

    return file_sha256(checkpoint)


IDENTITY_KEYS = ("model", "config_sha256", "checkpoint_sha256")
# The format of <out>.meta.json beside `priorclip embed`'s matrix: what `priorclip index --embeddings` reads.
EMBEDDINGS_FORMAT = "priorclip-embeddings/1"


def engine_identity(cfg, checkpoint_sha: str) -> dict:
    """What must match for two embeddings to be comparable: the model config and the weights (not the precision or
    the backend, which change an embedding only within its parity tolerance)."""
    return {"model": cfg.name, "config_sha256": config_digest(cfg), "checkpoint_sha256": checkpoint_sha}


def check_identity(have: dict, want: dict, what: str) -> None:
    """Raise a one-line :class:`~priorclip.errors.PriorCLIPError` naming the first field where two identities
    differ."""
    from priorclip.errors import PriorCLIPError

    for key in IDENTITY_KEYS:
        if have.get(key) != want.get(key):
            raise PriorCLIPError(f"{what} was made by other weights ({key}: {have.get(key)} there, {want.get(key)} "
                                 f"here); embeddings of different weights are not comparable")
