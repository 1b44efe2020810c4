#!/usr/bin/env bash
# One command: set up, then run the main demo (SmolLM2 + FLoRA, 4 non-IID clients, 3 rounds).
# Extra arguments go to `fedtune simulate`, e.g. scripts/demo.sh --algorithm fedavg --out runs/fedavg
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fedtune simulate --config simulations/demo.toml "$@"
