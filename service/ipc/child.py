"""What every child process of the supervisor does first: die with its parent, rebuild the settings, log."""

from __future__ import annotations

import importlib
import os
import signal
from typing import Any

from service.config import Settings
from service.logs import configure_logging


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, however it dies (even SIGKILL): no orphans.

    Linux's PR_SET_PDEATHSIG; the parent check closes the race of a supervisor that died before the call.
    """
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's own shutdown still stops the children
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def settings_for_child(settings_dump: dict[str, Any], parent: int) -> Settings:
    die_with_parent(parent)
    settings = Settings(**settings_dump)
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    return settings


def run(module: str, *args: Any) -> None:
    """The target of every child process: import ``module`` there (not in the supervisor, which then never loads
    ONNX Runtime or the web stack) and call its ``main(*args)``."""
    importlib.import_module(module).main(*args)
