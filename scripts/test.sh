#!/usr/bin/env bash
# The test suite (what CI runs): set up, check generated protobuf code, run pytest (default markers).
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -x scripts/check_protos.sh ]; then bash scripts/check_protos.sh; fi
exec .venv/bin/python -m pytest "$@"
