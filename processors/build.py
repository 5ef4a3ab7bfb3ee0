"""From a `ModelConfig` to a ready model, and the fingerprint a checkpoint is tied to.

Initialising the parameters from a seed runs a few dozen small JAX operations one by one,
each compiled on first use: the uniform draws alone, one `jax.random.uniform` executable
per layer shape (18 at the default sizes), took ~4 s of XLA compilation on the 2-core
reference machine with an empty compilation cache, and finding them all in a warm one ~1 s
of tracing and lowering. So `build_model` draws every uniform from one flat executable —
the same bits: with JAX's partitionable threefry an element's bits depend only on the key
and its flat index, not on the shape drawn — and, with `cache_dir`, keeps the initialised
parameters in a file of the cache, named by everything they depend on, and reads them back
at the next start.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .model import EnactiveModel
from .params import ParamsMismatchError, load_params, save_params

__all__ = ["abstract_model", "build_model", "model_fingerprint"]

log = logging.getLogger(__name__)

_SOURCES = Path(__file__).resolve().parent


def abstract_model(model_config: ModelConfig) -> EnactiveModel:
    """The model's structure without its values: every array a `jax.ShapeDtypeStruct`.

    Traced, not run: nothing is compiled. Enough to compile the model's executables (only
    shapes matter there) while the parameters are still being made, and to read a
    parameter file into. Traced once per configuration (a few hundred ms the first time
    in a process), however many threads ask at once.
    """
    with _abstract_lock:
        return _abstract_model(model_config)


_abstract_lock = threading.Lock()


@functools.lru_cache(maxsize=16)
def _abstract_model(model_config: ModelConfig) -> EnactiveModel:
    key = jax.eval_shape(jax.random.PRNGKey, 0)
    return eqx.filter_eval_shape(EnactiveModel, model_config, key)


def build_model(
    model_config: ModelConfig,
    *,
    seed: int,
    params: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> EnactiveModel:
    """The model `model_config` describes.

    **Arguments:**

    - `model_config`: the sizes and constants.
    - `seed`: initialises the parameters (`jax.random.PRNGKey(seed)`).
    - `params`: a file written by `save_params` to load them from instead; `None` or `""`
        keeps the initialisation.
    - `cache_dir`: where to keep the initialised parameters for the next call (a file
        `enactive-params-<hash>.eqx`, the hash of the configuration, the seed, the source
        of this package, the JAX, jaxlib and Equinox versions, the backend and JAX's
        settings); a file there is read instead of initialising again. A file that cannot
        be read or written is ignored. `None`: no cache.

    **Returns:** an `EnactiveModel`, the same whether initialised or read back:
    `EnactiveModel(model_config, key=jax.random.PRNGKey(seed))`, or the file's parameters.

    **Raises:** `ParamsMismatchError` when the `params` file does not fit this model or
    cannot be parsed; `OSError` (`FileNotFoundError`, …) when it cannot be opened.
    """
    if params:  # its values replace the initialisation: skip it
        return load_params(abstract_model(model_config), params)
    cached = _init_cache_file(cache_dir, model_config, seed) if cache_dir else None
    if cached is not None and cached.exists():
        try:
            return load_params(abstract_model(model_config), cached)
        except (OSError, ParamsMismatchError) as e:
            log.warning("ignoring the cached parameters %s: %s", cached, e)
    with _uniform_from_one_executable():
        model = EnactiveModel(model_config, key=jax.random.PRNGKey(seed))
    if cached is not None:
        try:
            save_params(model, cached)
        except OSError as e:
            log.warning("could not cache the initialised parameters in %s: %s", cached, e)
    return model


_FLAT_DRAW = 1 << 16
"""Elements of the flat uniform draw every smaller one is sliced from (more: the next power
of two). Drawing 65,536 floats costs ~0.1 ms; compiling one more shape ~0.2 s."""
_uniform_lock = threading.Lock()
_uniform_here = threading.local()


@contextlib.contextmanager
def _uniform_from_one_executable() -> Iterator[None]:
    """Inside the block, on this thread, `jax.random.uniform(key, shape, ...)` is
    `jax.random.uniform(key, (N,), ...)[:size].reshape(shape)` for one N: bit for bit the
    same values (partitionable threefry draws an element from its key and flat index), from
    one compiled executable instead of one per shape. Elsewhere, and for anything but a
    concrete key with scalar bounds, `jax.random.uniform` is itself."""
    settings = jax.config.values
    if not settings.get("jax_threefry_partitionable") or (
        settings.get("jax_default_prng_impl") != "threefry2x32"
    ):
        yield
        return
    with _uniform_lock:
        original = jax.random.uniform

        def uniform(
            key: Any,
            shape: Sequence[int] = (),
            dtype: Any = None,
            minval: Any = 0.0,
            maxval: Any = 1.0,
            **kwargs: Any,
        ) -> Any:
            if (
                kwargs
                or not getattr(_uniform_here, "active", False)
                or any(isinstance(a, jax.core.Tracer) for a in (key, minval, maxval))
                or np.ndim(minval)
                or np.ndim(maxval)
            ):
                return original(key, shape, dtype, minval, maxval, **kwargs)
            size = math.prod(shape)
            flat = (max(_FLAT_DRAW, 1 << (size - 1).bit_length()),)
            drawn = np.asarray(original(key, flat, dtype, minval, maxval))
            return jnp.asarray(drawn[:size].reshape(shape))

        jax.random.uniform = uniform
        _uniform_here.active = True
        try:
            yield
        finally:
            _uniform_here.active = False
            jax.random.uniform = original


def _init_cache_file(cache_dir: str | os.PathLike[str], config: ModelConfig, seed: int) -> Path:
    """The file of the parameters `config` and `seed` initialise, keyed by everything the
    values depend on: a change to any of it names another file."""
    import jaxlib

    digest = hashlib.sha256()
    for path in sorted(_SOURCES.glob("*.py")):  # the model's code: this package
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    settings = {
        "config": repr(config),
        "seed": seed,
        "versions": [jax.__version__, jaxlib.__version__, eqx.__version__],
        "backend": jax.default_backend(),
        "jax_config": sorted((k, repr(v)) for k, v in jax.config.values.items()),
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return Path(cache_dir) / f"enactive-params-{digest.hexdigest()[:32]}.eqx"


def model_fingerprint(model_config: ModelConfig, capacity: int) -> dict[str, Any]:
    """What a checkpoint must have been written for to be restored into this model.

    **Arguments:** `model_config`; `capacity`, the state slab's rows.

    **Returns:** `{"dims": [D, P, T, M], "model": [R, H, hidden, [rows, cols], heads],
    "capacity": capacity}`, plain ints and lists (JSON-ready). The layout is part of the
    checkpoint format: changing it makes existing checkpoints unloadable.
    """
    m = model_config
    return {
        "dims": [m.state_dim, m.proprio_dim, m.tactile_dim, m.motor_dim],
        "model": [
            m.retention_depth,
            m.protention_horizon,
            m.hidden_dim,
            list(m.som_grid),
            m.attention_heads,
        ],
        "capacity": capacity,
    }
