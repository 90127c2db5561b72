# syntax=docker/dockerfile:1
#
# One image for every process of the stack: `backfill db upgrade` (migrate), `backfill serve` (api) and
# `backfill worker` (worker). CPU by default:
#
#     docker build -t online-backfill .
#
# GPU variant (CUDA base image, CUDA torch wheels and the `gpu` extra, i.e. faiss-gpu instead of faiss-cpu):
#
#     docker build --build-arg FLAVOR=gpu -t online-backfill:gpu .
#
# Layers: OS + virtualenv, then the dependencies read from pyproject.toml alone (cached until it changes),
# then the code. The project is installed in editable mode from /app, so service.config.REPO_ROOT is /app
# and alembic.ini, migrations/ and artifacts/ are found where the code expects them.

ARG FLAVOR=cpu
ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# --- base images ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base-cpu
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-gpu
# Ubuntu 24.04's python3 is 3.12 (the project needs >= 3.11). The CUDA torch wheels bring their own CUDA
# libraries; the base image supplies the matching runtime for faiss-gpu.
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# --- dependencies (cached until pyproject.toml changes) ------------------------------------------------------
FROM base-${FLAVOR} AS deps
ARG FLAVOR
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY pyproject.toml ./
# torch first, from the PyTorch index of the flavour (the version is the one pinned in pyproject.toml);
# then every other runtime dependency from PyPI (torch is already satisfied); GPU: the `gpu` extra
# replaces faiss-cpu (both install the same `faiss` module, so faiss-cpu goes first).
RUN set -eux; \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /tmp/reqs.txt; \
    torch_req="$(grep -E '^torch[=<>~! ]' /tmp/reqs.txt)"; \
    pip install --upgrade pip setuptools wheel; \
    pip install "$torch_req" --index-url "$TORCH_INDEX_URL"; \
    pip install -r /tmp/reqs.txt; \
    if [ "$FLAVOR" = "gpu" ]; then \
        python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))' > /tmp/gpu.txt; \
        pip uninstall -y faiss-cpu; \
        pip install -r /tmp/gpu.txt; \
    fi; \
    python -c 'import faiss, torch; print("torch", torch.__version__, "faiss", faiss.__version__)'

# --- the application -------------------------------------------------------------------------------------------
FROM deps AS app
ENV PYTHONUNBUFFERED=1 \
    BACKFILL_ENVIRONMENT=production \
    BACKFILL_DATA_DIR=/app/data
RUN groupadd --system --gid 10001 backfill \
    && useradd --system --uid 10001 --gid backfill --home-dir /app --shell /usr/sbin/nologin backfill
COPY README.md alembic.ini ./
COPY migrations/ migrations/
COPY models/ models/
COPY service/ service/
COPY worker/ worker/
# The `backfill` command; devtools/ (bench, demo, test fakes) stays out of the image: those commands say so.
COPY cli/ cli/
# Shipped model and compatibility artifacts (registered by the API at start-up).
COPY artifacts/ artifacts/
RUN pip install --no-deps --no-build-isolation -e . \
    && mkdir -p /app/data \
    && chown backfill:backfill /app/data \
    && backfill --help > /dev/null
USER backfill:backfill
EXPOSE 8000 9101
# For the api process (the compose file disables / replaces it for migrate and worker).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["backfill", "serve", "--host", "0.0.0.0", "--port", "8000"]
