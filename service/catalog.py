"""What an engine serves, as every process may know it: plain values that cross the IPC boundary, and nothing
that needs ONNX Runtime (API processes import this; only the engine process loads sessions).

- :class:`ModelDescriptor`: one served model version (name, version, variant, the providers really in use, the
  batching policy in force and the public manifest).
- :class:`RepositoryEntry`: one model of a repository and its state, for Triton's repository index.
- :func:`version_key`: how versions sort (numbers as numbers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelDescriptor:
    """What an API process needs to know about a served model (it never sees a session)."""

    name: str
    version: str
    bundle_path: str
    variant: str
    providers: list[str]
    threads: int
    solo_threads: int | None
    policy: dict[str, Any]  # the BatchPolicy in force, as a dict (it crosses the IPC boundary)
    manifest: dict[str, Any]  # the public manifest: no checksums, no absolute paths


@dataclass(frozen=True)
class RepositoryEntry:
    name: str
    version: str
    state: str  # READY, LOADING, UNAVAILABLE
    reason: str = ""


def version_key(version: str) -> tuple[Any, ...]:
    """Numeric versions compare as numbers (2 < 10), others as text."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-+]", version))
