"""Suite-wide settings: strict dtype promotion, one persistent compilation cache, small
dims, and liblsl kept to this machine."""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

import jax
import pytest

import processors

jax.config.update("jax_numpy_dtype_promotion", "strict")

LSL_CONFIG = """\
; liblsl for the tests: discovery on this machine only, over IPv4 loopback (no network
; needed, none reached), errors only in the log.
[ports]
IPv6 = disable
[multicast]
ResolveScope = machine
[lab]
KnownPeers = {127.0.0.1}
[log]
level = -2
"""


def _lsl_config() -> None:
    """Point liblsl — here, and in the daemons and children started here — at
    `LSL_CONFIG`, unless `LSLAPICFG` already names a file (liblsl reads it once, at its
    first use in a process)."""
    if os.environ.get("LSLAPICFG"):
        return
    path = Path(tempfile.gettempdir()) / f"enactive-lsl-test-{os.getpid()}.cfg"
    path.write_text(LSL_CONFIG)
    atexit.register(path.unlink, missing_ok=True)
    os.environ["LSLAPICFG"] = str(path)


_lsl_config()

CACHE_DIR = os.environ.get("ENACTIVE_TEST_CACHE") or str(
    Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"
)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache() -> str:
    """JAX's persistent compilation cache, shared by the whole session (and by later runs)."""
    return processors.enable_compilation_cache(CACHE_DIR)


@pytest.fixture(scope="session")
def small_config() -> processors.ModelConfig:
    """A `ModelConfig` small enough that every test compiles in well under a second."""
    return processors.ModelConfig(
        state_dim=8,
        proprio_dim=6,
        tactile_dim=4,
        motor_dim=3,
        retention_depth=3,
        protention_horizon=2,
        som_grid=(3, 3),
        hidden_dim=8,
        attention_heads=2,
    )


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio (the daemon's backend), even where trio is installed."""
    return "asyncio"
