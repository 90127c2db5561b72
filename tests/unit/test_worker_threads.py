"""The worker's encoder thread policy (`worker.context.encoder_threads`)."""

from __future__ import annotations

import pytest

from worker.context import TORCH_THREADS_ENV, encoder_threads


def test_one_core_is_left_to_the_loader_and_the_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TORCH_THREADS_ENV, raising=False)
    assert [encoder_threads(c) for c in (1, 2, 4, 16)] == [1, 1, 3, 15]


def test_the_environment_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TORCH_THREADS_ENV, "2")
    assert encoder_threads(16) == 2
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv(TORCH_THREADS_ENV, bad)
        assert encoder_threads(4) == 3  # ignored (and logged)
