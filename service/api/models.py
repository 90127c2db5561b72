"""GET /models (the catalogue) and POST /models (an operator uploads an encoder, validated before anything is
registered)."""

from __future__ import annotations

import base64
import binascii
import json
import shutil
import uuid
from pathlib import Path

from fastapi import APIRouter, status

from models.artifacts import ENCODER_FORMATS, MANIFEST, sha256_file
from models.preprocess import InputSpec
from service.api.deps import ApiKeyDep, OperatorDep, RuntimeDep, SessionDep
from service.api.schemas import ModelIn, ModelOut, ModelsOut, error_responses
from service.errors import InvalidRequest
from service.registry import add_encoder, list_models

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelsOut, dependencies=[ApiKeyDep], responses=error_responses(401, 503))
def models(session: SessionDep) -> ModelsOut:
    """Registered model versions and compatibility packs (each with its predicted path curves)."""
    return ModelsOut.of(list_models(session))


@router.post(
    "/models",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelOut,
    dependencies=[OperatorDep],
    responses=error_responses(400, 401, 409, 413, 422, 503),
)
def add_model(body: ModelIn, session: SessionDep, runtime: RuntimeDep) -> ModelOut:
    """Register an encoder: a TorchScript or ONNX model (base64) mapping a (B, C, H, W) float batch shaped and
    normalised as its `input` spec says to (B, dim) L2-normalised vectors. It must load, and a probe batch
    must give the declared shape, finite and deterministic outputs; otherwise 422 naming the problem, and
    nothing is registered. 409 when the name is registered with another artifact."""
    try:
        blob = base64.b64decode(body.model_b64, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest("model_b64", f"not valid base64 ({e})") from e
    try:
        spec = InputSpec.from_manifest(body.input.model_dump(exclude_none=True))
    except ValueError as e:
        raise InvalidRequest("input", str(e)) from e
    artifacts = Path(runtime.settings.artifacts_dir)
    staging = artifacts / f".upload-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        model_file = staging / ENCODER_FORMATS[body.format]
        model_file.write_bytes(blob)
        manifest = {
            "kind": "encoder",
            "name": body.name,
            "dim": body.dim,
            "format": body.format,
            "input": spec.to_manifest(),
            "checksum": sha256_file(model_file),
            "source": "POST /models",
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            row = add_encoder(session, artifacts, staging)
        except InvalidRequest as e:
            raise InvalidRequest("model_b64", e.problem) from e
        return ModelOut.of(row)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
