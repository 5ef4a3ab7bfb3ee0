"""Ahead-of-time compiled, slot-indexed batched steps over a device-resident state slab.

The slab holds every stream's state with a leading `capacity` axis. One executable per
batch bucket gathers the batch's slots, steps them with `jax.vmap(model)`, scatters them
back and returns one packed float32 record per row — with the slab donated, so it is
updated in place. Pad rows (valid flag clear) read nothing and write nothing.

Host ⇄ device per batch: `x` (float32 `(B, D+P+T+M)`, the wire payloads as they are) and
`meta` (int32 `(B, 2)`: slot, flags) in; records (float32 `(B, K+D+P+M+3)`) out.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .model import EnactiveModel, EnactiveState, pack_record

__all__ = ["FLAG_RESET", "FLAG_VALID", "SNAPSHOT_ROWS", "SlabSnapshot", "SlabStep"]

FLAG_VALID = 1 << 4
"""`meta[:, 1]` bit: this row is a real frame (bits 0–3 are the modality presence flags)."""
FLAG_RESET = 1 << 5
"""`meta[:, 1]` bit: start this row's stream from a fresh state (a new stream)."""


def _slab_step(
    static: EnactiveModel,
    params: EnactiveModel,
    slab: EnactiveState,
    x: jax.Array,
    meta: jax.Array,
) -> tuple[EnactiveState, jax.Array]:
    model = eqx.combine(params, static)
    capacity = jax.tree.leaves(slab)[0].shape[0]
    cfg = model.config
    flags = meta[:, 1]
    present = (flags[:, None] >> jnp.arange(4, dtype=jnp.int32)) & 1 == 1
    valid = flags & FLAG_VALID != 0
    reset = flags & FLAG_RESET != 0
    index = jnp.where(valid, meta[:, 0], capacity)  # out of range: gathers zeros, drops writes
    states = jax.tree.map(lambda s: s.at[index].get(mode="fill", fill_value=0), slab)
    fresh = model.init_state()
    states = jax.tree.map(
        lambda s, f: jnp.where(reset.reshape((-1,) + (1,) * f.ndim), f, s), states, fresh
    )
    cuts = np.cumsum([cfg.state_dim, cfg.proprio_dim, cfg.tactile_dim])
    sensory, proprio, tactile, motor = jnp.split(x, cuts, axis=1)
    new, out = jax.vmap(model)(states, sensory, proprio, tactile, motor, present)
    slab = jax.tree.map(lambda s, n: s.at[index].set(n, mode="drop"), slab, new)
    return slab, jax.vmap(pack_record)(out)


def _read_slot(slab: EnactiveState, slot: jax.Array) -> EnactiveState:
    return jax.tree.map(lambda s: s[slot], slab)


def _write_slot(slab: EnactiveState, slot: jax.Array, state: EnactiveState) -> EnactiveState:
    return jax.tree.map(lambda s, v: s.at[slot].set(v), slab, state)


def _gather_rows(slab: EnactiveState, slots: jax.Array) -> EnactiveState:
    return jax.tree.map(lambda s: s[slots], slab)


def _array_like(x: Any) -> bool:
    """An array, or the shape of one (the leaves of `processors.abstract_model`)."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _spec(leaf: Any, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(
        np.shape(leaf),
        leaf.dtype,
        sharding=sharding,
        weak_type=bool(getattr(leaf, "weak_type", False)),
    )


SNAPSHOT_ROWS = 256
"""Slab rows one compiled snapshot gather copies (a snapshot takes as many as it needs)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SlabSnapshot:
    """Rows of a slab copied on the device by `SlabStep.snapshot`, in the order asked.

    `to_host()` waits for the copies and returns the rows as host numpy arrays (call it
    off the event loop).
    """

    chunks: list[EnactiveState]
    rows: int
    empty: Any  # the host pytree with no rows, for a snapshot of none

    def to_host(self) -> Any:
        if not self.chunks:
            return self.empty
        host = jax.device_get(self.chunks)
        return jax.tree.map(lambda *xs: np.concatenate(xs)[: self.rows], *host)


class SlabStep:
    """One `EnactiveModel` compiled for a fixed set of batch sizes over a state slab.

    ```python
    step = SlabStep(model, buckets=(1, 8, 64), capacity=1024)
    step.compile()                         # every bucket, before serving
    slab = step.init_slab()
    slab, records, eager = step(slab, x, meta)   # x, meta sized to a compiled bucket
    ```

    Buckets can also be compiled one at a time (`compile_bucket`, then `compile_helpers`
    once), from another thread while this one serves: only buckets already compiled are
    ever used (`ready_buckets`, `bucket_for`), and nothing here compiles on a call. The
    compilation needs only the model's shapes, so `model` may be its structure
    (`processors.abstract_model`), with the parameters given later by `bind(model)`,
    before anything runs.

    **Arguments:**

    - `model`: the `EnactiveModel` (its parameters travel as an argument, not as
        constants baked into the executables), or its structure: `bind` the model later.
    - `buckets`: batch sizes to compile, e.g. `(1, 8, 32, 64, 96, 128, 192, 256)`.
    - `capacity`: streams the slab holds; rounded up to a multiple of the device count.
    - `devices`: devices to shard the slab and the batches over (default: the first
        local device). With several, the slab's stream axis and each bucket's batch axis
        are split across them (`jax.sharding`).
    - `on_fallback`: `on_fallback(name, reason)` when a bucket cannot be compiled or run
        and falls back to eager execution of the same batched step.
    """

    def __init__(
        self,
        model: EnactiveModel,
        *,
        buckets: Sequence[int],
        capacity: int,
        devices: Sequence[jax.Device] | None = None,
        on_fallback: Callable[[str, str], None] | None = None,
    ) -> None:
        if not buckets or any(b < 1 for b in buckets):
            raise ValueError(f"buckets = {list(buckets)!r}: need one or more positive sizes")
        self.model = model
        self.params, self.static = eqx.partition(model, _array_like)
        self.buckets = tuple(sorted(set(buckets)))
        devices = list(devices) if devices else jax.local_devices()[:1]
        self.mesh = Mesh(np.array(devices), ("d",))
        n = len(devices)
        self.capacity = -(-capacity // n) * n
        cfg = model.config
        self.input_width = cfg.state_dim + cfg.proprio_dim + cfg.tactile_dim + cfg.motor_dim
        assert cfg.moment_dim is not None
        self.record_width = cfg.moment_dim + cfg.state_dim + cfg.proprio_dim + cfg.motor_dim + 3
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._split = NamedSharding(self.mesh, PartitionSpec("d"))
        self._on_fallback = on_fallback
        # What the executables are compiled for: shapes, dtypes and placements only.
        leaves, self._param_def = jax.tree.flatten(self.params)
        self._param_specs = [_spec(leaf, self._replicated) for leaf in leaves]
        self._fresh_spec = eqx.filter_eval_shape(lambda m: m.init_state(), model)
        self._slab_sharding = jax.tree.map(lambda _: self._split, self._fresh_spec)
        self.executables: dict[int, Any] = {}
        self.eager_buckets: dict[int, str] = {}
        self.compile_seconds: dict[int, float] = {}
        self._ready: tuple[int, ...] = ()
        self._ready_lock = threading.Lock()
        self._read: Any = None
        self._write: Any = None
        self._gather: Any = None
        self._no_rows = jax.tree.map(  # the host rows of a snapshot of no slots
            lambda leaf: np.empty((0, *leaf.shape), leaf.dtype), self._fresh_spec
        )
        self._params: Any = None
        self._param_leaves: list[jax.Array] = []
        self._host_fresh: Any = None
        if not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
            self.bind(model)

    def bind(self, model: EnactiveModel) -> None:
        """Give the parameters of a step built from the model's structure (`model` must
        have that structure, array for array). Done by the constructor for a model.

        **Raises:** `ValueError` when `model` does not fit.
        """
        params, static = eqx.partition(model, eqx.is_array)
        leaves, treedef = jax.tree.flatten(params)
        specs = [(spec.shape, np.dtype(spec.dtype)) for spec in self._param_specs]
        trees: list[Any] = [treedef, jax.tree.structure(static)]
        fits = (
            trees == [self._param_def, jax.tree.structure(self.static)]
            and [(np.shape(leaf), np.dtype(leaf.dtype)) for leaf in leaves] == specs
        )
        if not fits:
            raise ValueError("the model does not have the structure this step was built for")
        self.model = model
        self.params = params
        self._host_fresh = jax.device_get(model.init_state())
        self._params = jax.device_put(params, self._replicated)
        # The executables take the parameters as a flat list: flattening the module tree
        # on every call cost ~60 µs of Python per step (53 leaves behind Equinox's
        # attribute machinery).
        self._param_leaves = jax.tree.leaves(self._params)

    @property
    def bound(self) -> bool:
        """Whether the parameters are there (`bind`): the step can run."""
        return self._params is not None

    # -- shapes -----------------------------------------------------------------------

    def _batch_sharding(self, bucket: int) -> NamedSharding:
        return self._split if bucket % self.mesh.size == 0 else self._replicated

    def _slab_spec(self) -> Any:
        return jax.tree.map(
            lambda leaf, sh: jax.ShapeDtypeStruct(
                (self.capacity, *leaf.shape), leaf.dtype, sharding=sh
            ),
            self._fresh_spec,
            self._slab_sharding,
        )

    @property
    def ready_buckets(self) -> tuple[int, ...]:
        """The buckets a batch may use now, increasing: compiled (or fallen back to eager
        execution). All of `buckets` once `compile()` returned."""
        return self._ready

    @property
    def largest_ready(self) -> int:
        """The largest bucket in `ready_buckets` (0 when none is)."""
        return self._ready[-1] if self._ready else 0

    def bucket_for(self, n: int) -> int:
        """The smallest ready bucket that holds `n` rows (the largest ready one if none
        does: the caller then splits). Never a bucket not compiled yet.

        **Raises:** `RuntimeError` when no bucket is ready.
        """
        ready = self._ready
        if not ready:
            raise RuntimeError("no bucket is compiled yet")
        i = bisect.bisect_left(ready, n)
        return ready[min(i, len(ready) - 1)]

    # -- compilation ------------------------------------------------------------------

    def _lower(self, bucket: int) -> Any:
        sh = self._batch_sharding(bucket)
        fn = jax.jit(
            lambda p, s, x, m: _slab_step(
                self.static, jax.tree.unflatten(self._param_def, p), s, x, m
            ),
            donate_argnums=(1,),
            out_shardings=(self._slab_sharding, sh),
        )
        return fn.lower(
            self._param_specs,
            self._slab_spec(),
            jax.ShapeDtypeStruct((bucket, self.input_width), np.float32, sharding=sh),
            jax.ShapeDtypeStruct((bucket, 2), np.int32, sharding=sh),
        )

    def compile(self, progress: Callable[[int, float], None] | None = None) -> dict[int, float]:
        """Compile every bucket ahead of time (plus the slot read/write helpers used for
        eviction and the row gather used for checkpoints), timing each. A bucket whose
        compilation fails is reported through `on_fallback` and served by eager execution.

        **Returns:** `{bucket: seconds}`; `progress(bucket, seconds)` is called after each.
        """
        for bucket in self.buckets:
            seconds = self.compile_bucket(bucket)
            if progress is not None:
                progress(bucket, seconds)
        self.compile_helpers()
        return dict(self.compile_seconds)

    def compile_bucket(self, bucket: int) -> float:
        """Compile one bucket (or, if that fails, report it through `on_fallback` and serve
        it by eager execution), then make it ready. Safe from another thread than the one
        that runs the step.

        **Returns:** the seconds it took.
        """
        if bucket not in self.buckets:
            raise ValueError(f"{bucket} is not one of the buckets {self.buckets}")
        t0 = time.perf_counter()
        try:
            self.executables[bucket] = self._lower(bucket).compile()
        except Exception as e:
            self._fall_back(bucket, e)
        seconds = time.perf_counter() - t0
        self.compile_seconds[bucket] = seconds
        with self._ready_lock:  # the executable first, then the bucket that uses it
            self._ready = tuple(sorted({*self._ready, bucket}))
        return seconds

    def compile_helpers(self) -> None:
        """Compile the slot read/write helpers used for eviction and the row gather used
        for checkpoints (before serving)."""
        slab, slot = self._slab_spec(), jax.ShapeDtypeStruct((), np.int32)
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self._fresh_spec)
        self._read = jax.jit(_read_slot).lower(slab, slot).compile()
        self._write = (
            jax.jit(_write_slot, donate_argnums=(0,), out_shardings=self._slab_sharding)
            .lower(slab, slot, state)
            .compile()
        )
        rows = jax.ShapeDtypeStruct((min(SNAPSHOT_ROWS, self.capacity),), np.int32)
        self._gather = jax.jit(_gather_rows).lower(slab, rows).compile()

    def _fall_back(self, bucket: int, error: Exception) -> None:
        reason = type(error).__name__
        self.executables.pop(bucket, None)
        self.eager_buckets[bucket] = f"{reason}: {error}"
        if self._on_fallback is not None:
            self._on_fallback(f"slab_step[{bucket}]", reason)

    # -- running ----------------------------------------------------------------------

    def host_slab(self) -> Any:
        """A slab of `capacity` fresh streams as host numpy arrays."""
        if self._host_fresh is None:
            raise RuntimeError("the step has no parameters yet: bind(model) first")
        return jax.tree.map(
            lambda leaf: np.broadcast_to(leaf, (self.capacity, *np.shape(leaf))).copy(),
            self._host_fresh,
        )

    def init_slab(self) -> EnactiveState:
        """A slab of `capacity` fresh streams, on the device(s)."""
        return self.put_slab(self.host_slab())

    def put_slab(self, host: Any) -> EnactiveState:
        """Place a host (numpy) slab — e.g. one read from a checkpoint — on the device(s)."""
        return jax.device_put(host, self._slab_sharding)

    def put_batch(self, x: np.ndarray, meta: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Place a host batch on the device(s) the way its bucket's executable takes it.

        Serving passes host arrays straight to `step(...)`; this is for callers that keep
        a batch on the device (benchmarks, `step_fn`).

        **Arguments:** `x` float32 `(B, D+P+T+M)`, `meta` int32 `(B, 2)`, as for `__call__`.

        **Returns:** `(x, meta)` as device arrays.
        """
        return jax.device_put((x, meta), self._batch_sharding(x.shape[0]))

    @property
    def step_fn(
        self,
    ) -> Callable[[EnactiveState, jax.Array, jax.Array], tuple[EnactiveState, jax.Array]]:
        """The batched step as a pure function with this model's parameters bound:
        `new_slab, records = step.step_fn(slab, x, meta)`.

        The same gather → `jax.vmap(model)` → scatter → pack as every compiled bucket,
        but not compiled, not donating `slab`, for any batch size: jittable, or run op by
        op under `jax.disable_jit()` (what the eager fallback does). Arguments and
        returns as for `__call__`, without the `eager` flag; records float32
        `(B, K+D+P+M+3)`.
        """
        return functools.partial(_slab_step, self.static, self._params)

    def __call__(
        self, slab: EnactiveState, x: np.ndarray, meta: np.ndarray
    ) -> tuple[EnactiveState, jax.Array, bool]:
        """Step one padded batch.

        **Arguments:**

        - `slab`: the current slab (donated: do not use it afterwards).
        - `x`: float32 `(B, D+P+T+M)`, B a compiled bucket; absent modalities zero-filled.
        - `meta`: int32 `(B, 2)`: slot, flags (presence bits 0–3, `FLAG_VALID`,
            `FLAG_RESET`). Valid rows must name distinct slots.

        **Returns:** `(new_slab, records, eager)`: records float32 `(B, K+D+P+M+3)` on the
        device (`RECORD_FIELDS` order), `eager` True when the eager fallback made them.
        """
        bucket = x.shape[0]
        exe = self.executables.get(bucket)
        if exe is None and bucket not in self.eager_buckets:
            raise KeyError(f"batch size {bucket} is not a compiled bucket {self._ready}")
        if self._params is None:
            raise RuntimeError("the step has no parameters yet: bind(model) first")
        if exe is not None:
            try:
                # Host arrays go straight in: the executable places them by its own input
                # shardings, ~80 µs cheaper per step than a separate device_put.
                new_slab, records = exe(self._param_leaves, slab, x, meta)
                return new_slab, records, False
            except Exception as e:
                if any(leaf.is_deleted() for leaf in jax.tree.leaves(slab)):
                    raise
                self._fall_back(bucket, e)
        xs, ms = self.put_batch(x, meta)
        with jax.disable_jit():
            new_slab, records = self.step_fn(slab, xs, ms)
        return new_slab, records, True

    def run(
        self,
        slab: EnactiveState,
        slots: np.ndarray,
        x: np.ndarray,
        present: np.ndarray | None = None,
        reset: np.ndarray | None = None,
    ) -> tuple[EnactiveState, np.ndarray]:
        """Step any number of rows: pad up to a compiled bucket, or split beyond the
        largest. Never compiles.

        **Arguments:** `slots` int `(n,)` distinct; `x` float32 `(n, D+P+T+M)`; `present`
        bool `(n, 4)` (default all); `reset` bool `(n,)` (default none).

        **Returns:** `(new_slab, records)`, records a numpy float32 `(n, K+D+P+M+3)`.
        """
        n = len(slots)
        flags = np.full(n, FLAG_VALID, np.int32)
        present = np.ones((n, 4), bool) if present is None else np.asarray(present, bool)
        flags |= (present * (1 << np.arange(4))).sum(axis=1).astype(np.int32)
        if reset is not None:
            flags |= np.where(reset, FLAG_RESET, 0).astype(np.int32)
        out = np.empty((n, self.record_width), np.float32)
        start = 0
        while start < n:
            bucket = self.bucket_for(n - start)
            rows = min(bucket, n - start)
            xb = np.zeros((bucket, self.input_width), np.float32)
            mb = np.zeros((bucket, 2), np.int32)
            xb[:rows] = x[start : start + rows]
            mb[:rows, 0] = slots[start : start + rows]
            mb[:rows, 1] = flags[start : start + rows]
            slab, records, _ = self(slab, xb, mb)
            out[start : start + rows] = np.asarray(records)[:rows]
            start += rows
        return slab, out

    def read_slot(self, slab: EnactiveState, slot: int) -> Any:
        """One stream's state as host numpy arrays (for eviction)."""
        return jax.device_get(self._read(slab, np.int32(slot)))

    def snapshot(self, slab: EnactiveState, slots: Sequence[int]) -> SlabSnapshot:
        """Copy the rows of `slots` (for a checkpoint) without waiting for the device.

        The copies are enqueued behind the steps already dispatched, `SNAPSHOT_ROWS` rows
        per compiled gather, so a checkpoint copies the streams there are, not the whole
        slab; later steps may donate `slab`, the copies stay as they were.
        """
        chunk = min(SNAPSHOT_ROWS, self.capacity)
        index = np.zeros(-(-len(slots) // chunk) * chunk, np.int32)  # padded with slot 0
        index[: len(slots)] = slots
        chunks = [self._gather(slab, index[i : i + chunk]) for i in range(0, len(index), chunk)]
        for leaf in jax.tree.leaves(chunks):
            leaf.copy_to_host_async()
        return SlabSnapshot(chunks, len(slots), self._no_rows)

    def write_slot(self, slab: EnactiveState, slot: int, state: Any) -> EnactiveState:
        """Put one stream's host state into `slot` (the slab is donated)."""
        return self._write(slab, np.int32(slot), state)
