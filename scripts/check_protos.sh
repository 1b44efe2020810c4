#!/usr/bin/env bash
# CI: fail (exit 1) if the committed generated code differs from what protos/ generates.
set -euo pipefail
cd "$(dirname "$0")/.."
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
bash scripts/gen_protos.sh "$TMP"
status=0
for f in fedtune_pb2.py fedtune_pb2.pyi fedtune_pb2_grpc.py; do
  diff -u "fedtune/transports/wire/$f" "$TMP/$f" || status=1
done
if [ "$status" -ne 0 ]; then
  echo "check_protos: generated code is stale; run scripts/gen_protos.sh and commit" >&2
fi
exit "$status"
