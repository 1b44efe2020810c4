#!/usr/bin/env bash
# End-to-end check of docs/deploy.md's "docker compose" section, from a fresh clone, with rootful podman
# (compose-here.sh) standing in for Docker: a `docker` shim on PATH turns `docker compose ARGS` into
# `compose-here.sh compose ARGS`, and every documented command below is checked to appear verbatim in
# docs/deploy.md.
#
#   sudo scripts/compose_e2e.sh          # ~10 min with a cached image (a cold build adds ~5-8 min)
#
# 1. git clone this repo into a temp dir; bash scripts/compose_prepare.sh; docker compose build (timed).
# 2. docker compose up -d; once round 1 is in metrics.jsonl: each client container sees only its own
#    ./certs/<org> (ls, cat, find), runs as FEDTUNE_UID (not root); the server has no client key. Then SIGKILL
#    org-c: the run must finish with the survivors (min_clients = 2), org-a/org-b exit 0.
# 3. docker compose down; rm -rf runs/compose-demo; docker compose up -d; after round 1 SIGKILL the server;
#    FEDTUNE_RESUME=1 docker compose up -d must finish the run (rounds 1..3 once each, all clients exit 0).
#    Outputs owned by FEDTUNE_UID, exported files 0644.
# Results: $E2E_OUT/results.jsonl (one {"check", "ok", "detail"} per check), summary.txt, logs; exit 0 iff all ok.
#
# Environment: COMPOSE_HERE (compose-here.sh), E2E_SRC (repo to clone; default this checkout — committed
# state only), E2E_OUT (default <this checkout>/runs/compose-e2e), E2E_WHEELS (a prepared wheels/ to copy
# instead of downloading), E2E_LOCAL_STEPS ([train] local_steps of the run, default 60: pacing), E2E_KEEP=1
# (leave containers, clone and podman service up).
set -euo pipefail
HERE_DIR=$(cd "$(dirname "$0")/.." && pwd)
SRC=${E2E_SRC:-$HERE_DIR}
OUT=${E2E_OUT:-$HERE_DIR/runs/compose-e2e}
R=${COMPOSE_HERE:-/work/shared/recipes/compose-here.sh}
[ -f "$R" ] || { echo "compose-here.sh not found at $R (set COMPOSE_HERE)" >&2; exit 2; }
export COMPOSE_HERE=$R
PY=$(command -v python3)
ROUNDS=3
WORK=$(mktemp -d /var/tmp/fedtune-compose-e2e.XXXXXX)
CLONE=$WORK/fedtune
mkdir -p "$OUT"; : >"$OUT/results.jsonl"; : >"$OUT/summary.txt"
t0=$SECONDS
say() { printf '\n== [%4ds] %s\n' $((SECONDS - t0)) "$*" >&2; }
note() { echo "$*" | tee -a "$OUT/summary.txt" >&2; }
check() {  # check NAME OK(0/1 as exit status of the test command...) DETAIL
  local name=$1 ok=$2 detail=${3:-}
  "$PY" -c 'import json,sys; print(json.dumps({"check": sys.argv[1], "ok": sys.argv[2] == "1", "detail": sys.argv[3]}))' \
    "$name" "$ok" "$detail" >>"$OUT/results.jsonl"
  note "CHECK $([ "$ok" = 1 ] && echo ok || echo FAIL): $name ${detail:+— $detail}"
}

# `docker compose ...` → podman via compose-here.sh
mkdir -p "$WORK/bin"
cat >"$WORK/bin/docker" <<'SHIM'
#!/usr/bin/env bash
# docker compose ARGS → compose-here.sh; anything else (docker-compose v1 runs `docker exec` itself) → podman
if [ "${1:-}" = compose ]; then shift; exec bash "$COMPOSE_HERE" compose "$@"; fi
exec podman "$@"
SHIM
chmod +x "$WORK/bin/docker"
export PATH=$WORK/bin:$PATH

readme() {  # run a documented command verbatim (a line of docs/deploy.md, optionally with a # comment)
  local cmd=$1
  "$PY" - "$CLONE/docs/deploy.md" "$cmd" <<'P' || { check "docs have: $cmd" 0 "not found verbatim in docs/deploy.md"; return 1; }
import sys
cmd = sys.argv[2]
sys.exit(0 if any(line.split("  #")[0].strip() == cmd for line in open(sys.argv[1])) else 1)
P
  say "docs/deploy.md: $cmd"
  (cd "$CLONE" && bash -c "$cmd")
}

cleanup() {
  local rc=$?
  if [ "${E2E_KEEP:-0}" = 1 ]; then say "E2E_KEEP=1: leaving $CLONE, containers and the podman service"; return; fi
  say "tear down"
  [ -d "$CLONE" ] && (cd "$CLONE" && docker compose logs --no-color >"$OUT/compose.log" 2>&1 || true)
  [ -d "$CLONE" ] && (cd "$CLONE" && docker compose down -t 2 --remove-orphans >/dev/null 2>&1 || true)
  bash "$R" teardown >/dev/null 2>&1 || true
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT

dc() { (cd "$CLONE" && docker compose "$@"); }
cid() { dc ps -q "$1" 2>/dev/null | head -1; }
status() { local c; c=$(cid "$1"); [ -n "$c" ] && podman inspect --format '{{.State.Status}} {{.State.ExitCode}}' "$c" || echo "none -"; }
rounds_done() {  # number of completed rounds in metrics.jsonl
  "$PY" - "$CLONE/runs/compose-demo/metrics.jsonl" <<'P' 2>/dev/null || echo 0
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(sum(1 for r in rows if "clients_completed" in r))
P
}
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2; shift 2
  local end=$((SECONDS + limit))
  until "$@"; do
    [ $SECONDS -lt $end ] || { note "timeout ($limit s) waiting for $what"; return 1; }
    sleep 0.5
  done
}
exited() { [ "$(status "$1" | cut -d' ' -f1)" = exited ]; }
round_at_least() { [ "$(rounds_done)" -ge "$1" ]; }

say "setup podman (compose-here.sh setup)"
bash "$R" setup
eval "$(bash "$R" env)"

say "fresh clone of $SRC"
git clone -q "$SRC" "$CLONE"
note "clone: $(git -C "$CLONE" log --oneline -1)"
(cd "$CLONE" && docker compose down -t 2 --remove-orphans >/dev/null 2>&1) || true   # leftovers of an earlier run
if [ -n "${E2E_WHEELS:-}" ]; then cp -a "$E2E_WHEELS/." "$CLONE/wheels/"; fi
# Pacing only: the shipped config's rounds take ~1-2 s each with the tiny model, faster than a kill "after round 1"
# can land; more local steps make each round last seconds, so org-c and the server die mid-run, not after it.
steps=${E2E_LOCAL_STEPS:-60}
sed -i "s/^local_steps = .*/local_steps = $steps/" "$CLONE/server/config.toml"
grep -q "^local_steps = $steps$" "$CLONE/server/config.toml" || { echo "server/config.toml has no local_steps line" >&2; exit 2; }

t=$SECONDS; readme "bash scripts/compose_prepare.sh"; note "prepare: $((SECONDS - t)) s"
t=$SECONDS; readme "docker compose build"; build_s=$((SECONDS - t))
note "build: ${build_s} s; image: $(podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' localhost/fedtune:dev)"
uid=$(sed -n 's/^FEDTUNE_UID=//p' "$CLONE/.env"); gid=$(sed -n 's/^FEDTUNE_GID=//p' "$CLONE/.env")
check "containers run as a non-root uid from .env" "$([ -n "$uid" ] && [ "$uid" != 0 ] && echo 1 || echo 0)" "FEDTUNE_UID=$uid"

# ---------------------------------------------------------------- phase 1: secrets, one dead organisation
say "phase 1: up, per-organisation secrets, kill org-c mid-run"
t=$SECONDS; readme "docker compose up -d"
note "up -d: $((SECONDS - t)) s"
tokens=$(cat "$CLONE/certs/server/tokens.toml")
for org in org-a org-b org-c; do
  ls_out=$(dc exec -T "$org" ls -A /certs | tr '\n' ' ' || true)
  check "$org sees only its own cert dir" "$([ "$ls_out" = "ca.pem client.key client.pem token.toml " ] && echo 1 || echo 0)" "ls /certs: $ls_out"
  tok=$(dc exec -T "$org" cat /certs/token.toml || true)
  own=$(grep "^\"$org\"" <<<"$tokens" || true)
  others=$(grep -c "^\"" <<<"$tok" || true)
  check "$org token file holds its token only" "$([ -n "$own" ] && grep -qxF "$own" <<<"$tok" && [ "$others" = 1 ] && echo 1 || echo 0)" "$others token line(s)"
  found=$(dc exec -T "$org" sh -c "find / \\( -path /proc -o -path /sys \\) -prune -o -type f \\( -name '*.key' -o -name 'token*.toml' -o -name 'client.pem' -o -name 'server.pem' -o -name 'health.pem' \\) -print 2>/dev/null | sort | tr '\\n' ' '" || true)
  check "$org: no other keys or tokens in the container" "$([ "$found" = "/certs/client.key /certs/client.pem /certs/token.toml " ] && echo 1 || echo 0)" "$found"
  check "$org runs as $uid:$gid" "$([ "$(dc exec -T "$org" id -u):$(dc exec -T "$org" id -g)" = "$uid:$gid" ] && echo 1 || echo 0)"
  if dc exec -T "$org" sh -c 'echo x > /certs/x' 2>/dev/null; then check "$org certs mount is read-only" 0; else check "$org certs mount is read-only" 1; fi
done
srv_ls=$(dc exec -T server ls -A /certs | tr '\n' ' ' || true)
check "server holds its own key, all tokens, no client key" "$([ "$srv_ls" = "ca.pem health.key health.pem server.key server.pem tokens.toml " ] && echo 1 || echo 0)" "$srv_ls"
check "server runs as $uid" "$([ "$(dc exec -T server id -u)" = "$uid" ] && echo 1 || echo 0)"
wait_for 900 "round 1" round_at_least 1 || true
note "up → round 1: $((SECONDS - t)) s"
killed_after=$(rounds_done)
say "SIGKILL org-c after $killed_after round(s)"
dc kill org-c
wait_for 900 "the server to finish with the survivors" exited server || true
dc logs --no-color >"$OUT/phase1.log" 2>&1 || true
for s in server org-a org-b org-c; do note "phase 1 $s: $(status "$s")"; done
check "phase 1: server exit 0" "$([ "$(status server)" = "exited 0" ] && echo 1 || echo 0)" "$(status server)"
check "phase 1: survivors exit 0" "$([ "$(status org-a)" = "exited 0" ] && [ "$(status org-b)" = "exited 0" ] && echo 1 || echo 0)" "org-a $(status org-a), org-b $(status org-b)"
p1=$("$PY" - "$CLONE/runs/compose-demo" "$ROUNDS" "$killed_after" <<'P'
import json, sys
from pathlib import Path
run, rounds, killed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
done = [(r["round"], r["clients_completed"]) for r in rows if "clients_completed" in r]
summary = json.loads((run / "summary.json").read_text())
ok = ([r for r, _ in done] == list(range(1, rounds + 1)) and killed < rounds
      and all(c == 2 for r, c in done if r > killed + 1) and any(c == 2 for _, c in done)
      and summary.get("rounds_completed") == rounds)
print(int(ok), f"org-c killed after round {killed}; (round, clients): {done}; summary rounds_completed={summary.get('rounds_completed')}")
P
) 2>>"$OUT/checks.err" || p1="0 metrics unreadable (see checks.err)"
check "phase 1: run completes with the survivors" "${p1%% *}" "${p1#* }"

# ---------------------------------------------------------------- phase 2: SIGKILL the server, resume
say "phase 2: start over, SIGKILL the server after round 1, resume with the documented one-liner"
readme "docker compose down"
readme "rm -rf runs/compose-demo"
t=$SECONDS; readme "docker compose up -d"
wait_for 900 "round 1" round_at_least 1 || true
note "phase 2 up → round 1: $((SECONDS - t)) s"
before=$(rounds_done)
dc kill server      # SIGKILL
say "server SIGKILLed after $before round(s); clients keep retrying"
sleep 5
check "clients alive after the server died" "$([ "$(status org-a | cut -d' ' -f1)" = running ] && echo 1 || echo 0)" "org-a $(status org-a)"
t=$SECONDS; readme "FEDTUNE_RESUME=1 docker compose up -d"
wait_for 900 "the resumed server to finish" exited server || true
note "resume → finished: $((SECONDS - t)) s"
wait_for 120 "clients to exit" exited org-a || true
dc logs --no-color >"$OUT/phase2.log" 2>&1 || true
for s in server org-a org-b org-c; do note "phase 2 $s: $(status "$s")"; done
check "phase 2: resumed server exit 0" "$([ "$(status server)" = "exited 0" ] && echo 1 || echo 0)" "$(status server)"
check "phase 2: resumed with --resume" "$(grep -qiE 'resum' "$OUT/phase2.log" && echo 1 || echo 0)"
check "phase 2: clients exit 0" "$([ "$(status org-a)" = "exited 0" ] && [ "$(status org-b)" = "exited 0" ] && [ "$(status org-c)" = "exited 0" ] && echo 1 || echo 0)" "org-a $(status org-a), org-b $(status org-b), org-c $(status org-c)"
p2=$("$PY" - "$CLONE/runs/compose-demo" "$ROUNDS" "$uid" <<'P'
import json, os, stat, sys
from pathlib import Path
run, rounds, uid = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
done = [r["round"] for r in rows if "clients_completed" in r]
summary = json.loads((run / "summary.json").read_text())
print(int(done == list(range(1, rounds + 1)) and summary.get("rounds_completed") == rounds),
      f"rounds {done}; summary rounds_completed={summary.get('rounds_completed')}")
files = [p for p in run.rglob("*") if p.is_file()]
bad_owner = [str(p.relative_to(run)) for p in files if p.stat().st_uid != uid]
print(int(not bad_owner and bool(files)), f"{len(files)} files; not owned by {uid}: {bad_owner}")
exported = [p for p in (run / "adapter").rglob("*") if p.is_file()] + [run / "summary.json", run / "metrics.jsonl"]
bad_mode = [f"{p.relative_to(run)}={oct(stat.S_IMODE(p.stat().st_mode))}" for p in exported
            if stat.S_IMODE(p.stat().st_mode) != 0o644]
print(int(not bad_mode), f"{len(exported)} exported files; not 0644: {bad_mode}")
P
) 2>>"$OUT/checks.err" || p2=$'0 metrics unreadable (see checks.err)\n0 -\n0 -'
{ read -r l1; read -r l2; read -r l3; } <<<"$p2"
check "phase 2: resumed run completes rounds 1..$ROUNDS once each" "${l1%% *}" "${l1#* }"
check "outputs owned by the host uid" "${l2%% *}" "${l2#* }"
check "exported files 0644" "${l3%% *}" "${l3#* }"
readme "docker compose down"

fails=$(grep -c '"ok": false' "$OUT/results.jsonl" || true)
note "total: $((SECONDS - t0)) s; $(grep -c . "$OUT/results.jsonl") checks, $fails failed"
[ "$fails" = 0 ] && { say "E2E PASSED"; exit 0; }
say "E2E FAILED ($fails checks)"; exit 1
