"""What the `pfi-rag` command prints: its own lines, not its libraries' chatter.

Flower, Ray, transformers, uvicorn and websockets log DEBUG lines, deprecation banners and
FutureWarnings that say nothing to a user of pfi-rag. By default the CLI shows pfi-rag's own
warnings and any library's errors; everything else goes to a log file when a command names one
(:func:`log_libraries_to`, e.g. the demo's ``logs/libraries.log``) and is dropped otherwise.
``--verbose`` shows all of it, and INFO from pfi-rag itself.

Subprocesses (Ray workers, SuperLink and SuperNodes) inherit environment variables that quiet
the same libraries there; an explicitly set variable is left as the user set it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Read by the libraries at import time, in this process and in every subprocess it starts.
QUIET_ENVIRONMENT = {
    "FLWR_LOG_LEVEL": "ERROR",  # Flower's console handler (its deprecation banners are WARNING)
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bars
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's FutureWarning about it, on every start
    "RAY_DEDUP_LOGS": "0",
}
OWN = "pfi_rag"
_MARK = "_pfi_rag_handler"  # our handlers carry this attribute, so configuring twice replaces them


class _OwnOrSerious(logging.Filter):
    """pfi-rag's own records at the handler's level; other libraries' only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name == OWN or record.name.startswith(OWN + ".")
        return own or record.levelno >= logging.ERROR


def configure(*, verbose: bool) -> None:
    """Set up the console output of one `pfi-rag` invocation (called before any command runs)."""
    root = logging.getLogger()
    _remove_ours(root)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    setattr(console, _MARK, True)
    if verbose:
        console.setLevel(logging.INFO)
        root.setLevel(logging.INFO)
        logging.captureWarnings(False)
    else:
        for key, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        console.setLevel(logging.WARNING)
        console.addFilter(_OwnOrSerious())
        root.setLevel(logging.WARNING)
        logging.captureWarnings(True)  # warnings become "py.warnings" records: filtered or filed
        _quiet_flower_console()
    root.addHandler(console)


def log_libraries_to(path: Path) -> logging.Handler:
    """Also write every record (libraries' DEBUG lines and warnings included) to ``path``.

    Returns the handler; :func:`stop_logging_to` removes it again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    setattr(handler, _MARK, root.level)  # the level to restore
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)  # the console handler keeps its own, higher level and filter
    return handler


def stop_logging_to(handler: logging.Handler) -> None:
    root = logging.getLogger()
    root.removeHandler(handler)
    handler.close()
    root.setLevel(getattr(handler, _MARK, logging.WARNING))


def _remove_ours(root: logging.Logger) -> None:
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
            handler.close()


def _quiet_flower_console() -> None:
    """Flower's own console handler, if Flower is already imported (else FLWR_LOG_LEVEL does it)."""
    if "flwr.supercore.logger" in sys.modules:
        from flwr.supercore.logger import update_console_handler

        update_console_handler(level=logging.ERROR, timestamps=False, colored=True)
