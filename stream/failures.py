"""Start-up failures an operator can fix, as one line each (`enactive-stream: error: …`,
exit status 2) instead of a traceback: a bad configuration file, key or value; an
unreadable or mismatched weights file; a missing device; a port in use; an unusable
checkpoint, state directory or recording file.

Light to import (the command line's `--help` needs it): the error classes are imported
when a failure is classified, not before."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

__all__ = ["check_state_dir", "print_error", "startup_cause"]


def _message_errors() -> tuple[type[BaseException], ...]:
    """Failures whose message is the whole cause (it names the key, file, address or value)."""
    from processors import ModelConfigError

    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .jetstream import NatsError
    from .lsl import LslError
    from .mqtt import MqttError
    from .net import ListenError
    from .recording import RecordingError

    return (
        ConfigError,
        CheckpointError,
        ModelConfigError,
        ListenError,
        NatsError,
        MqttError,
        LslError,
        RecordingError,
    )


def print_error(cause: str) -> None:
    """Print `cause` as the one line of a failed start."""
    sys.stderr.write(f"enactive-stream: error: {' '.join(cause.split())}\n")
    sys.stderr.flush()


def check_state_dir(directory: str) -> None:
    """Create `state.dir` if missing and check that a file can be written there, so the
    daemon refuses to start rather than fail its first checkpoint."""
    from .config import ConfigError

    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ConfigError(
            f"state.dir = {directory}: cannot be created or written: {e.strerror or e}"
        ) from None


def startup_cause(exc: BaseException, config: Config | None = None) -> str | None:
    """One line naming the cause when `exc` (the error, or an exception group from the
    daemon's task groups) is a start-up failure the operator can fix; None for anything
    else, which then propagates with its traceback."""
    causes = [_leaf_cause(leaf, config) for leaf in _leaves(exc)]
    if not causes or any(c is None for c in causes):
        return None
    return "; ".join(dict.fromkeys(c for c in causes if c is not None))


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _leaf_cause(exc: BaseException, config: Config | None) -> str | None:
    from processors import ParamsMismatchError

    if isinstance(exc, ParamsMismatchError):
        return f"model.params: {exc}"
    if isinstance(exc, _message_errors()):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None and config is not None:
        return f"{_config_key_of(exc.filename, config)}{exc.filename}: {exc.strerror or exc}"
    return None


def _config_key_of(filename: str | bytes, config: Config) -> str:
    """`"model.params = "` when `filename` is the path that key names, else `""`."""
    where = os.path.abspath(os.fsdecode(filename))
    for key, path in (
        ("model.params", config.model.params),
        ("output.jsonl", config.output.jsonl),
        ("state.dir", config.state.dir),
        ("record.path", config.record.path),
    ):
        if path and os.path.abspath(path) == where:
            return f"{key} = "
    return ""
