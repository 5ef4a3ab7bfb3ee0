"""MomentBatch: the vectorised encodings equal the per-moment reference encoders."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.protocol import (
    Moment,
    MomentBatch,
    MomentReader,
    MomentSizes,
    encode_moment,
    moment_to_json,
)

SIZES = MomentSizes(5, 4, 3, 2)
ids = st.text(st.sampled_from("abcxyz-0123456789é"), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(ids, min_size=1, max_size=20, unique=True), st.data())
def test_binary_and_json_equal_the_reference(stream_ids: list[str], data: st.DataObject) -> None:
    rng = np.random.default_rng(len(stream_ids))
    moments = [
        Moment(
            s,
            2**40 + i,
            i * 0.5,
            1000 * i,
            i % 8,
            SIZES,
            rng.standard_normal(SIZES.total).astype(np.float32),
        )
        for i, s in enumerate(stream_ids)
    ]
    batch = MomentBatch.of(moments)
    rows = sorted(data.draw(st.sets(st.integers(0, len(moments) - 1))))
    for subset in (None, rows):
        chosen = moments if subset is None else [moments[i] for i in subset]
        binary = batch.encode_binary(subset)
        # Rows are grouped by id length, so compare per stream, then the whole as a set.
        decoded = {m.stream_id: m for m in MomentReader().feed(binary)}
        assert len(binary) == sum(len(encode_moment(m)) for m in chosen)
        assert {encode_moment(m) for m in decoded.values()} == {encode_moment(m) for m in chosen}
        assert batch.encode_json(subset) == b"".join(moment_to_json(m) for m in chosen)


def test_one_id_length_keeps_row_order() -> None:
    moments = [
        Moment(f"s-{i:03d}", i, 0.0, 0, 0, SIZES, np.full(SIZES.total, i, np.float32))
        for i in range(50)
    ]
    batch = MomentBatch.of(moments)
    assert batch.encode_binary() == b"".join(encode_moment(m) for m in moments)
    assert batch.moment(7).seq == 7 and len(batch) == 50
