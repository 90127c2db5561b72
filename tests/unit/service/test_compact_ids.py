"""The compact id structures behave like the Python set / dict they replace (checked against them)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.ids import ExternalIds, IdSet

ops = st.lists(st.tuples(st.sampled_from(["add", "discard"]), st.lists(st.integers(0, 5000), max_size=20)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_idset_matches_a_python_set(sequence: list[tuple[str, list[int]]]) -> None:
    ids, ref = IdSet(), set()
    for op, values in sequence:
        arr = np.asarray(values, dtype=np.int64)
        if op == "add":
            ids.add(arr)
            ref.update(values)
        else:
            gone = ids.discard(arr)
            assert sorted(gone.tolist()) == sorted(ref.intersection(values))
            ref.difference_update(values)
        assert len(ids) == len(ref)
    assert ids.to_set() == ref
    probe = np.arange(-3, 5010, dtype=np.int64)
    assert ids.mask(probe).tolist() == [int(i) in ref for i in probe]
    assert all((i in ids) == (i in ref) for i in range(0, 5010, 7))


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(0, 100_000), st.text(max_size=40), max_size=60))
def test_external_ids_match_a_dict(mapping: dict[int, str]) -> None:
    ext = ExternalIds()
    for k, v in mapping.items():
        ext[k] = v
        ext[k] = v + "-ignored"  # immutable once assigned
    assert len(ext) == len(mapping)
    for k, v in mapping.items():
        assert k in ext and ext[k] == v and ext.get(k) == v
    assert (100_001 in ext) is False and ext.get(100_001) is None
