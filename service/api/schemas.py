"""Request and response bodies of the HTTP API, and the constructors that shape domain objects into them.

Every route declares one of these as its response model and its error responses (`error_responses`), so
the OpenAPI document describes every body the app sends without post-hoc patching.
"""

from __future__ import annotations

import datetime as dt
from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

from models.paths import ENCODER_PASSES
from models.preprocess import InputSpec
from service.db.models import CompatPack, ModelVersion
from service.gallery import ItemInfo
from service.registry import Catalog
from service.rollouts import RolloutView
from service.runtime import SearchHit, Serving

MAX_ITEMS_PER_CALL = 1000
# Standard base64 (RFC 4648, section 4) with its padding: what every `*_b64` field accepts, stated in the
# OpenAPI document (pattern, contentEncoding) so that clients and schema-driven fuzzers know it.
BASE64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# Request bodies take the JSON types their schema states: 0 is not `false`, "10" is not 10 (a 422).
STRICT = ConfigDict(strict=True)


def base64_field(description: str) -> Any:
    """A required base64 string field (at least one 4-character group)."""
    return Field(
        ...,
        min_length=4,
        pattern=BASE64_PATTERN,
        json_schema_extra={"contentEncoding": "base64"},
        description=description,
    )


IMAGE_DESCRIPTION = "PNG, JPEG or NPY bytes, base64-encoded."


def _integral(value: Any) -> Any:
    """JSON has one number type: 3.0 is the integer 3 (as JSON Schema says); strict mode still refuses "3"."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


INTEGRAL = BeforeValidator(_integral)  # after any bounds in an Annotated, or pydantic publishes "ge"/"le"
JsonInt = Annotated[int, INTEGRAL]


def iso(t: dt.datetime) -> str:
    """ISO 8601 with the UTC offset ("+00:00"): the UTCDateTime column type hands back aware datetimes."""
    return t.isoformat()


Timestamp = Annotated[
    dt.datetime,
    PlainSerializer(iso, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}, mode="serialization"),
]


# --- errors ----------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    field: str = Field(description='What is at fault: a body field ("queries[1].image_b64"), "id", "body"...')
    problem: str


class ErrorBody(BaseModel):
    """Every 4xx/5xx the app sends: `detail` names the field and the problem."""

    detail: ErrorDetail
    errors: list[ErrorDetail] | None = Field(None, description="Every validation error (422 only).")


_DESCRIPTIONS = {
    400: "Refused request (e.g. a body that is not UTF-8 JSON)",
    401: "Missing or invalid credentials",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body too large",
    422: "Invalid input; `detail.field` names it",
    503: "Not ready (indices loading, no model serving, database or Redis unreachable)",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer these error codes with an `ErrorBody`."""
    return {code: {"model": ErrorBody, "description": _DESCRIPTIONS[code]} for code in codes}


# --- system ----------------------------------------------------------------------------------------------
class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyServing(BaseModel):
    model: str | None
    rollout_id: int | None
    new: int = Field(description="Items in the NEW (target-space) index.")
    old: int = Field(description="Items in the OLD index.")


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    database: str
    redis: str
    indices: str
    serving: ReadyServing | None = Field(None, description="Present when the indices are ready.")
    ingestion: str | None = Field(None, description="The ingestion follower's last error, if any.")
    rollout: str | None = Field(
        None, description="A warning about the active rollout (no live worker); search is still served."
    )


class ModelOut(BaseModel):
    name: str
    dim: int
    status: str
    checksum: str
    artifact: str = Field(description="The artifact's folder name (no server paths are published).")
    format: str = Field(description="torchscript or onnx.")
    input: dict[str, Any] = Field(description="The input spec the service preprocesses images to for this model.")
    metrics: dict[str, Any] | None

    @classmethod
    def of(cls, m: ModelVersion) -> ModelOut:
        manifest = m.manifest or {}
        return cls(
            name=m.name,
            dim=m.dim,
            status=m.status,
            checksum=m.checksum,
            artifact=PurePath(m.artifact_path).name,
            format=str(manifest.get("format", "torchscript")),
            input=InputSpec.from_manifest(manifest.get("input")).to_manifest(),
            metrics=manifest.get("metrics"),
        )


class CompatPackOut(BaseModel):
    from_: str = Field(serialization_alias="from")
    to: str
    checksum: str
    artifact: str = Field(description="The artifact's folder name (no server paths are published).")
    metrics: dict[str, Any] | None
    calibrated_modes: list[str]
    predictions: dict[str, Any] | None = Field(
        description="Predicted backfill curves (mAP@k per fraction) of every query path x order on the pack's "
        "probe set, with old/old and new/new there; what `mode: auto` chooses from (models/paths.py)."
    )

    @classmethod
    def of(cls, p: CompatPack) -> CompatPackOut:
        manifest = p.manifest or {}
        return cls(
            from_=p.from_version,
            to=p.to_version,
            checksum=p.checksum,
            artifact=PurePath(p.artifact_path).name,
            metrics=manifest.get("metrics"),
            calibrated_modes=sorted((manifest.get("calibration") or {}).keys()),
            predictions=manifest.get("predictions"),
        )


class InputSpecIn(BaseModel):
    """A model's input: images are converted to `channels`, brought to `size` by `resize` ("stretch"; "crop":
    shorter side to size / crop_fraction, then a centre crop; "pad": fit and pad with black), scaled to
    [0, 1] and normalised per channel with `mean` and `std` (one value per channel)."""

    model_config = ConfigDict(extra="forbid")

    channels: Literal[1, 3] = 1
    size: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default=[28, 28], min_length=2, max_length=2, description="[height, width]."
    )
    resize: Literal["stretch", "crop", "pad"] = "stretch"
    crop_fraction: float = Field(1.0, gt=0.0, le=1.0)
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    mean: list[float] | None = Field(None, description="One per channel; default 0.")
    std: list[float] | None = Field(None, description="One per channel, positive; default 1.")


class ModelIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=MODEL_NAME_PATTERN)
    dim: JsonInt = Field(ge=1, le=65_536, description="The embedding dimension the module outputs.")
    model_b64: str = base64_field(
        description="The model file, base64: TorchScript (`torch.jit.save`) or ONNX, as `format` says."
    )
    format: Literal["torchscript", "onnx"] = "torchscript"
    input: InputSpecIn = Field(
        default_factory=InputSpecIn,
        description="What the model takes; the service fits every image to it (default: 28 x 28 gray in [0, 1]).",
    )


class ModelsOut(BaseModel):
    models: list[ModelOut]
    compat_packs: list[CompatPackOut]

    @classmethod
    def of(cls, catalog: Catalog) -> ModelsOut:
        return cls(
            models=[ModelOut.of(m) for m in catalog.models],
            compat_packs=[CompatPackOut.of(p) for p in catalog.compat_packs],
        )


# --- search ----------------------------------------------------------------------------------------------
class SearchIn(BaseModel):
    model_config = STRICT

    image_b64: str = base64_field(IMAGE_DESCRIPTION)
    k: JsonInt = Field(10, ge=1, description="Number of results (at most the max_k setting).", examples=[10])


class QueryIn(BaseModel):
    model_config = STRICT

    image_b64: str = base64_field(IMAGE_DESCRIPTION)


class SearchBatchIn(BaseModel):
    model_config = STRICT

    queries: list[QueryIn] = Field(..., min_length=1)
    k: JsonInt = Field(10, ge=1)


class HitOut(BaseModel):
    id: str
    distance: float
    source: str = Field(description='"new" (target-model index) or "old" (not yet backfilled).')

    @classmethod
    def of(cls, h: SearchHit) -> HitOut:
        return cls(id=h.id, distance=h.distance, source=h.source)


class ServingOut(BaseModel):
    model: str | None = Field(description="The model that encoded the query.")
    rollout_id: int | None
    backfilled_fraction: float = Field(description="Share of the gallery in the target space (1 outside).")
    mode: str | None = None

    @classmethod
    def of(cls, s: Serving) -> ServingOut:
        return cls(model=s.model, rollout_id=s.rollout_id, backfilled_fraction=s.backfilled_fraction, mode=s.mode)


class SearchOut(BaseModel):
    results: list[HitOut]
    serving: ServingOut


class SearchBatchOut(BaseModel):
    results: list[list[HitOut]]
    serving: ServingOut


ITEM_ID_PATTERN = r"^[^/\\\x00-\x1f\x7f]+$"


# --- gallery ---------------------------------------------------------------------------------------------
class ItemIn(BaseModel):
    model_config = STRICT

    id: str = Field(
        ...,
        min_length=1,
        max_length=256,
        pattern=ITEM_ID_PATTERN,
        description="External id (idempotency key): no '/', backslash or control characters, so GET and DELETE "
        "/items/{id} can address it.",
    )
    image_b64: str = base64_field(IMAGE_DESCRIPTION)
    label: Annotated[int, Field(ge=-(2**31), le=2**31 - 1), INTEGRAL] | None = Field(
        None, description="Optional class label (32-bit)."
    )


class ItemsIn(BaseModel):
    model_config = STRICT

    items: list[ItemIn] = Field(..., min_length=1, max_length=MAX_ITEMS_PER_CALL)


class ItemsOut(BaseModel):
    created: list[str]
    existing: list[str] = Field(description="Live items left unchanged (idempotent re-post).")
    revived: list[str] = Field(description="Deleted items stored again.")
    models: list[str] = Field(description="Models the new items were embedded with.")
    searchable: bool = Field(description="Whether this process's indices include them already.")


class ItemOut(BaseModel):
    id: str
    label: int | None
    created_at: Timestamp
    updated_at: Timestamp
    payload_bytes: int
    embeddings: list[str] = Field(description="Models the item has embeddings for.")
    side: str | None = Field(description='Its index side in this process: "new", "old" or null (not indexed).')

    @classmethod
    def of(cls, item: ItemInfo, side: str | None) -> ItemOut:
        return cls(
            id=item.external_id,
            label=item.label,
            created_at=item.created_at,
            updated_at=item.updated_at,
            payload_bytes=item.payload_bytes,
            embeddings=item.embeddings,
            side=side,
        )


class DeletedOut(BaseModel):
    id: str
    deleted: bool


# --- rollouts --------------------------------------------------------------------------------------------
class UpgradeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    to: str = Field(
        min_length=1,
        max_length=64,
        pattern=MODEL_NAME_PATTERN,
        description="Registered model to upgrade to (422 when it is not registered or already serving).",
        examples=["v2"],
    )
    mode: Literal["auto", "reverse", "forward", "two-pass", "old-only"] = Field(
        "auto",
        description="Query path preference: `auto` takes the path with the highest predicted AUC that never "
        "falls below old/old; an explicit path predicted to dip is refused with 409 unless `force`.",
    )
    policy: Literal["uncertainty", "random", "fifo"] = Field(
        "uncertainty",
        description="Backfill order; `uncertainty` falls back to `random` where it is not predicted to beat it.",
    )
    batch_size: Annotated[int, Field(ge=1, le=100_000), INTEGRAL] | None = None
    max_items_per_second: float | None = Field(None, gt=0, allow_inf_nan=False)
    force: bool = Field(False, description="Take an explicit path even where it is predicted to dip.")


class RolloutPatch(BaseModel):
    """Only the fields present change: the throttle (null clears it) and/or the query path."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_items_per_second: float | None = Field(None, gt=0, allow_inf_nan=False)
    mode: Literal["auto", "reverse", "forward", "two-pass", "old-only"] | None = None
    force: bool = False


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    purge: bool | None = Field(None, description="Delete the target model's embeddings (default: setting).")


class PathOut(BaseModel):
    requested: str | None = Field(description="What /upgrade or PATCH asked for: auto or a path.")
    serving: str = Field(description="The path queries take now (= `mode`).")
    reason: str | None = Field(description="Why this path and order serve.")
    encoder_passes: int = Field(description="Encoder passes per query on this path.")
    predicted: dict[str, Any] | None = Field(
        description="The pack's predicted curve for this path and order (map per fraction, auc, relative_gain, "
        "worst_margin against old/old at worst_fraction, old_old)."
    )
    probe: dict[str, Any] | None = Field(
        description="The live probe: queries, k, baseline_map (old/old), last live_map and when it ran."
    )
    guard: dict[str, Any] | None = Field(description="The guard's last intervention (paused and fell back).")


class WorkersOut(BaseModel):
    registered: int = Field(description="RQ workers registered on the queue.")
    jobs_alive: int = Field(description="Jobs of this rollout with a live heartbeat.")
    warning: str | None = Field(description="Why the rollout may not progress (no live worker), or null.")


class RolloutOut(BaseModel):
    id: int
    from_: str = Field(serialization_alias="from")
    to: str
    mode: str
    policy: str
    status: str
    total: int
    done: int
    failed: int
    fraction: float
    items_per_second: float
    eta_seconds: float | None
    max_items_per_second: float | None
    batch_size: int
    created_at: Timestamp
    started_at: Timestamp | None
    updated_at: Timestamp
    finished_at: Timestamp | None
    error: str | None
    path: PathOut
    training: dict[str, Any] | None = Field(
        description="The training phase of a pair without a compat pack: sample, sample_done (items of the "
        "sample with a target vector), timings, done."
    )
    workers: WorkersOut | None = Field(None, description="Who works on it (GET only; null when Redis is down).")

    @classmethod
    def of(cls, view: RolloutView) -> RolloutOut:
        r, p = view.rollout, view.progress
        return cls(
            id=r.id,
            from_=r.from_version,
            to=r.to_version,
            mode=r.mode,
            policy=r.policy,
            status=r.status,
            total=p.total,
            done=p.done,
            failed=p.failed,
            fraction=view.fraction,
            items_per_second=view.items_per_second,
            eta_seconds=view.eta_seconds,
            max_items_per_second=r.max_items_per_second,
            batch_size=r.batch_size,
            created_at=r.created_at,
            started_at=r.started_at,
            updated_at=r.updated_at,
            finished_at=r.finished_at,
            error=r.error,
            path=PathOut(
                requested=r.requested_mode,
                serving=r.mode,
                reason=r.path_reason,
                encoder_passes=ENCODER_PASSES[r.mode],
                predicted=r.predicted,
                probe=_probe_view(r.probe),
                guard=r.guard,
            ),
            training=r.training,
        )


def _probe_view(probe: dict[str, Any] | None) -> dict[str, Any] | None:
    """The probe without its item list (ids are internal)."""
    return None if probe is None else {key: val for key, val in probe.items() if key != "items"}


class RolloutsOut(BaseModel):
    rollouts: list[RolloutOut] = Field(description="Newest first.")
