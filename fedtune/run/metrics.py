"""Run outputs: metrics.jsonl (one object per round), metrics.csv, summary.json, plots/loss.png, tb/."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

from fedtune.fileio import publish, write_text_atomic

ROUND_FIELDS = [
    "round", "algorithm", "clients_sampled", "clients_completed", "updates_rejected", "rejected_why", "clients_late",
    "clients_weight_capped", "bytes_up", "bytes_down",
    "payload_bytes_up", "payload_bytes_down", "train_loss", "eval_loss", "test_loss", "epsilon", "delta", "wall_s",
]


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and (math.isnan(v) or math.isinf(v)) else v


class MetricsWriter:
    def __init__(self, out_dir: Path, *, resume_round: int | None = None) -> None:
        self.out = out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.rows: list[dict[str, Any]] = []
        if resume_round is not None and self.path.exists():  # keep rows up to the checkpointed round
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [r for r in rows if r["round"] <= resume_round]
        elif self.path.exists():
            self.path.unlink()
        self._rewrite()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def _rewrite(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k != "round" and v is not None:
                    self.tb.add_scalar(k, v, row["round"])
            self.tb.flush()

    def write_csv(self) -> Path:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        path = self.out / "metrics.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        return publish(path)

    def plot(self) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        path = self.out / "plots" / "loss.png"
        path.parent.mkdir(exist_ok=True)
        fig, ax = plt.subplots(figsize=(6, 4))
        self.plotted: list[str] = []

        def series(axis, keys, **kw):
            for key in keys:
                pts = [(r["round"], r[key]) for r in self.rows if isinstance(r.get(key), int | float)]
                if pts:
                    axis.plot(*zip(*pts), marker="o", label=key, **kw)
                    self.plotted.append(key)

        series(ax, ("train_loss", "eval_loss", "test_loss"))
        ax.set_xlabel("round")
        ax.set_ylabel("loss")
        algo = self.rows[-1].get("algorithm", "") if self.rows else ""
        ax.set_title(f"fedtune {algo}: loss per round")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if any(r.get("test_rouge_l") is not None for r in self.rows):  # [run] generate_every: the task metrics
            task = ax.twinx()
            series(task, ("test_rouge_l", "test_exact_match"), ls="--")
            task.set_ylabel("Rouge-L / exact match (global test set)")
            task.set_ylim(0, 1)
            h2, l2 = task.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        ax.legend(handles, labels)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        publish(path.parent)
        return path

    def summary(self, data: dict[str, Any]) -> Path:
        return write_text_atomic(self.out / "summary.json", json.dumps(data, indent=2, default=str))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
            publish(self.out / "tb")
