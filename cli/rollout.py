"""`backfill worker`, `upgrade`, `status`, `rollout pause|resume|abort|throttle`.

`worker` runs a backfill worker process here (the only worker entry point). The rollout commands are HTTP
clients of the API (`--api-url`, env BACKFILL_API_URL, default http://127.0.0.1:8000; the operator token comes
from BACKFILL_OPERATOR_TOKEN), so they go through the same validation, auth and job enqueueing as any other
client and need a running `backfill serve`.
"""

from __future__ import annotations

import json
import os
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

rollout_app = typer.Typer(
    help="Control a rollout: pause, resume, abort, throttle, path, failures, retry-failed, rollback.",
    no_args_is_help=True,
)


def _client(api_url: str) -> httpx.Client:
    # An empty token sends no header: reads still work, and a write gets the API's own 401 that names the
    # token, instead of an "Illegal header value" from the HTTP library.
    token = get_settings().operator_token.get_secret_value()
    headers = {"Authorization": f"Bearer {token}"} if token.strip() else {}
    return httpx.Client(base_url=api_url, headers=headers, timeout=30.0)


def connection_problem(api_url: str, e: httpx.HTTPError) -> str:
    """What went wrong reaching the API, told apart from a refused token (that is an HTTP 401)."""
    if isinstance(e, httpx.ConnectError):
        return (
            f"cannot connect to the API at {api_url} ({e}): is `backfill serve` running there? "
            "(--api-url or BACKFILL_API_URL)"
        )
    if isinstance(e, httpx.TimeoutException):
        return f"the API at {api_url} did not answer in time ({type(e).__name__})"
    return f"talking to the API at {api_url} failed: {type(e).__name__}: {e}"


def auth_problem(detail: Any) -> str:
    """A 401 in words: which credential the API refused and what this client sent."""
    field = detail.get("field") if isinstance(detail, dict) else None
    if field == "X-API-Key":
        return "the API requires an API key for reads (X-API-Key); the operator token also passes"
    raw = os.environ.get("BACKFILL_OPERATOR_TOKEN")
    if raw is None:
        sent = "BACKFILL_OPERATOR_TOKEN is not set, so the development default was sent"
    elif not raw.strip():
        sent = "BACKFILL_OPERATOR_TOKEN is empty, so no token was sent"
    else:
        sent = "the BACKFILL_OPERATOR_TOKEN sent does not match the server's"
    return f"the API refused the operator token: {sent}"


def request(
    api_url: str,
    method: str,
    path: str,
    body: Any = None,
    params: dict[str, Any] | None = None,
    client: httpx.Client | None = None,
) -> httpx.Response:
    """One request (on `client` when given: a bulk load keeps one connection); a connection failure ends the
    command (exit 2) with what went wrong."""
    try:
        if client is not None:
            return client.request(method, path, json=body, params=params)
        with _client(api_url) as c:
            return c.request(method, path, json=body, params=params)
    except httpx.HTTPError as e:
        typer.echo(connection_problem(api_url, e), err=True)
        raise typer.Exit(2) from e


def refusal(resp: httpx.Response) -> str:
    """The API's refusal in one line (a 401 says which credential)."""
    try:
        detail = resp.json().get("detail", resp.text)
    except ValueError:
        detail = resp.text
    if resp.status_code == 401:
        return f"error 401: {auth_problem(detail)}"
    return f"error {resp.status_code}: {json.dumps(detail)}"


def _call(
    api_url: str, method: str, path: str, body: dict[str, Any] | None = None, params: dict[str, Any] | None = None
) -> dict[str, Any]:
    resp = request(api_url, method, path, body, params)
    if resp.status_code >= 400:
        typer.echo(refusal(resp), err=True)
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
    if warning(r):
        lines.append(f"warning: {warning(r)}")
    return "".join(f"\n  {line}" for line in lines)


def warning(r: dict[str, Any]) -> str | None:
    """The server's liveness warning for the rollout (no live worker), if any."""
    workers = r.get("workers") or {}
    return workers.get("warning")


# The bar shows the server's ETA only (tqdm's own, from its bar updates, disagreed with it).
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


def watch(api_url: str, rollout_id: int, interval: float = 1.0, as_json: bool = False) -> dict[str, Any]:
    """Follow one rollout until it reaches a terminal status: a progress bar with the server's ETA and its
    warnings, or (`as_json`) one JSON line per poll for scripts."""
    from tqdm import tqdm

    r = _call(api_url, "GET", f"/rollouts/{rollout_id}")
    shown: str | None = None
    bar = (
        None
        if as_json
        else tqdm(total=max(r["total"], 1), desc=f"rollout {rollout_id}", bar_format=BAR_FORMAT, file=sys.stderr)
    )
    try:
        while True:
            if bar is None:
                typer.echo(json.dumps(r))
            else:
                bar.total = max(r["total"], 1)
                bar.n = r["done"]
                eta = "?" if r["eta_seconds"] is None else f"{r['eta_seconds']:.0f}s"
                bar.set_postfix(status=r["status"], failed=r["failed"], rate=f"{r['items_per_second']:.1f}/s", eta=eta)
                if warning(r) != shown and warning(r):
                    bar.write(f"warning: {warning(r)}", file=sys.stderr)
                shown = warning(r)
                bar.refresh()
            if r["status"] in TERMINAL:
                return r
            time.sleep(interval)
            r = _call(api_url, "GET", f"/rollouts/{rollout_id}")
    finally:
        if bar is not None:
            bar.close()


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
    from service.config import check_startup
    from worker.main import run_worker

    settings = get_settings()
    check_startup(settings)
    run_worker(
        settings,
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would happen; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output (one line per poll with --watch).")] = False,
    api_url: str = API_URL,
) -> None:
    """Start a rollout (POST /upgrade). With --watch: exit 3 if it ends failed, 4 if it is aborted."""
    body: dict[str, Any] = {"to": to, "mode": mode, "policy": policy, "force": force}
    if batch_size is not None:
        body["batch_size"] = batch_size
    if max_items_per_second is not None:
        body["max_items_per_second"] = max_items_per_second
    if dry_run:
        preview = _call(api_url, "POST", "/upgrade", body, params={"dry_run": "true"})
        typer.echo(json.dumps(preview, indent=2) if as_json else _preview(preview))
        return
    r = _call(api_url, "POST", "/upgrade", body)
    typer.echo(json.dumps(r) if as_json else _summary(r))
    if follow:
        final = watch(api_url, r["id"], as_json=as_json)
        if not as_json:
            typer.echo(_summary(final))
        _exit_for(final)


def _preview(p: dict[str, Any]) -> str:
    """The dry run in a few lines."""
    pack = p["compat_pack"] + (
        f" (a training phase embeds {p['train_sample']} items first)" if p["train_sample"] else ""
    )
    rate = p["measured_items_per_second"]
    eta = (
        "unknown (no finished rollout to measure a rate from)"
        if p["eta_seconds"] is None
        else (f"{p['eta_seconds']:.0f}s at {rate:.1f} items/s (the last finished rollout's rate)")
    )
    lines = [
        f"dry run: {p['from']} -> {p['to']}, {p['items']} items; nothing was changed",
        f"compat pack: {pack}",
        f"would start: status={p['status']} mode={p['mode']} policy={p['policy']}",
        f"why: {p['reason']}" if p.get("reason") else "",
        f"predicted: AUC {p['predicted']['auc']:.4f}, lowest vs old/old {p['predicted']['worst_margin']:+.4f}"
        if (p.get("predicted") or {}).get("auc") is not None and "worst_margin" in p["predicted"]
        else "",
        f"eta: {eta}",
    ]
    return "\n".join(line for line in lines if line)


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
        r = watch(api_url, r["id"], interval, as_json=as_json)
    elif as_json:
        typer.echo(json.dumps(r) if follow else json.dumps(r, indent=2))
    if not as_json:
        typer.echo(_summary(r))
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


@rollout_app.command("failures")
def failures(
    rollout_id: int,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Failures to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    api_url: str = API_URL,
) -> None:
    """Which items failed, after how many attempts, and why (GET /rollouts/ID/failures)."""
    page = _call(api_url, "GET", f"/rollouts/{rollout_id}/failures", params={"limit": limit})
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    reasons = ", ".join(f"{n} {why}" for why, n in page["reasons"].items()) or "-"
    typer.echo(f"rollout {rollout_id}: {page['total']} failed item(s); by reason: {reasons}")
    for f in page["failures"]:
        typer.echo(f"  {f['item_id']}  attempts={f['attempts']}  {f['failed_at']}  {f['last_error']}")
    if page["next_cursor"]:
        typer.echo(f"  ... and more (--limit, or GET /rollouts/{rollout_id}/failures?cursor=...)")


@rollout_app.command("retry-failed")
def retry_failed(rollout_id: int, api_url: str = API_URL) -> None:
    """Give the failed items fresh attempts; a rollout that ended failed runs again."""
    out = _call(api_url, "POST", f"/rollouts/{rollout_id}/retry-failed")
    typer.echo(f"retrying {out['retried']} item(s)")
    typer.echo(_summary(out["rollout"]))


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
