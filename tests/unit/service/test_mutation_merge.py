"""Cases that the mutation run of service/merge.py showed untested (docs/reliability.md, "Mutation testing"):
id 0 is a real item on either side, and an empty slot (-1) is skipped whatever distance it carries (FAISS
pads with -1 and +inf, other index types with other values). Both implementations (1-2 queries: two-pointer,
3+: array path) against the plain-Python reference of test_merge.py."""

from __future__ import annotations

import numpy as np
import pytest

from service.merge import merge_topk
from tests.unit.service.test_merge import ARRAY, TWO_POINTER, _as_tuples, _brute


def _rows(m: int, row: list[tuple[float, int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([[d for d, _ in row]] * m, np.float32), np.array([[i for _, i in row]] * m, np.int64)


@pytest.mark.parametrize("m", [*TWO_POINTER, *ARRAY])
@pytest.mark.parametrize(
    ("new", "old"),
    [
        ([(0.2, 4), (0.6, 5)], [(0.1, 0), (0.3, 9)]),  # id 0 only on OLD, nearest of all
        ([(0.1, 0), (0.6, 5)], [(0.3, 0), (0.4, 9)]),  # id 0 on both sides: once, from NEW
        ([(0.5, 0), (0.6, 5)], [(0.2, 0), (0.4, 9)]),  # id 0 on both sides: once, from OLD (nearer)
    ],
    ids=["zero-old", "zero-both-new-nearer", "zero-both-old-nearer"],
)
def test_id_zero_is_an_item_like_any_other(m: int, new: list[tuple[float, int]], old: list[tuple[float, int]]) -> None:
    nd, ni = _rows(m, new)
    od, oi = _rows(m, old)
    for k in (1, 2, 4):
        got = _as_tuples(merge_topk(nd, ni, od, oi, k))
        assert got == _brute(nd, ni, od, oi, k), k
        assert all(any(i == 0 for i, _, _ in row) for row in got) or k == 1


@pytest.mark.parametrize("m", [*TWO_POINTER, *ARRAY])
@pytest.mark.parametrize("pad", [0.0, -1.0, 0.15], ids=["zero", "negative", "between"])
def test_empty_slots_are_skipped_whatever_their_distance(m: int, pad: float) -> None:
    nd, ni = _rows(m, [(0.1, 1), (0.3, 2), (pad, -1), (pad, -1)])
    od, oi = _rows(m, [(0.2, 11), (pad, -1), (pad, -1), (pad, -1)])
    for k in (1, 2, 3, 8):
        got = _as_tuples(merge_topk(nd, ni, od, oi, k))
        assert got == _brute(nd, ni, od, oi, k), k
        assert [i for i, _, _ in got[0]] == [1, 11, 2][:k]
