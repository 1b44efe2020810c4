#!/usr/bin/env bash
# The test suite (what CI runs): set up, check generated protobuf code and the import layering, run pytest
# (default markers).
# Extra arguments go to pytest, e.g. scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -x scripts/check_protos.sh ]; then bash scripts/check_protos.sh; fi
.venv/bin/lint-imports --no-cache  # the layers contract in pyproject.toml [tool.importlinter]
exec .venv/bin/python -m pytest "$@"
