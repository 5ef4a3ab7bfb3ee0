"""SlabStep: gather/step/scatter over the state slab, pad rows, donation, buckets, fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import processors
import processors.slab as slab_module
from processors import (
    FLAG_RESET,
    FLAG_VALID,
    CompilationCounter,
    EnactiveModel,
    ModelConfig,
    SlabStep,
    pack_record,
)

BUCKETS = (1, 4, 8)
CAPACITY = 32
ALL_PRESENT = 0b1111


@pytest.fixture(scope="module")
def model(small_config: ModelConfig) -> EnactiveModel:
    return EnactiveModel(small_config, key=jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def step(model: EnactiveModel) -> SlabStep:
    s = SlabStep(model, buckets=BUCKETS, capacity=CAPACITY)
    s.compile()
    return s


def _x(step: SlabStep, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, step.input_width)).astype(np.float32)


def _host(slab) -> list[np.ndarray]:
    return [np.array(leaf) for leaf in jax.tree.leaves(jax.device_get(slab))]


def _stepped_slab(step: SlabStep, seed: int = 100):
    """A slab whose every slot has moved away from the fresh state."""
    slab = step.init_slab()
    for t in range(2):
        slab, _ = step.run(slab, np.arange(CAPACITY), _x(step, CAPACITY, seed + t))
    return slab


def test_bucket_for(step: SlabStep) -> None:
    assert [step.bucket_for(n) for n in (1, 2, 4, 5, 8, 9, 100)] == [1, 4, 4, 8, 8, 8, 8]


def test_shuffled_slots_give_same_per_stream_results(step: SlabStep) -> None:
    n, steps = 6, 3
    rng = np.random.default_rng(0)
    slots = rng.permutation(CAPACITY)[:n]  # stream i lives in slot slots[i]
    xs = [_x(step, n, t) for t in range(steps)]
    in_order, shuffled = step.init_slab(), step.init_slab()
    for t in range(steps):
        in_order, want = step.run(in_order, np.arange(n), xs[t])
        rows = rng.permutation(n)  # and the rows arrive in another order every step
        shuffled, got = step.run(shuffled, slots[rows], xs[t][rows])
        np.testing.assert_allclose(got, want[rows], rtol=1e-6, atol=1e-7)
    for i in range(n):
        for a, b in zip(
            jax.tree.leaves(step.read_slot(in_order, i)),
            jax.tree.leaves(step.read_slot(shuffled, int(slots[i]))),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_pad_rows_leave_every_slot_untouched(step: SlabStep) -> None:
    slab = _stepped_slab(step)
    before = _host(slab)
    meta = np.zeros((8, 2), np.int32)
    meta[:, 0] = [0, 3, 3, CAPACITY - 1, 0, 7, -1, CAPACITY + 5]  # any slot value at all
    meta[:, 1] = [0, ALL_PRESENT, FLAG_RESET, FLAG_RESET | 0b0101, 0, 0b1000, 0, ALL_PRESENT]
    slab, records, eager = step(slab, _x(step, 8, 1), meta)
    assert not eager
    assert records.shape == (8, step.record_width)
    for a, b in zip(before, _host(slab), strict=True):
        np.testing.assert_array_equal(a, b)


def test_pad_row_sharing_a_real_rows_slot_changes_nothing(step: SlabStep) -> None:
    host = _host(_stepped_slab(step))
    treedef = jax.tree.structure(step.init_slab())
    x = _x(step, 4, 2)
    alone = np.zeros((4, 2), np.int32)
    alone[0] = [3, FLAG_VALID | ALL_PRESENT]
    mixed = alone.copy()
    mixed[1:, 0] = [3, 3, 5]  # pad rows naming the real row's slot, before and after it
    mixed[1:, 1] = [ALL_PRESENT | FLAG_RESET, 0, ALL_PRESENT]
    slab_a, rec_a, _ = step(step.put_slab(jax.tree.unflatten(treedef, host)), x, alone)
    slab_m, rec_m, _ = step(step.put_slab(jax.tree.unflatten(treedef, host)), x, mixed)
    np.testing.assert_array_equal(np.asarray(rec_m)[0], np.asarray(rec_a)[0])
    after_a, after_m = _host(slab_a), _host(slab_m)
    for old, a, m in zip(host, after_a, after_m, strict=True):
        np.testing.assert_array_equal(m, a)
        untouched = np.arange(CAPACITY) != 3
        np.testing.assert_array_equal(m[untouched], old[untouched])
    assert any(not np.array_equal(o[3], m[3]) for o, m in zip(host, after_m, strict=True))


def test_identical_streams_stay_identical(step: SlabStep) -> None:
    slab = step.init_slab()
    for t in range(3):
        x = _x(step, 1, t)
        slab, records = step.run(slab, np.array([5, 9]), np.concatenate([x, x]))
        np.testing.assert_array_equal(records[0], records[1])
    for a, b in zip(
        jax.tree.leaves(step.read_slot(slab, 5)),
        jax.tree.leaves(step.read_slot(slab, 9)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_state_after_batched_steps_equals_eager_model(step: SlabStep, model) -> None:
    steps, slots = 3, np.array([2, 11, 4])
    rng = np.random.default_rng(7)
    xs = [_x(step, 3, 20 + t) for t in range(steps)]
    present = rng.random((steps, 3, 4)) < 0.7
    slab = step.init_slab()
    records = []
    for t in range(steps):
        slab, rec = step.run(slab, slots, xs[t], present=present[t])
        records.append(rec)
    cuts = np.cumsum([model.config.state_dim, model.config.proprio_dim, model.config.tactile_dim])
    for i, slot in enumerate(slots):
        state = model.init_state()
        with jax.disable_jit():
            for t in range(steps):
                # Callers zero-fill absent modalities; the model ignores them anyway.
                parts = [jnp.asarray(p) for p in np.split(xs[t][i], cuts)]
                state, out = model(state, *parts, jnp.asarray(present[t, i]))
                np.testing.assert_allclose(records[t][i], pack_record(out), rtol=1e-4, atol=1e-5)
        got = step.read_slot(slab, int(slot))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_reset_starts_from_init_state(step: SlabStep) -> None:
    slab = _stepped_slab(step)
    fresh_state = jax.tree.leaves(jax.device_get(step.model.init_state()))
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(step.read_slot(slab, 1)), fresh_state, strict=True)
    )
    x = _x(step, 1, 3)
    slab, used = step.run(slab, np.array([1]), x, reset=np.array([True]))
    new = step.init_slab()
    new, fresh = step.run(new, np.array([1]), x)
    np.testing.assert_array_equal(used, fresh)
    for a, b in zip(
        jax.tree.leaves(step.read_slot(slab, 1)),
        jax.tree.leaves(step.read_slot(new, 1)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_read_write_slot_round_trip(step: SlabStep) -> None:
    slab = _stepped_slab(step)
    before = _host(slab)
    rng = np.random.default_rng(5)
    state = jax.tree.map(
        lambda a: rng.normal(size=a.shape).astype(a.dtype), step.read_slot(slab, 0)
    )
    slab = step.write_slot(slab, 3, state)
    for a, b in zip(jax.tree.leaves(step.read_slot(slab, 3)), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    others = np.arange(CAPACITY) != 3
    for old, new in zip(before, _host(slab), strict=True):
        np.testing.assert_array_equal(new[others], old[others])


@pytest.mark.parametrize("rows_per_gather", [3, 256])
def test_snapshot_copies_the_asked_rows_and_outlives_donation(
    model: EnactiveModel, monkeypatch: pytest.MonkeyPatch, rows_per_gather: int
) -> None:
    monkeypatch.setattr(slab_module, "SNAPSHOT_ROWS", rows_per_gather)  # 3: several gathers
    step = SlabStep(model, buckets=BUCKETS, capacity=CAPACITY)
    step.compile()
    slab = _stepped_slab(step)
    before = _host(slab)
    slots = [7, 0, 31, 5, 2, 6, 9]
    with CompilationCounter() as counter:
        counter.seal()
        snapshot = step.snapshot(slab, slots)
        empty = step.snapshot(slab, [])
        slab, _ = step.run(slab, np.arange(CAPACITY), _x(step, CAPACITY, 3))  # donates
        rows = [np.asarray(a) for a in jax.tree.leaves(snapshot.to_host())]
        assert counter.runtime == 0
    for got, old in zip(rows, before, strict=True):
        np.testing.assert_array_equal(got, old[slots])
    assert [a.shape for a in jax.tree.leaves(empty.to_host())] == [
        (0, *a.shape[1:]) for a in before
    ]
    assert not np.allclose(_host(slab)[0][slots], before[0][slots])  # the slab moved on


def test_run_splits_beyond_the_largest_bucket(step: SlabStep) -> None:
    n = 2 * BUCKETS[-1] + 3
    slots = np.random.default_rng(1).permutation(CAPACITY)[:n]
    x = _x(step, n, 9)
    present = np.random.default_rng(2).random((n, 4)) < 0.8
    big, records = step.run(step.init_slab(), slots, x, present=present)
    assert records.shape == (n, step.record_width)
    one = step.init_slab()
    for i in range(n):  # the same rows, one frame per call (bucket 1)
        one, rec = step.run(one, slots[i : i + 1], x[i : i + 1], present=present[i : i + 1])
        np.testing.assert_allclose(records[i], rec[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(_host(big), _host(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_compilation_after_warmup(model: EnactiveModel) -> None:
    rng = np.random.default_rng(11)
    with CompilationCounter() as counter:
        step = SlabStep(model, buckets=BUCKETS, capacity=CAPACITY)
        step.compile()
        slab = step.init_slab()
        assert counter.warmup > 0
        counter.seal()
        x = _x(step, CAPACITY, 0)
        for _ in range(500):
            n = int(rng.integers(1, 2 * BUCKETS[-1] + 1))
            slots = rng.choice(CAPACITY, n, replace=False)
            present = rng.random((n, 4)) < 0.9
            reset = rng.random(n) < 0.05
            slab, records = step.run(slab, slots, x[:n], present=present, reset=reset)
            assert records.shape == (n, step.record_width)
        slab = step.write_slot(slab, 0, step.read_slot(slab, 1))
        assert counter.runtime == 0
        assert np.all(np.isfinite(records))
        jax.jit(lambda a: a * 3)(jnp.ones(5, jnp.float32)).block_until_ready()
        assert counter.runtime >= 1  # the counter is live: a new function after seal counts


def test_a_step_from_the_structure_compiles_before_the_values_exist(
    model: EnactiveModel, step: SlabStep
) -> None:
    # The daemon compiles from the model's shapes while the parameters are being made.
    early = SlabStep(processors.abstract_model(model.config), buckets=BUCKETS, capacity=CAPACITY)
    assert not early.bound
    early.compile()
    with pytest.raises(RuntimeError, match="bind"):
        early.host_slab()
    with pytest.raises(ValueError, match="structure"):
        early.bind(EnactiveModel(ModelConfig(state_dim=12), key=jax.random.PRNGKey(0)))
    early.bind(model)
    slots = np.array([3, 0, 9])
    x = _x(step, 3, 21)
    with CompilationCounter() as counter:
        counter.seal()
        _, got = early.run(early.init_slab(), slots, x)
        _, want = step.run(step.init_slab(), slots, x)
        assert counter.runtime == 0
    np.testing.assert_array_equal(got, want)


def test_only_compiled_buckets_are_used(model: EnactiveModel) -> None:
    step = SlabStep(model, buckets=BUCKETS, capacity=CAPACITY)
    assert step.ready_buckets == () and step.largest_ready == 0
    with pytest.raises(RuntimeError, match="no bucket"):
        step.bucket_for(1)
    step.compile_helpers()
    step.compile_bucket(4)
    assert step.ready_buckets == (4,) and step.largest_ready == 4
    assert [step.bucket_for(n) for n in (1, 4, 5, 9)] == [4, 4, 4, 4]
    slab = step.init_slab()
    meta = np.zeros((8, 2), np.int32)
    with pytest.raises(KeyError, match="not a compiled bucket"):
        step(slab, _x(step, 8, 0), meta)  # bucket 8 is not compiled yet
    n = 11  # more rows than the largest compiled bucket: split into 4 + 4 + 3
    with CompilationCounter() as counter:
        counter.seal()
        slab, records = step.run(slab, np.arange(n), _x(step, n, 5))
        assert counter.runtime == 0
    assert records.shape == (n, step.record_width)
    step.compile_bucket(1)
    assert step.ready_buckets == (1, 4)
    assert [step.bucket_for(n) for n in (1, 2, 5)] == [1, 4, 4]


def test_buckets_compiled_in_another_thread_while_stepping(
    model: EnactiveModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the daemon does once ready: the hot path steps with the buckets it has, a
    # background thread compiles the rest; only the latter's compilations are counted,
    # as background, and no bucket is used before its executable exists.
    step = SlabStep(model, buckets=(1, 2, 4, 8), capacity=CAPACITY)
    step.compile_bucket(1)
    step.compile_helpers()
    slab = step.init_slab()
    used: set[int] = set()
    call = SlabStep.__call__

    def spy(self: SlabStep, slab, x, meta):  # type: ignore[no-untyped-def]
        assert x.shape[0] in self.ready_buckets and x.shape[0] in self.executables
        used.add(x.shape[0])
        return call(self, slab, x, meta)

    monkeypatch.setattr(SlabStep, "__call__", spy)

    with CompilationCounter() as counter:
        counter.seal()

        def background() -> None:
            with counter.in_background():
                for bucket in (2, 4, 8):
                    step.compile_bucket(bucket)

        thread = threading.Thread(target=background)
        thread.start()
        rng = np.random.default_rng(3)
        x = _x(step, CAPACITY, 1)
        while thread.is_alive() or len(used) < 4:
            n = int(rng.integers(1, 9))
            slab, _ = step.run(slab, rng.choice(CAPACITY, n, replace=False), x[:n])
            assert max(used) <= step.largest_ready
        thread.join()
        assert counter.runtime == 0
        assert counter.background >= 3
    assert used == {1, 2, 4, 8}


def test_step_donates_the_slab(step: SlabStep) -> None:
    slab = step.init_slab()
    meta = np.array([[0, FLAG_VALID | ALL_PRESENT]] * 4, np.int32)
    meta[:, 0] = [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new, records, _ = step(slab, _x(step, 4, 0), meta)
        jax.block_until_ready((new, records))
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(slab))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new))


def test_failed_bucket_falls_back_alone(model: EnactiveModel, monkeypatch) -> None:
    reports: list[tuple[str, str]] = []
    step = SlabStep(
        model,
        buckets=(2, 4),
        capacity=8,
        on_fallback=lambda name, reason: reports.append((name, reason)),
    )
    lower = step._lower

    def broken(bucket: int):
        if bucket == 4:
            raise RuntimeError("no compiler for this bucket today")
        return lower(bucket)

    monkeypatch.setattr(step, "_lower", broken)
    seconds = step.compile()
    assert set(seconds) == {2, 4}
    assert reports == [("slab_step[4]", "RuntimeError")]
    assert set(step.executables) == {2}
    assert "no compiler" in step.eager_buckets[4]

    x = np.zeros((4, step.input_width), np.float32)
    x[:2] = _x(step, 2, 4)
    meta = np.zeros((4, 2), np.int32)
    meta[:2] = [[6, FLAG_VALID | ALL_PRESENT], [1, FLAG_VALID | 0b0011]]
    eager_slab, eager_rec, eager = step(step.init_slab(), x, meta)
    comp_slab, comp_rec, compiled_eager = step(step.init_slab(), x[:2], meta[:2])
    assert eager and not compiled_eager
    np.testing.assert_allclose(np.asarray(eager_rec)[:2], comp_rec, rtol=1e-4, atol=1e-5)
    for a, b in zip(_host(eager_slab), _host(comp_slab), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert reports == [("slab_step[4]", "RuntimeError")]  # serving did not re-report


MULTI_DEVICE = textwrap.dedent(
    """
    import jax, numpy as np
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    import processors
    processors.enable_compilation_cache({cache!r})
    assert len(jax.devices()) == 2, jax.devices()
    cfg = processors.ModelConfig(state_dim=8, proprio_dim=6, tactile_dim=4, motor_dim=3,
        retention_depth=3, protention_horizon=2, som_grid=(3, 3), hidden_dim=8,
        attention_heads=2)
    model = processors.EnactiveModel(cfg, key=jax.random.PRNGKey(0))
    steps = [processors.SlabStep(model, buckets=(1, 4), capacity=7, devices=d)
             for d in (jax.devices()[:1], jax.devices()[:2])]
    results = []
    for step in steps:
        step.compile()
        slab = step.init_slab()
        recs = []
        for t in range(3):
            rng = np.random.default_rng(t)
            n = 3 if t < 2 else 1  # bucket 4 (split over devices) and bucket 1 (replicated)
            x = rng.normal(size=(n, step.input_width)).astype(np.float32)
            slab, r = step.run(slab, np.array([5, 0, 2][:n]), x)
            recs.append(r)
        results.append((np.concatenate(recs), jax.device_get(slab), slab))
    (r1, h1, _), (r2, h2, s2) = results
    assert steps[1].capacity == 8
    assert len(jax.tree.leaves(s2)[0].sharding.device_set) == 2
    np.testing.assert_allclose(r2, r1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(h1), jax.tree.leaves(h2), strict=True):
        np.testing.assert_allclose(b[:7], a, rtol=1e-5, atol=1e-6)
    print("OK", float(np.abs(r2).sum()))
    """
)


def test_two_devices_match_one(compilation_cache: str) -> None:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE.format(cache=compilation_cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("OK ")


def test_step_fn_is_the_compiled_step_uncompiled(step: SlabStep) -> None:
    meta = np.array([[5, FLAG_VALID | ALL_PRESENT], [2, FLAG_VALID | FLAG_RESET | 0b0101]] * 2)
    meta[2:, 1] = 0  # pad rows
    meta = meta.astype(np.int32)
    x = _x(step, 4, 7)
    xs, ms = step.put_batch(x, meta)
    slab = _stepped_slab(step)
    with jax.disable_jit():
        eager_slab, eager_records = step.step_fn(slab, xs, ms)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(slab))  # not donated
    comp_slab, comp_records, eager = step(slab, xs, ms)
    assert not eager
    assert eager_records.shape == (4, step.record_width)
    np.testing.assert_allclose(eager_records, comp_records, rtol=1e-4, atol=1e-5)
    for a, b in zip(_host(eager_slab), _host(comp_slab), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
