"""`backfill worker`, `upgrade`, `status`, `rollout pause|resume|abort|throttle`.

`worker` runs a backfill worker process here (the only worker entry point). The rollout commands are HTTP
clients of the API (`--api-url`, env BACKFILL_API_URL, default http://127.0.0.1:8000; the operator token comes
from BACKFILL_OPERATOR_TOKEN), so they go through the same validation, auth and job enqueueing as any other
client and need a running `backfill serve`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import httpx
import typer

from service.config import get_settings

# Exit codes: 0 ok (and a watched rollout completed), 1 the API refused the request, 2 usage or connection,
# 3 a watched rollout ended failed, 4 a watched rollout was aborted: scripts can tell them apart.
EXIT_FAILED, EXIT_ABORTED = 3, 4
API_URL = typer.Option("http://127.0.0.1:8000", "--api-url", envvar="BACKFILL_API_URL", help="API base URL.")
TERMINAL = {"completed", "aborted", "failed"}

rollout_app = typer.Typer(help="Control a rollout: pause, resume, abort, throttle.", no_args_is_help=True)


def _client(api_url: str) -> httpx.Client:
    # An empty token sends no header: reads still work, and a write gets the API's own 401 that names the
    # token, instead of an "Illegal header value" from the HTTP library.
    token = get_settings().operator_token.get_secret_value()
    headers = {"Authorization": f"Bearer {token}"} if token.strip() else {}
    return httpx.Client(base_url=api_url, headers=headers, timeout=30.0)


def _call(api_url: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        with _client(api_url) as c:
            resp = c.request(method, path, json=body)
    except httpx.HTTPError as e:
        typer.echo(f"cannot reach the API at {api_url}: {e} (is `backfill serve` running?)", err=True)
        raise typer.Exit(2) from e
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        typer.echo(f"error {resp.status_code}: {json.dumps(detail)}", err=True)
        raise typer.Exit(1)
    data: dict[str, Any] = resp.json()
    return data


def _summary(r: dict[str, Any]) -> str:
    eta = "-" if r.get("eta_seconds") is None else f"{r['eta_seconds']:.0f}s"
    throttle = r.get("max_items_per_second") or "off"
    return (
        f"rollout {r['id']} {r['from']}->{r['to']} mode={r['mode']} policy={r['policy']} "
        f"status={r['status']} "
        f"done={r['done']}/{r['total']} ({100 * r['fraction']:.1f}%) failed={r['failed']} "
        f"rate={r['items_per_second']:.1f}/s eta={eta} throttle={throttle}"
    ) + _details(r)


def _details(r: dict[str, Any]) -> str:
    """Extra lines: why this path, the training phase, the live probe against old/old, the guard."""
    path, lines = r.get("path") or {}, []
    if path.get("reason"):
        lines.append(f"path: {path['reason']}")
    training = r.get("training")
    if training and not training.get("done"):
        lines.append(f"training: {training.get('sample_done', 0)}/{training.get('sample')} sample items embedded")
    probe = path.get("probe") or {}
    if probe.get("live_map") is not None:
        lines.append(
            f"probe: live mAP {probe['live_map']:.4f} vs old/old {probe['baseline_map']:.4f} ({probe['live_path']})"
        )
    if path.get("guard"):
        lines.append(f"guard: {path['guard']}")
    return "".join(f"\n  {line}" for line in lines)


def watch(api_url: str, rollout_id: int, interval: float = 1.0) -> dict[str, Any]:
    """A live tqdm bar of one rollout until it reaches a terminal status."""
    from tqdm import tqdm

    r = _call(api_url, "GET", f"/rollouts/{rollout_id}")
    with tqdm(total=max(r["total"], 1), unit="item", desc=f"rollout {rollout_id}", file=sys.stderr) as bar:
        while True:
            bar.total = max(r["total"], 1)
            bar.n = r["done"]
            eta = "?" if r["eta_seconds"] is None else f"{r['eta_seconds']:.0f}s"
            bar.set_postfix(status=r["status"], failed=r["failed"], rate=f"{r['items_per_second']:.1f}/s", eta=eta)
            bar.refresh()
            if r["status"] in TERMINAL:
                break
            time.sleep(interval)
            r = _call(api_url, "GET", f"/rollouts/{rollout_id}")
    return r


def _exit_for(r: dict[str, Any]) -> None:
    """After --watch: a rollout that ended failed or aborted is not a success."""
    if r["status"] == "failed":
        typer.echo(f"rollout {r['id']} failed: {r.get('error') or 'see GET /rollouts/' + str(r['id'])}", err=True)
        raise typer.Exit(EXIT_FAILED)
    if r["status"] == "aborted":
        typer.echo(f"rollout {r['id']} was aborted; {r['from']} keeps serving", err=True)
        raise typer.Exit(EXIT_ABORTED)


def worker(
    burst: Annotated[bool, typer.Option(help="Exit when the queue is empty.")] = False,
    name: Annotated[str | None, typer.Option(help="RQ worker name.")] = None,
    maintenance_seconds: Annotated[float, typer.Option(help="Re-enqueue / retention interval.")] = 10.0,
    metrics_port: Annotated[int | None, typer.Option(help="Override BACKFILL_METRICS_PORT (0 = off).")] = None,
) -> None:
    """Run a backfill worker (plans rollouts and backfills embeddings)."""
    from worker.main import run_worker

    run_worker(
        get_settings(),
        burst=burst,
        name=name,
        maintenance_seconds=maintenance_seconds,
        metrics_port=metrics_port,
    )


def upgrade(
    to: Annotated[str, typer.Option("--to", help="Registered model to upgrade to.")],
    mode: Annotated[
        str, typer.Option(help="auto | reverse | forward | two-pass | old-only (auto: best predicted, never dips)")
    ] = "auto",
    policy: Annotated[str, typer.Option(help="uncertainty | random | fifo")] = "uncertainty",
    batch_size: Annotated[int | None, typer.Option(help="Items per backfill batch.")] = None,
    max_items_per_second: Annotated[float | None, typer.Option(help="Throttle (items/s).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Take an explicit path predicted to dip.")] = False,
    follow: Annotated[bool, typer.Option("--watch", help="Follow progress until the end.")] = False,
    api_url: str = API_URL,
) -> None:
    """Start a rollout (POST /upgrade). With --watch: exit 3 if it ends failed, 4 if it is aborted."""
    body: dict[str, Any] = {"to": to, "mode": mode, "policy": policy, "force": force}
    if batch_size is not None:
        body["batch_size"] = batch_size
    if max_items_per_second is not None:
        body["max_items_per_second"] = max_items_per_second
    r = _call(api_url, "POST", "/upgrade", body)
    typer.echo(_summary(r))
    if follow:
        final = watch(api_url, r["id"])
        typer.echo(_summary(final))
        _exit_for(final)


def status(
    rollout_id: Annotated[int | None, typer.Argument(help="Rollout id (default: the newest).")] = None,
    follow: Annotated[bool, typer.Option("--watch", help="Live progress bar with ETA until it ends.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between polls with --watch.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the rollout JSON.")] = False,
    api_url: str = API_URL,
) -> None:
    """Show a rollout's progress (GET /rollouts). With --watch: exit 3 if it ends failed, 4 if aborted."""
    if rollout_id is None:
        rollouts = _call(api_url, "GET", "/rollouts")["rollouts"]
        if not rollouts:
            typer.echo("no rollouts")
            return
        r = rollouts[0]
    else:
        r = _call(api_url, "GET", f"/rollouts/{rollout_id}")
    if follow and r["status"] not in TERMINAL:
        r = watch(api_url, r["id"], interval)
    typer.echo(json.dumps(r, indent=2) if as_json else _summary(r))
    if follow:
        _exit_for(r)


@rollout_app.command("pause")
def pause(rollout_id: int, api_url: str = API_URL) -> None:
    """Pause: workers stop after their current batch."""
    typer.echo(_summary(_call(api_url, "POST", f"/rollouts/{rollout_id}/pause")))


@rollout_app.command("resume")
def resume(rollout_id: int, api_url: str = API_URL) -> None:
    """Resume a paused rollout."""
    typer.echo(_summary(_call(api_url, "POST", f"/rollouts/{rollout_id}/resume")))


@rollout_app.command("abort")
def abort(
    rollout_id: int,
    purge: Annotated[
        bool | None,
        typer.Option("--purge/--keep", help="Delete the new model's embeddings (default: setting)."),
    ] = None,
    api_url: str = API_URL,
) -> None:
    """Abort: the old model stays serving."""
    body = None if purge is None else {"purge": purge}
    typer.echo(_summary(_call(api_url, "POST", f"/rollouts/{rollout_id}/abort", body)))


@rollout_app.command("throttle")
def throttle(
    rollout_id: int,
    rate: Annotated[str, typer.Argument(help="Items per second, or 'off'.")],
    api_url: str = API_URL,
) -> None:
    """Set the rollout's rate limit (items/s), or 'off'."""
    if rate.lower() in {"off", "none", "null"}:
        value: float | None = None
    else:
        try:
            value = float(rate)
        except ValueError as e:
            raise typer.BadParameter("a number of items per second, or 'off'", param_hint="RATE") from e
    typer.echo(_summary(_call(api_url, "PATCH", f"/rollouts/{rollout_id}", {"max_items_per_second": value})))


@rollout_app.command("path")
def path(
    rollout_id: int,
    mode: Annotated[str, typer.Argument(help="auto | reverse | forward | two-pass | old-only")],
    force: Annotated[bool, typer.Option("--force", help="Take a path predicted to dip.")] = False,
    api_url: str = API_URL,
) -> None:
    """Move an active rollout to another query path (409 with the predicted dip unless --force)."""
    typer.echo(_summary(_call(api_url, "PATCH", f"/rollouts/{rollout_id}", {"mode": mode, "force": force})))


@rollout_app.command("rollback")
def rollback(rollout_id: int, api_url: str = API_URL) -> None:
    """After completion: the previous model serves again from its retained vectors."""
    typer.echo(_summary(_call(api_url, "POST", f"/rollouts/{rollout_id}/rollback")))


def register(app: typer.Typer) -> None:
    """Add the worker and rollout commands to `backfill`."""
    app.command("worker")(worker)
    app.command("upgrade")(upgrade)
    app.command("status")(status)
    app.add_typer(rollout_app, name="rollout")
