# One image for every process of the stack: `backfill db upgrade` (migrate), `backfill serve` (api) and
# `backfill worker` (worker). CPU by default:
#
#     docker build -t online-backfill .
#
# Nothing here needs BuildKit (the classic builder, DOCKER_BUILDKIT=0, builds it too), and every stage starts from
# the one BASE_IMAGE: the classic builder builds every stage, so a CPU build never pulls the CUDA base. Build
# arguments:
#
#   BASE_IMAGE       python:3.11-slim; any Debian/Ubuntu image works (python3 >= 3.11 is installed when absent)
#   TORCH_INDEX_URL  the index torch comes from: the PyTorch CPU index by default; empty = pip's default index
#                    plus whatever wheels pip is offered (PIP_FIND_LINKS, pip.conf of the base image)
#   FLAVOR           cpu, or gpu: the `gpu` extra (faiss-gpu instead of faiss-cpu)
#
# GPU variant (CUDA base, CUDA torch wheels, faiss-gpu):
#
#     docker build --build-arg FLAVOR=gpu --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t online-backfill:gpu .
#
# Layers: OS + virtualenv, then the runtime dependencies (cached until they change in pyproject.toml), then
# the code. The project is installed in editable mode from /app, so service.config.REPO_ROOT is /app
# and alembic.ini, migrations/ and artifacts/ are found where the code expects them.

ARG BASE_IMAGE=python:3.11-slim

# --- OS + virtualenv: python3 from the base image (python:3.11-slim) or from apt (CUDA Ubuntu bases) ---------
FROM ${BASE_IMAGE} AS base
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
RUN set -eux; \
    if ! python3 -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        apt-get update; \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv

# --- the runtime requirements alone, read from pyproject.toml ------------------------------------------------
# A stage of its own, so that editing pyproject.toml elsewhere (dev tools, pytest settings) gives the same two
# files and the dependency layer below stays cached: COPY --from is cached on the files' content.
FROM base AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' > /src/reqs.txt \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["gpu"]))' > /src/gpu.txt

# --- dependencies (cached until the runtime requirements or a build argument change) ------------------------
FROM base AS app
ARG FLAVOR=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY --from=requirements /src/reqs.txt /src/gpu.txt /tmp/
# torch first, pinned as in pyproject.toml, from TORCH_INDEX_URL (an unpinned torch from the default index would
# be the multi-GB CUDA build); then every other runtime dependency (torch is already satisfied); GPU: the `gpu`
# extra replaces faiss-cpu (both install the same `faiss` module, so faiss-cpu goes first). torch's C++ headers
# and its own test suite are for building extensions and for torch's developers (about 145 MB): removed. The
# smoke check at the end: torch and faiss import, and faiss finds 8 vectors' own nearest neighbours.
RUN set -eux; \
    torch_req="$(grep -E '^torch[=<>~! ]' /tmp/reqs.txt)"; \
    pip install --upgrade pip setuptools wheel; \
    if [ -n "$TORCH_INDEX_URL" ]; then pip install "$torch_req" --index-url "$TORCH_INDEX_URL"; \
    else pip install "$torch_req"; fi; \
    pip install -r /tmp/reqs.txt; \
    if [ "$FLAVOR" = "gpu" ]; then \
        pip uninstall -y faiss-cpu; \
        pip install -r /tmp/gpu.txt; \
    fi; \
    rm -f /tmp/reqs.txt /tmp/gpu.txt; \
    site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    rm -rf "$site/torch/include" "$site/torch/test"; \
    python -c 'import faiss, numpy, torch; x = numpy.random.rand(8, 4).astype("float32"); i = faiss.IndexFlatL2(4); i.add(x); assert i.search(x, 1)[1][:, 0].tolist() == list(range(8)); print("torch", torch.__version__, "faiss", faiss.__version__, "cuda" if torch.cuda.is_available() else "cpu")'

# --- the application -------------------------------------------------------------------------------------------
ENV PYTHONUNBUFFERED=1 \
    BACKFILL_ENVIRONMENT=production \
    BACKFILL_DATA_DIR=/app/data
RUN groupadd --system --gid 10001 backfill \
    && useradd --system --uid 10001 --gid backfill --home-dir /app --shell /usr/sbin/nologin backfill
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
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
# Smoke check as the user the containers run as: torch runs the shipped TorchScript encoder, faiss finds its
# own vectors (4 random images, each its own nearest neighbour).
RUN python -c 'import faiss, torch; e = torch.jit.load("artifacts/v1/model.pt"); v = e(torch.rand(4, 1, 28, 28)).detach().numpy(); i = faiss.IndexFlatIP(v.shape[1]); i.add(v); assert i.search(v, 1)[1][:, 0].tolist() == [0, 1, 2, 3]; print("smoke: torch", torch.__version__, "faiss", faiss.__version__, "v1 dim", v.shape[1])'
EXPOSE 8000 9101
# For the api process (the compose file disables / replaces it for migrate and worker).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
CMD ["backfill", "serve", "--host", "0.0.0.0", "--port", "8000"]
