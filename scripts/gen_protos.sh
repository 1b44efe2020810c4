#!/usr/bin/env bash
# Regenerate fedtune/transports/wire/fedtune_pb2{,_grpc}.py(+.pyi) from protos/. Usage: gen_protos.sh [OUT_DIR]
# Needs grpcio-tools (pinned in constraints.txt: the generated code records its version).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
OUT="${1:-fedtune/transports/wire}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m grpc_tools.protoc -I protos \
  --python_out="$TMP" --pyi_out="$TMP" --grpc_python_out="$TMP" \
  protos/fedtune/v1/fedtune.proto
mkdir -p "$OUT"
# Flatten into the package; make the stub import package-relative.
sed 's/^from fedtune\.v1 import fedtune_pb2 as/from fedtune.transports.wire import fedtune_pb2 as/' \
  "$TMP/fedtune/v1/fedtune_pb2_grpc.py" > "$OUT/fedtune_pb2_grpc.py"
cp "$TMP/fedtune/v1/fedtune_pb2.py" "$TMP/fedtune/v1/fedtune_pb2.pyi" "$OUT/"
grep -q '^from fedtune.transports.wire import fedtune_pb2 as' "$OUT/fedtune_pb2_grpc.py" \
  || { echo "gen_protos: import rewrite failed" >&2; exit 1; }
