#!/usr/bin/env bash
# End-to-end check of docker-compose.yml on this machine (no Docker engine: rootful podman via compose-here.sh).
#
#   sudo scripts/compose_e2e.sh            # setup, wheels, build, run 3 rounds, check, tear down
#
# Steps: compose-here setup (podman, docker-compose v1, local Debian Python base image) → host-side wheels for
# the container's Python into ./wheels (CPU torch pinned by constraints.txt; skipped when up to date) →
# alias the base image as python:3.11-slim → `compose up --build --abort-on-container-exit --exit-code-from
# server` → check runs/compose-demo/metrics.jsonl (3 rounds, clients_completed == 3 each) → log summary →
# `compose down -t 2 -v` and `teardown` (always, also on failure).
#
# Environment: COMPOSE_HERE (path of compose-here.sh), E2E_KEEP=1 (skip down/teardown, for debugging),
# E2E_ROUNDS (expected rounds, default 3), E2E_CLIENTS (default 3).
# Exit status: 0 all good; 1 compose/server failed or the metrics are wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
R=${COMPOSE_HERE:-/work/shared/recipes/compose-here.sh}
[ -f "$R" ] || { echo "compose-here.sh not found at $R (set COMPOSE_HERE)" >&2; exit 2; }
here() { bash "$R" "$@"; }
ROUNDS=${E2E_ROUNDS:-3}
CLIENTS=${E2E_CLIENTS:-3}
RUN_DIR=$ROOT/runs/compose-demo
LOG=$ROOT/runs/compose-e2e.log
SERVICES=(server org-a org-b org-c)   # named: docker-compose v1 then does not attach the one-shot `certs`
PY=$(command -v python3)

say() { printf '\n== %s\n' "$*" >&2; }
t_start=$SECONDS

cleanup() {
  local rc=$?
  if [ "${E2E_KEEP:-0}" = 1 ]; then say "E2E_KEEP=1: leaving containers and the podman service up"; return; fi
  say "tear down"
  here compose down -t 2 -v --remove-orphans >/dev/null 2>&1 || true
  here teardown || true
  exit $rc
}
trap cleanup EXIT

say "setup (podman, docker-compose, base image)"
here setup

say "wheels for the container's Python"
# wheels/requirements.txt = [project] dependencies of pyproject.toml; resolved with constraints.txt.
mkdir -p wheels
printf '*\n' >wheels/.gitignore           # never committed
"$PY" - >wheels/requirements.txt.new <<'PYEOF'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(deps))
PYEOF
# Touch nothing when unchanged: podman's build cache keys COPY layers on file metadata (mtime) too.
if cmp -s wheels/requirements.txt.new wheels/requirements.txt; then rm wheels/requirements.txt.new
else mv wheels/requirements.txt.new wheels/requirements.txt; fi
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f wheels/.stamp ] && [ "$(cat wheels/.stamp)" = "$stamp" ]; then
  echo "wheels up to date ($(find wheels -name '*.whl' | wc -l) wheels, $(du -sh wheels | cut -f1))" >&2
else
  here wheels wheels -c constraints.txt -r wheels/requirements.txt "setuptools>=68"
  here wheels wheels --no-deps chatterbot-corpus==1.3.3
  echo "$stamp" >wheels/.stamp
fi

say "alias the local base image as python:3.11-slim"
here alias python:3.11-slim

say "fresh outputs"
rm -rf "$RUN_DIR"
mkdir -p "$ROOT/runs"
here compose down -t 2 -v --remove-orphans >/dev/null 2>&1 || true   # leftovers of an earlier run

say "build"
# One build per image (server+certs share fedtune-server, org-* share fedtune-client): docker-compose v1
# uploads the whole context (~350 MB of wheels) once per service built. `up --build` also works, just slower.
t_build=$SECONDS
here compose build server org-a
build_s=$((SECONDS - t_build))

say "compose up (${SERVICES[*]})"
t_up=$SECONDS
set +e
here compose up --abort-on-container-exit --exit-code-from server "${SERVICES[@]}" 2>&1 | tee "$LOG"
up_rc=${PIPESTATUS[0]}
set -e
up_s=$((SECONDS - t_up))

# Exit codes of every container (before `down` removes them).
eval "$(here env)"
declare -A codes=()
for svc in certs "${SERVICES[@]}"; do
  cid=$(docker-compose ps -q "$svc" 2>/dev/null | head -1 || true)
  if [ -n "$cid" ]; then
    codes[$svc]=$(podman inspect --format '{{.State.ExitCode}}' "$cid" 2>/dev/null || echo '?')
  else
    codes[$svc]='-'
  fi
done

say "check $RUN_DIR/metrics.jsonl"
set +e
check=$("$PY" - "$RUN_DIR/metrics.jsonl" "$ROUNDS" "$CLIENTS" <<'PYEOF'
import json, sys
path, rounds, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    rows = [json.loads(line) for line in open(path) if line.strip()]
except FileNotFoundError:
    print(f"FAIL: {path} missing"); sys.exit(1)
rnd = [r for r in rows if "clients_completed" in r]
bad = [r.get("round") for r in rnd if r["clients_completed"] != clients]
for r in rnd:
    print(f"  round {r.get('round')}: clients_completed={r['clients_completed']}"
          + "".join(f" {k}={r[k]:.4g}" if isinstance(r[k], float) else f" {k}={r[k]}"
                    for k in ("eval_loss", "train_loss", "bytes_up", "bytes_down", "round_s", "wall_s") if k in r))
ok = len(rnd) == rounds and not bad
print(("OK" if ok else "FAIL") + f": {len(rnd)} round rows (want {rounds}), rounds with clients_completed != {clients}: {bad}")
sys.exit(0 if ok else 1)
PYEOF
)
check_rc=$?
set -e

say "summary"
{
  echo "build: ${build_s}s  up→exit: ${up_s}s  total: $((SECONDS - t_start))s"
  echo "images: $(podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep fedtune- | tr '\n' ' ')"
  echo "exit codes: compose=$up_rc $(for s in certs "${SERVICES[@]}"; do printf '%s=%s ' "$s" "${codes[$s]}"; done)"
  echo "log: $LOG"
  grep -E 'listening on port|joined run|round [0-9]+: (trained|update from)|run finished|^server_1 .*done:|done: [0-9]+ rounds|Traceback|error:' "$LOG" \
    | sed 's/^/  /' | tail -40
  echo "metrics:"
  echo "$check"
} | tee "$ROOT/runs/compose-e2e.summary" >&2

[ "$up_rc" = 0 ] && [ "$check_rc" = 0 ] && { say "E2E PASSED"; exit 0; }
say "E2E FAILED (compose exit $up_rc, metrics check $check_rc)"
exit 1
