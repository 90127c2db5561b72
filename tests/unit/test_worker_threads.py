"""The worker's encoder thread policy (`worker.context.encoder_threads`): the host's cores shared equally
among its worker processes, unless the environment says otherwise."""

from __future__ import annotations

import pytest

from worker.context import TORCH_THREADS_ENV, encoder_threads


def test_the_cores_are_shared_among_the_workers_of_a_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TORCH_THREADS_ENV, raising=False)
    assert [encoder_threads(c) for c in (1, 2, 4, 16)] == [1, 2, 4, 16]  # one worker: every core
    assert [encoder_threads(c, workers=2) for c in (1, 2, 4, 16)] == [1, 1, 2, 8]
    assert [encoder_threads(16, workers=w) for w in (0, 3, 16, 40)] == [16, 5, 1, 1]  # never below one


def test_the_environment_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TORCH_THREADS_ENV, "2")
    assert encoder_threads(16) == 2
    assert encoder_threads(16, workers=4) == 2
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(TORCH_THREADS_ENV, bad)
        assert encoder_threads(4) == 4  # ignored (and logged)
        assert encoder_threads(4, workers=2) == 2
