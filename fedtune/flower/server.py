"""The Flower ServerApp: fedtune's `simulate()` (same model, data, algorithm, RoundEngine, evaluation,
checkpoints, metrics, exports) with the rounds carried by a FlowerTransport over the Grid."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtune.config import RunConfig
from fedtune.flower.runconfig import resolve_config
from fedtune.flower.transport import FlowerTransport, discover

log = logging.getLogger("fedtune")


def run_server(grid: Grid, cfg: RunConfig, *, resume: bool = False, progress: bool = False,
               save_merged: bool = False) -> dict[str, Any]:
    from fedtune.simulation import simulate

    node_of = discover(grid, cfg.federation.num_clients)
    log.info("flower: %d nodes host clients %s", len(node_of), sorted(node_of))
    holder: dict[str, FlowerTransport] = {}

    def factory(engine, gm, data, pad_id):
        holder["t"] = FlowerTransport(grid, node_of, engine.algo).attach(engine)
        return holder["t"]

    summary = simulate(cfg, resume=resume, progress=progress, save_merged=save_merged, transport_factory=factory)
    t = holder["t"]
    summary["engine"] = "flower"
    summary["flower"] = {
        "message_bytes_down_total": sum(r["down"] for r in t.flower_rounds),
        "message_bytes_up_total": sum(r["up"] for r in t.flower_rounds),
        "resyncs": t.resyncs, "rounds": t.flower_rounds,
        "node_of": {c: str(n) for c, n in sorted(node_of.items())},
    }
    (Path(summary["metrics"]).parent / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def make_server_app(cfg: RunConfig | None = None, *, result: dict | None = None, resume: bool = False,
                    progress: bool = False, save_merged: bool = False) -> ServerApp:
    """The fedtune ServerApp. `cfg` None → read from the Flower run config (runconfig.py). The summary
    is put in `result["summary"]` when `result` is given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else resolve_config(context.run_config)
        summary = run_server(grid, run_cfg, resume=resume, progress=progress, save_merged=save_merged)
        if result is not None:
            result["summary"] = summary

    return app
