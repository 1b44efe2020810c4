"""The one table of hardware settings: how an organisation holds its base (device, dtype, quantization) and trains
it (gradient checkpointing). The CLI flags, the [model]/[train] config fields and their checks, the Flower
--node-config keys, the keys a client reports at Join, the resume rules and the configuration reference are all
made from SETTINGS; nothing else lists them. No torch here: the CLI builds its flags from this module."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DTYPE_NAMES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8")


@dataclass(frozen=True)
class Setting:
    """One hardware setting: its config key and default, what it means, and the names it goes by elsewhere."""

    key: str  # "<section>.<name>" in a run config; <name> is also the key a client reports it under at Join
    default: Any
    help: str
    choices: tuple[str, ...] = ()  # the values it takes ("cuda:N": cuda and a device index)
    flag: str = ""  # the command-line flag of every command that loads the base
    node_key: str = ""  # a Flower SuperNode's --node-config key (its own holding)
    training_only: bool = False  # offered by the commands that train only
    resumable: bool = True  # a --resume may change it: how a client holds the base changes nothing computed

    @property
    def section(self) -> str:
        return self.key.split(".")[0]

    @property
    def name(self) -> str:
        return self.key.split(".")[1]

    def field(self):
        """The dataclasses.field of its config section."""
        return field(default=self.default, metadata={"help": self.help})


SETTINGS: tuple[Setting, ...] = (
    Setting("model.device", "auto", "where the base lives: auto (cuda when torch sees a GPU, else cpu) | cpu | cuda | "
            "cuda:N", ("auto", "cpu", "cuda", "cuda:N"), "--device", "device"),
    Setting("model.dtype", "auto", "the base's dtype; auto: bfloat16 on a bf16 GPU or under quantization, else "
            "float32", ("auto", *DTYPE_NAMES), "--dtype", "dtype"),
    Setting("model.quantization", "none", "hold the base in 4-bit NF4 (QLoRA) or 8-bit through bitsandbytes",
            QUANTIZATIONS, "--quantization", "quantization"),
    Setting("train.gradient_checkpointing", False, "recompute activations in the backward: less memory, ~30 % more "
            "time", (), "--gradient-checkpointing", "gradient-checkpointing", training_only=True),
)
SETTING = {s.key: s for s in SETTINGS}
