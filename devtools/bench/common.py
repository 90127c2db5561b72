"""Helpers shared by the benchmark's sections: the machine, threads, memory, synthetic vectors, the
artifacts and gallery to measure with, scratch databases, and interleaved timing."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer

from devtools.bench.config import BenchConfig


def machine() -> dict[str, Any]:
    import faiss
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no GPU)",
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def set_threads(n: int) -> None:
    import faiss
    import torch

    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


def rss_bytes(key: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------------------- vectors


def recall_at(got: Sequence[Sequence[int]] | np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's exact k ids (`truth` rows) found among its results (`got` rows: id lists or
    arrays); -1 (an empty slot) matches nothing."""
    return float(
        np.mean(
            [
                len({int(i) for i in g if i >= 0} & {int(i) for i in t if i >= 0}) / k
                for g, t in zip(got, truth, strict=True)
            ]
        )
    )


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, d: int, centers: np.ndarray) -> np.ndarray:
    """`n` L2-normalised vectors around random unit centres (noise norm ~0.6): embedding-like clusters."""
    c = rng.integers(0, len(centers), n)
    v = centers[c] + rng.normal(scale=0.6 / np.sqrt(d), size=(n, d)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def unit_centers(d: int, n_centers: int = 4096, seed: int = 123) -> np.ndarray:
    c = np.random.default_rng(seed).normal(size=(n_centers, d)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


# -------------------------------------------------------------------------------------------- timing


def time_pair(
    a: Callable[[int], object], b: Callable[[int], object], n: int, warmup: int = 20
) -> tuple[list[float], list[float]]:
    """Interleave a and b (alternating which goes first) so drift and noise hit both alike."""
    for i in range(warmup):
        a(i)
        b(i)
    ta: list[float] = []
    tb: list[float] = []
    for i in range(n):
        first, second, t1, t2 = (a, b, ta, tb) if i % 2 == 0 else (b, a, tb, ta)
        t0 = time.perf_counter()
        first(i)
        t1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        second(i)
        t2.append(time.perf_counter() - t0)
    return ta, tb


def ms(xs: list[float], q: float) -> float:
    return float(np.quantile(xs, q) * 1000)


# ------------------------------------------------------------------------------ artifacts and gallery


@dataclass
class Artifacts:
    """The shipped pair when present, else stand-ins (shipped CNN architectures, random weights)."""

    dirs: dict[str, Path]
    root: Path
    shipped: bool

    @property
    def label(self) -> str:
        if self.shipped:
            return f"artifacts from {self.root}"
        return "stand-in artifacts (shipped architectures, random weights)"


def find_artifacts(cfg: BenchConfig, scratch: Path) -> Artifacts:
    from devtools.fakes import standin_artifacts
    from models.artifacts import discover

    deadline = time.monotonic() + cfg.wait_artifacts
    while True:
        encoders, packs = discover(cfg.artifacts)
        if {"v1", "v2"} <= set(encoders) and ("v1", "v2") in packs:
            return Artifacts(
                {"v1": encoders["v1"], "v2": encoders["v2"], "compat": packs[("v1", "v2")]}, cfg.artifacts, True
            )
        if time.monotonic() >= deadline:
            break
        typer.echo(f"waiting for artifacts under {cfg.artifacts} ...", err=True)
        time.sleep(min(30.0, max(1.0, deadline - time.monotonic())))
    root = scratch / "standin-artifacts"
    return Artifacts(standin_artifacts(root), root, False)


def fashion_test(cfg: BenchConfig, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The first `n` Fashion-MNIST test images (labels), or upscaled digits when the dataset is absent."""
    from service.config import Settings

    try:
        from models.data import load_fashion_mnist

        x, y = load_fashion_mnist(Settings().fashion_mnist_dir, "test")
        return x[:n], y[:n], "Fashion-MNIST test"
    except FileNotFoundError:
        from devtools.fakes import gallery_images

        return gallery_images(n), np.arange(n) % 10, "sklearn digits (upscaled)"


@contextlib.contextmanager
def scratch_database(cfg: BenchConfig, prefix: str) -> Iterator[str]:
    """A fresh, migrated Postgres database on the configured server, dropped afterwards."""
    from devtools.scratch_db import migrated_database, server_url

    with migrated_database(server_url(cfg.pg), prefix) as url:
        yield url
