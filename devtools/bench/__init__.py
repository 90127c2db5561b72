"""`backfill bench`: every performance figure of issue 9 measured beside its baseline in one run.

Writes ``runs/bench/results.json`` and ``runs/bench/results.md`` (a markdown table plus detail tables) with
the machine (CPU model, cores, torch / faiss versions, device). Sections (``--only 1,3`` picks some), one
module each:

1. merged OLD+NEW search vs one index over all items: real gallery (Fashion-MNIST test embedded with the
   shipped v1/v2, OLD queried with psi(v2(q)) and calibrated) and synthetic d=64 vectors, Flat and IVF
   (`merge`);
2. query encoding single pass (v2 + psi) vs two passes (v2 + v1) (`encode`);
3. end-to-end ``POST /search`` (the real app in-process under uvicorn on a loopback port, scratch Postgres
   + Redis, during a rollout) vs the bare FAISS searches for the same queries, by stage (`e2e`, `live`);
   and its throughput / p50 / p99 at 1, 8 and 32 concurrent clients with and without micro-batching
   (`concurrency`; the load from a separate process);
4. backfill items/s per worker vs the raw batched encoder; two workers vs one (`backfill`);
5. ingestion lag, commit -> searchable in the API's index (Redis event, and polling alone) (`lag`);
6. offline harness curve time (FAISS top-k) vs the dense-matrix approach (`harness`);
7. API process memory per item for 1M d=64 vectors vs the raw vector bytes (in a fresh process) (`memory`);
8. 1M items: start-up rebuild from Postgres (rows loaded with binary COPY), IVF / HNSW recall@10 vs
   Flat with their speed-up, and memory per item of IVF-PQ and IVF-PQ with exact re-ranking beside Flat
   (`large`);
9. gallery scale (issue 19; default 1M, ``--scale-n 10000000`` for the README's table): d=256 clustered
   synthetic v1 and a v2 derived by a known transformation; at 0, 50 and 100% backfilled, bytes per item,
   recall@10 of the merged result against the exact merged result and single-query p50/p99 for Flat,
   IVF-Flat, IVF-PQ and IVF-PQ with exact re-ranking (FAISS in-process), and milvus-lite (the service's
   `MilvusIndex`) at ``--milvus-n`` items (`scale`).

``--quick`` shrinks every size so the whole run takes well under a minute. The section modules are
imported when a run starts, so registering the command stays cheap.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import typer

from devtools.bench.config import REPO, SECTIONS, BenchConfig
from devtools.bench.report import markdown

Section = Callable[[], dict[str, Any]]


class _Run:
    """One run's results, saved after every section so a later failure (or a kill) keeps the rest."""

    def __init__(self, cfg: BenchConfig, command: str) -> None:
        from devtools.bench.common import machine

        self.cfg, self.command, self.t_start = cfg, command, time.perf_counter()
        self.res: dict[str, Any] = {
            "command": command,
            "quick": cfg.quick,
            "threads": cfg.threads,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine(),
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
            "sections": {},
        }
        self.sections: dict[str, Any] = self.res["sections"]

    def keep_previous(self) -> None:
        """With --update: the sections of the existing results.json that this run does not measure."""
        previous = self.cfg.out_dir / "results.json"
        if not (self.cfg.update and previous.is_file()):
            return
        old = json.loads(previous.read_text())
        for k, v in old.get("sections", {}).items():
            if int(k) not in self.cfg.only:  # each kept section carries the run that measured it
                v.setdefault("run", {"started": old.get("started"), "command": old.get("command")})
                self.sections[k] = v

    def save(self) -> None:
        self.res["seconds"] = time.perf_counter() - self.t_start
        snapshot = {**self.res, "sections": dict(sorted(self.sections.items()))}
        self.cfg.out_dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.out_dir / "results.json").write_text(json.dumps(snapshot, indent=2, default=str))
        (self.cfg.out_dir / "results.md").write_text(markdown(snapshot))

    def guarded(self, key: str, fn: Section) -> None:
        t0 = time.perf_counter()
        typer.echo(f"[bench] section {key} ...", err=True)
        try:
            self.sections[key] = fn()
        except Exception as e:  # one failing section never loses the others
            traceback.print_exc()
            self.sections[key] = {"error": f"{type(e).__name__}: {e}"}
        self.sections[key]["section_seconds"] = round(time.perf_counter() - t0, 1)
        self.sections[key]["run"] = {"started": self.res["started"], "command": self.command}
        self.save()  # a later failure (or a kill) keeps what is measured so far
        typer.echo(f"[bench] section {key} done in {self.sections[key]['section_seconds']} s", err=True)


def _concurrency(cfg: BenchConfig, live: Any) -> dict[str, Any]:
    """Section 3's throughput under 1 / 8 / 32 concurrent clients, batched vs not (its own error if it fails)."""
    from devtools.bench.concurrency import section_concurrency

    try:
        return {"concurrency": section_concurrency(cfg, live)}
    except Exception as e:
        traceback.print_exc()
        return {"concurrency": {"error": f"{type(e).__name__}: {e}"}}


def _run_live(run: _Run, art: Any) -> None:
    """Sections 3 and 5, on one live service."""
    from devtools.bench.e2e import section_e2e
    from devtools.bench.lag import section_lag
    from devtools.bench.live import live_service

    cfg = run.cfg
    try:
        with live_service(cfg, art, cfg.size("e2e_n")) as live:
            if 3 in cfg.only:
                run.guarded("3", lambda: {**section_e2e(cfg, live), **_concurrency(cfg, live), "artifacts": art.label})
            if 5 in cfg.only:
                run.guarded("5", lambda: section_lag(cfg, live))
    except Exception as e:
        traceback.print_exc()
        for key in ("3", "5"):
            if int(key) in cfg.only and key not in run.sections:
                run.sections[key] = {"error": f"service start: {type(e).__name__}: {e}"}


def _run_sections(run: _Run, art: Any) -> None:
    from devtools.bench.backfill import section_backfill
    from devtools.bench.encode import section_encode
    from devtools.bench.harness import section_harness
    from devtools.bench.large import section_large
    from devtools.bench.memory import section_memory
    from devtools.bench.merge import section_merge
    from devtools.bench.scale import section_scale

    cfg, only = run.cfg, run.cfg.only
    if 1 in only:
        assert art is not None
        run.guarded("1", lambda: section_merge(cfg, art))
    if 2 in only:
        assert art is not None
        run.guarded("2", lambda: section_encode(cfg, art))
    if {3, 5} & set(only):
        assert art is not None
        _run_live(run, art)
    if 4 in only:
        run.guarded("4", lambda: section_backfill(cfg))
    if 6 in only:
        assert art is not None
        run.guarded("6", lambda: section_harness(cfg, art))
    if 7 in only:
        run.guarded("7", lambda: section_memory(cfg))
    if 8 in only:
        run.guarded("8", lambda: section_large(cfg))
    if 9 in only:
        run.guarded("9", lambda: section_scale(cfg))


def run_bench(cfg: BenchConfig, command: str = "backfill bench") -> dict[str, Any]:
    from devtools.bench.common import find_artifacts, set_threads

    set_threads(cfg.threads)
    run = _Run(cfg, command)
    run.keep_previous()
    scratch = Path(tempfile.mkdtemp(prefix="backfill-bench-"))
    need_art = {1, 2, 3, 5, 6} & set(cfg.only)
    art = find_artifacts(cfg, scratch) if need_art else None
    run.res["artifacts"] = art.label if art is not None else None
    _run_sections(run, art)
    run.save()
    run.res["sections"] = dict(sorted(run.sections.items()))
    return run.res


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        quick: bool = typer.Option(False, "--quick", help="Small sizes (seconds, not minutes)."),
        only: str = typer.Option(",".join(map(str, SECTIONS)), help="Sections to run, e.g. 1,2,7."),
        out: Path = typer.Option(REPO / "runs" / "bench", help="Output directory."),
        artifacts: Path = typer.Option(REPO / "artifacts", help="Artifacts directory (v1, v2, compat-v1-v2)."),
        pg: str = typer.Option(BenchConfig.pg, help="Postgres server URL (scratch databases are created there)."),
        redis_url: str = typer.Option(BenchConfig.redis, "--redis", help="Redis URL (this DB is flushed)."),
        threads: int = typer.Option(1, min=1, help="FAISS/torch threads for the timed searches."),
        wait_artifacts: float = typer.Option(0.0, help="Seconds to wait for the shipped artifacts to appear."),
        update: bool = typer.Option(False, "--update", help="Replace only the chosen sections of results.json."),
        synth_n: int | None = typer.Option(None, help="Synthetic vectors for section 1 (default 1M)."),
        large_n: int | None = typer.Option(None, help="Items for sections 7 and 8 (default 1M)."),
        scale_n: int | None = typer.Option(None, help="Items for section 9's FAISS indices (default 1M)."),
        milvus_n: int | None = typer.Option(None, help="Items for section 9's milvus-lite rows (default 100k)."),
    ) -> None:
        """Measure every performance figure beside its baseline; writes results.json and results.md."""
        sel = tuple(sorted({int(x) for x in only.split(",") if x.strip()}))
        bad = [x for x in sel if x not in SECTIONS]
        if bad:
            raise typer.BadParameter(f"unknown sections {bad}; choose from {list(SECTIONS)}", param_hint="--only")
        cfg = BenchConfig(
            quick=quick,
            only=sel,
            out_dir=out,
            artifacts=artifacts,
            pg=pg,
            redis=redis_url,
            threads=threads,
            wait_artifacts=wait_artifacts,
            update=update,
            synth_n=synth_n,
            large_n=large_n,
            scale_n=scale_n,
            milvus_n=milvus_n,
        )
        res = run_bench(cfg, "backfill bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "backfill bench")
        typer.echo(markdown(res))
        typer.echo(f"wrote {out / 'results.json'} and {out / 'results.md'}")


__all__ = ["BenchConfig", "markdown", "register", "run_bench"]
