"""JIT machinery: compile or fall back loudly, count compilations, keep a persistent cache.

The research framework this replaces fell back to eager execution *silently*. Here a
fallback still keeps the function working, but every distinct failure is reported to a
listener (that is how the daemon counts `jit_fallback_total`), and it can be switched off.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

__all__ = [
    "CompilationCounter",
    "JITCompilationError",
    "JITStrategy",
    "enable_compilation_cache",
    "get_jit_info",
    "safe_jit",
]

F = TypeVar("F", bound=Callable[..., Any])
FallbackListener = Callable[[str, str], None]

# Emitted once per new executable, whether it is then compiled or read from the
# persistent cache: the honest measure of "the hot path built something".
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


class JITCompilationError(RuntimeError):
    """A function could not be compiled or run compiled, and fallback is switched off."""


class JITStrategy(enum.Enum):
    """How a processor's step is executed.

    - `JIT`: compiled; a failure raises.
    - `SAFE`: compiled, falling back to eager execution on failure (reported).
    - `EAGER`: never compiled (debugging, or the original framework's behaviour).
    """

    JIT = "jit"
    SAFE = "safe"
    EAGER = "eager"


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    leaves, treedef = jax.tree.flatten((args, kwargs))
    sig: list[Hashable] = [treedef]
    for leaf in leaves:
        if isinstance(leaf, (jax.Array, np.ndarray)):
            sig.append((leaf.shape, str(leaf.dtype)))
        elif isinstance(leaf, Hashable):
            sig.append((type(leaf), leaf))
        else:
            sig.append(repr(type(leaf)))
    return tuple(sig)


def safe_jit(
    fn: F,
    *,
    static_argnames: str | Sequence[str] | None = None,
    donate_argnums: int | Sequence[int] | None = None,
    device: jax.Device | None = None,
    on_fallback: FallbackListener | None = None,
    fallback: bool = True,
) -> F:
    """Compile `fn` with `jax.jit`; if compiling or running it fails, run it eagerly.

    **Arguments:**

    - `fn`: a pure function of arrays (and static arguments).
    - `static_argnames`, `donate_argnums`: as for `jax.jit`. Arguments that are not
        arrays (functions, modules with callables) are made static by `eqx.filter_jit`
        semantics automatically.
    - `device`: where array arguments are placed before the call; None leaves them where
        they are (JAX's default device).
    - `on_fallback`: called as `on_fallback(name, reason)` once per distinct failure
        (`reason` is the exception's class name, a bounded label).
    - `fallback`: when False, a failure raises `JITCompilationError` instead.

    **Returns:** a function with `fn`'s signature. `wrapper.fallbacks` lists
    `(reason, message)` of every distinct failure seen.

    A signature (shapes, dtypes, static values) that failed once goes straight to eager
    execution afterwards, without trying to compile again. If `fn` donates buffers and
    fails *while running* after they were donated, the inputs are gone: that case
    raises `JITCompilationError` whatever `fallback` says.
    """
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", "function"))
    if static_argnames is None and donate_argnums is None:
        jitted: Callable[..., Any] = eqx.filter_jit(fn)
    else:
        jitted = jax.jit(fn, static_argnames=static_argnames, donate_argnums=donate_argnums)
    failed: set[Hashable] = set()
    fallbacks: list[tuple[str, str]] = []
    lock = threading.Lock()

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if device is not None:
            args, kwargs = jax.device_put((args, kwargs), device)
        sig = _signature(args, kwargs)
        if sig not in failed:
            try:
                return jitted(*args, **kwargs)
            except Exception as e:
                if not fallback:
                    raise JITCompilationError(f"{name}: {type(e).__name__}: {e}") from e
                if any(
                    isinstance(x, jax.Array) and x.is_deleted()
                    for x in jax.tree.leaves((args, kwargs))
                ):
                    raise JITCompilationError(
                        f"{name} failed after its inputs were donated; cannot fall back: {e}"
                    ) from e
                reason = type(e).__name__
                with lock:
                    failed.add(sig)
                    new = all(r != reason for r, _ in fallbacks)
                    fallbacks.append((reason, str(e)))
                if on_fallback is not None and new:
                    on_fallback(name, reason)
        return fn(*args, **kwargs)

    wrapper.fallbacks = fallbacks  # type: ignore[attr-defined]
    return wrapper  # type: ignore[return-value]


class CompilationCounter:
    """Counts the executables JAX builds in this process, split at `seal()`.

    Before `seal()` a compilation counts as warm-up; after, as runtime — which the
    daemon requires to stay zero — except on a thread inside `in_background()`: there it
    counts as background, the executables the daemon still compiles on purpose, off the
    hot path, after it became ready. `listener(phase)` is called for every compilation
    (`"warmup"`, `"background"` or `"runtime"`). Use as a context manager, or call
    `close()`, to stop counting.
    """

    def __init__(self, listener: Callable[[str], None] | None = None) -> None:
        self.warmup = 0
        self.background = 0
        self.runtime = 0
        self.sealed = False
        self._listener = listener
        self._lock = threading.Lock()
        self._local = threading.local()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration_secs: float, **kwargs: str | int) -> None:
        if event != LOWERING_EVENT:
            return
        with self._lock:
            if not self.sealed:
                phase = "warmup"
                self.warmup += 1
            elif getattr(self._local, "background", False):
                phase = "background"
                self.background += 1
            else:
                phase = "runtime"
                self.runtime += 1
        if self._listener is not None:
            self._listener(phase)

    @contextlib.contextmanager
    def in_background(self) -> Iterator[None]:
        """Compilations by the calling thread inside the block count as background once
        sealed (the thread's own: JAX reports a compilation on the thread that asked for
        it, so the hot path's stay runtime)."""
        before = getattr(self._local, "background", False)
        self._local.background = True
        try:
            yield
        finally:
            self._local.background = before

    def seal(self) -> None:
        """From now on every compilation counts as runtime (or background)."""
        self.sealed = True

    def close(self) -> None:
        """Stop listening."""
        jax.monitoring.unregister_event_duration_listener(self._on_event)

    def __enter__(self) -> CompilationCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def enable_compilation_cache(path: str | os.PathLike[str]) -> str:
    """Turn on JAX's persistent compilation cache in `path` (created if missing), caching
    every executable however quick it was to build, so a restart warms in seconds.

    **Returns:** the absolute cache directory.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    if _flag("jax_compilation_cache_dir") != path:
        compilation_cache.set_cache_dir(path)
        # A compile before this point may have decided "no cache" for the process.
        compilation_cache.reset_cache()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def _flag(name: str) -> Any:
    return getattr(jax.config, name)  # typed stubs do not list JAX's flags


def get_jit_info() -> dict[str, Any]:
    """What the JIT will run on: `backend`, `devices`, `device_count`, `jax_version`,
    `jaxlib_version`, `equinox_version`, `compilation_cache_dir` (None when off), `x64`."""
    import jaxlib

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "devices": [
            f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in devices
        ],
        "device_count": len(devices),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "equinox_version": eqx.__version__,
        "compilation_cache_dir": _flag("jax_compilation_cache_dir") or None,
        "x64": bool(_flag("jax_enable_x64")),
    }
