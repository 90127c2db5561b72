"""`backfill items add PATH...` (bulk load a gallery through `POST /items`) and `backfill items list`.

A PATH is a folder (every .png/.jpg/.jpeg/.npy under it, recursively; the id is the path relative to the
folder with '/' written '__'), an NDJSON file (.ndjson/.jsonl: one `{"id", "path", "label"?}` per line,
paths relative to the file), a list file (one `path` or `path,label` per line) or one image file. Items go
to the API in batches (bounded in count and in bytes, under the API's body limit) with a progress bar. Every
accepted batch's ids are appended to a journal, so running the same command again after a Ctrl-C or a
lost connection skips what was loaded (the API is idempotent on the id anyway; the journal saves sending
it again). An item the API refuses (422 naming `items[i]`) is set aside with the API's reason and the rest
of its batch is sent again; the refusals are listed at the end, and the exit code is 1 when there were any.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from cli import rollout
from service.config import get_settings

items_app = typer.Typer(help="The gallery: bulk load, list and delete items.", no_args_is_help=True)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".npy"}
NDJSON_SUFFIXES = {".ndjson", ".jsonl"}
MAX_ITEMS_PER_CALL = 1000  # the API's limit (service/api/schemas.py)
BATCH_BYTES = 2 * 1024 * 1024  # base64 bytes per request, well under the default 4 MiB body limit
EXIT_REFUSED, EXIT_INTERRUPTED = 1, 130
RETRIES = 3


@dataclass(frozen=True)
class Entry:
    id: str
    path: Path
    label: int | None = None


@dataclass
class Report:
    loaded: int = 0
    created: int = 0
    existing: int = 0
    revived: int = 0
    skipped: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)  # (id or path, why)


def _folder_id(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix().replace("/", "__")


def _label(text: str | None, where: str) -> int | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError as e:
        raise typer.BadParameter(f"{where}: label {text!r} is not an integer") from e


def entries(path: Path, labels_from_folders: bool = False) -> Iterator[Entry]:
    """The items one PATH names (see the module docstring)."""
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES):
            label = _label(p.parent.name, str(p)) if labels_from_folders and p.parent != path else None
            yield Entry(_folder_id(path, p), p, label)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        yield Entry(path.name, path)
    elif path.suffix.lower() in NDJSON_SUFFIXES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                p = path.parent / str(row["path"])
            except (ValueError, KeyError, TypeError) as e:
                raise typer.BadParameter(f"{path}:{n}: expected a JSON object with a 'path' ({e})") from e
            label = row.get("label")
            yield Entry(str(row.get("id") or p.name), p, None if label is None else _label(str(label), f"{path}:{n}"))
    else:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            name, _, label_text = text.partition(",")
            p = path.parent / name.strip()
            yield Entry(p.name, p, _label(label_text.strip(), f"{path}:{n}"))


def journal_path(paths: list[Path], api_url: str) -> Path:
    key = hashlib.sha256("\n".join([api_url, *sorted(str(p.resolve()) for p in paths)]).encode()).hexdigest()[:16]
    return get_settings().data_dir / "items-add" / f"{key}.done"


Batch = list[tuple[Entry, str]]  # (entry, base64 bytes)


def _post(api_url: str, batch: Batch, report: Report, client: Any = None) -> tuple[list[str], Batch]:
    """Send a batch; returns the ids the API took and what is left to send (a refused item is set aside with
    the API's reason, the rest of its batch goes again)."""
    body = {
        "items": [{"id": e.id, "image_b64": b64, **({} if e.label is None else {"label": e.label})} for e, b64 in batch]
    }
    for attempt in range(RETRIES):
        resp = rollout.request(api_url, "POST", "/items", body, client=client)
        if resp.status_code < 500:
            break
        time.sleep(1.0 + attempt)
    if resp.status_code == 200:
        out = resp.json()
        report.created += len(out["created"])
        report.existing += len(out["existing"])
        report.revived += len(out["revived"])
        return [e.id for e, _ in batch], []
    detail = _detail(resp)
    index = _item_index(detail.get("field", ""))
    if resp.status_code in (413, 422) and (index is not None or len(batch) == 1):
        bad = batch[index or 0]
        where = str(detail.get("field", "")).split("].", 1)[-1]  # items[3].image_b64 -> image_b64
        report.refused.append((f"{bad[0].id} ({bad[0].path})", f"{resp.status_code} {where}: {detail.get('problem')}"))
        return [], [x for i, x in enumerate(batch) if i != (index or 0)]
    if resp.status_code == 413:  # too large as a whole: send it in halves
        half = len(batch) // 2
        taken, left = _post(api_url, batch[:half], report, client)
        return taken, left + batch[half:]
    typer.echo(rollout.refusal(resp), err=True)
    raise typer.Exit(1 if resp.status_code < 500 else 2)


def _detail(resp: Any) -> dict[str, Any]:
    try:
        detail = resp.json().get("detail")
    except ValueError:
        detail = None
    return detail if isinstance(detail, dict) else {"problem": str(detail or resp.text)}


def _item_index(name: str) -> int | None:
    """`items[3].image_b64` -> 3."""
    if name.startswith("items[") and "]" in name:
        try:
            return int(name[6 : name.index("]")])
        except ValueError:
            return None
    return None


def _read(entry: Entry, report: Report) -> str | None:
    try:
        return base64.b64encode(entry.path.read_bytes()).decode()
    except OSError as e:
        report.refused.append((f"{entry.id} ({entry.path})", f"unreadable: {e.strerror or e}"))
        return None


def load(api_url: str, todo: list[Entry], journal: Path, batch_size: int, report: Report) -> None:
    """Stream `todo` to the API in batches; every accepted batch's ids go to the journal at once."""
    from tqdm import tqdm

    journal.parent.mkdir(parents=True, exist_ok=True)
    with (
        rollout._client(api_url) as client,
        journal.open("a") as log,
        tqdm(total=len(todo), unit="item", desc="items", file=sys.stderr) as bar,
    ):
        batch: Batch = []
        size = 0

        def flush() -> None:
            nonlocal batch, size
            pending = batch
            while pending:
                taken, left = _post(api_url, pending, report, client)
                log.write("".join(f"{i}\n" for i in taken))
                log.flush()
                report.loaded += len(taken)
                bar.update(len(pending) - len(left))
                pending = left
            batch, size = [], 0

        for entry in todo:
            b64 = _read(entry, report)
            if b64 is None:
                bar.update(1)
                continue
            if batch and (len(batch) >= batch_size or size + len(b64) > BATCH_BYTES):
                flush()
            batch.append((entry, b64))
            size += len(b64)
        flush()


@items_app.command("add")
def add(
    paths: Annotated[list[Path], typer.Argument(exists=True, help="Folders, NDJSON or list files, images.")],
    batch_size: Annotated[int, typer.Option(min=1, max=MAX_ITEMS_PER_CALL, help="Items per request.")] = 256,
    labels_from_folders: Annotated[
        bool, typer.Option("--labels-from-folders", help="A file's parent folder name is its integer label.")
    ] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Ignore the journal: send everything again.")] = False,
    api_url: str = rollout.API_URL,
) -> None:
    """Load images into the gallery through POST /items; run it again to resume after an interruption."""
    todo_all: dict[str, Entry] = {}
    for p in paths:
        for e in entries(p, labels_from_folders):
            todo_all[e.id] = e  # the last of a repeated id wins, as in one POST /items
    journal = journal_path(paths, api_url)
    done = set() if restart or not journal.exists() else set(journal.read_text().splitlines())
    if restart and journal.exists():
        journal.unlink()
    todo = [e for i, e in todo_all.items() if i not in done]
    report = Report(skipped=len(todo_all) - len(todo))
    t0 = time.perf_counter()
    try:
        load(api_url, todo, journal, batch_size, report)
    except KeyboardInterrupt:
        typer.echo(
            f"\ninterrupted after {report.loaded} item(s); run the same command again to resume (journal {journal})",
            err=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    seconds = time.perf_counter() - t0
    rate = report.loaded / seconds if seconds > 0 else 0.0
    typer.echo(
        f"loaded {report.loaded} item(s) in {seconds:.1f}s ({rate:.1f}/s): created {report.created}, "
        f"already there {report.existing}, revived {report.revived}; skipped {report.skipped} already in the "
        f"journal; refused {len(report.refused)}"
    )
    for what, why in report.refused:
        typer.echo(f"refused {what}: {why}", err=True)
    if report.refused:
        raise typer.Exit(EXIT_REFUSED)


@items_app.command("list")
def list_(
    model: Annotated[str | None, typer.Option(help="Only items embedded in this model's space.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Items to show.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
    api_url: str = rollout.API_URL,
) -> None:
    """How many items there are (in a model's space with --model), and the first ones (GET /items)."""
    params: dict[str, Any] = {"limit": limit, **({"model": model} if model else {})}
    page = rollout._call(api_url, "GET", "/items", params=params)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    typer.echo(f"{page['total']} item(s)" + (f" in {model}'s space" if model else ""))
    for it in page["items"]:
        typer.echo(f"  {it['id']}  label={it['label']}  {','.join(it['embeddings'])}")


@items_app.command("delete")
def delete(
    ids: Annotated[list[str], typer.Argument(help="Item ids.")],
    api_url: str = rollout.API_URL,
) -> None:
    """Delete items (DELETE /items/ID): they leave every index; adding the same id again stores it anew."""
    for item_id in ids:
        rollout._call(api_url, "DELETE", f"/items/{quote(item_id, safe='')}")
        typer.echo(f"deleted {item_id}")


def register(app: typer.Typer) -> None:
    app.add_typer(items_app, name="items")
