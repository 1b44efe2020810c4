"""The one extension point: a federated method is a `FedAlgorithm` (server side, pure) plus a
`ClientAlgorithm` (client side), registered by name (fedtune.algorithms.registry) with what it can do
(`Capabilities`, `train_fields`, `metric_ranges`, `resumable`): wrappers, transports and config checks ask these,
never a method's name.

Life of a client model, for every method:
  setup(model, setup_payload)  once: attach adapters / shared frozen factors / seed set
  sync(model, sync_payload)    bring the local model to the global version (load, merge or replay)
  train(model, data, config)   start from the synced global model, train, return a ClientUpdate,
                               and leave the model at the synced global state again (so it can be
                               evaluated or trained for another client sharing the same base).

The server never sees a model's weights: `aggregate` works on `ClientUpdate.tensors` only, is pure
(no I/O, no globals) and deterministic. Every update is checked against `expected_update` (what the
method assigned that client this round) by `validate_update` before `aggregate` sees it.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from fedtune.models.hardware import Placement
from fedtune.secagg.encode import Part
from fedtune.secagg.noise import NoiseParams

TensorDict = dict[str, torch.Tensor]


@dataclass
class Payload:
    """Tensors plus JSON-able metadata: what travels server → client."""

    tensors: TensorDict = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientUpdate:
    """What a client sends back after local training."""

    client_id: str
    num_examples: int
    tensors: TensorDict
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class GlobalState:
    """Global state of a run. `version` counts the aggregations applied so far."""

    version: int = 0
    tensors: TensorDict = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Instruction:
    """One client's task for one round."""

    round: int
    client_id: str
    base_version: int  # the global version the client is at after applying `sync`
    train: dict[str, Any]  # JSON-able training config (steps, lr, rank, seed, ...)
    sync: Payload = field(default_factory=Payload)
    setup: Payload | None = None  # only for a client that has not been set up yet


@dataclass
class TrainContext:
    """What the local trainer needs besides the model and the round's config."""

    client_id: str
    features: Sequence[dict[str, list[int]]]  # tokenized examples: {"input_ids", "labels"}
    pad_id: int
    on_step: Callable[[int, float], None] | None = None  # progress hook (step, loss)


@dataclass(frozen=True, eq=False)
class TensorSpec:
    """One expected update tensor: exact shape and dtype; optional inclusive value bounds (lo, hi); optional
    magnitude bound: every element within `radius` of `near` (a tensor of the same shape, e.g. the global tensor the
    update replaces; None: of 0). `radius` comes from what local training can do (adam_radius)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    bounds: tuple[float, float] | None = None
    near: torch.Tensor | None = None
    radius: float = math.inf


# |one AdamW step| per coordinate, in units of lr, for any gradients (β1 = 0.9, β2 = 0.999, bias-corrected): by
# Cauchy–Schwarz |m̂/√v̂| ≤ (1−β1)/√(1−β2) / √(1 − β1²/β2) ≈ 7.27 (Kingma & Ba's 3.16 is the single-spike case).
ADAM_STEP_BOUND = 8.0


def adam_radius(train: Mapping[str, Any], start: float) -> float:
    """How far `steps` AdamW steps at `lr` (decoupled weight decay `weight_decay`) can move any coordinate that
    starts at |θ| ≤ `start`: τ·lr·(B + wd·(start + τ·lr·B)), B = ADAM_STEP_BOUND. No honest first-order client of
    fedtune (any data, DP noise, FedProx terms: AdamW normalises them all) can move a parameter further; inf when the
    train config does not say its steps and lr."""
    try:
        tau, lr, wd = int(train["steps"]), float(train["lr"]), float(train.get("weight_decay", 0.0))
    except (KeyError, TypeError, ValueError):
        return math.inf
    walk = tau * lr * ADAM_STEP_BOUND
    return walk + tau * lr * wd * (start + walk)


@dataclass
class UpdateSpec:
    """What one client must send this round: exactly these tensors. `check` adds method-specific tests
    (raise UpdateRejected) that cannot be said with shapes, dtypes and bounds."""

    tensors: dict[str, TensorSpec]
    check: Callable[[ClientUpdate], None] | None = None


class UpdateRejected(ValueError):
    """A client update does not match what was assigned; the message names the problem (one line)."""


MAX_METRICS = 32  # honest clients send ≤ 7 (train_loss, epsilon, delta, noise_multiplier, sample_rate, zo_*)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")  # metric and module names: dotted identifiers
MetricRange = tuple[float, float, bool]  # (lo, hi, NaN allowed), inclusive
# The values the server reads (train loss in the round row, ε/δ in the privacy report, memory), with the range an
# honest client can produce; NaN allowed where an honest client can report it (a client whose DP Poisson batches
# were all empty has no train loss). A method adds its own (FedAlgorithm.metric_ranges).
METRIC_RANGES: dict[str, MetricRange] = {
    "train_loss": (0.0, 1e4, True),  # cross-entropy: ln(vocabulary) ≈ 14 even for a 1M-token vocabulary
    "epsilon": (0.0, math.inf, False),
    "delta": (0.0, 1.0, False),
    "noise_multiplier": (0.0, math.inf, False),
    "sample_rate": (0.0, 1.0, False),
    "mem_peak_mb": (0.0, 2.0**40, False),  # the client process's peak RSS
    "cuda_mem_peak_mb": (0.0, 2.0**40, False),  # torch.cuda.max_memory_allocated
}


def validate_metrics(update: ClientUpdate, ranges: Mapping[str, MetricRange] | None = None) -> None:
    """Refuse (UpdateRejected) client-reported metrics the server cannot trust: more than MAX_METRICS, a name
    that is not an identifier of ≤ 64 characters, a value that is not a number, or a known metric outside its
    range (METRIC_RANGES, or `ranges`: those plus the method's; a negative or NaN loss, ε < 0, δ ∉ [0, 1], ...).
    Unknown names are kept but never read."""
    ranges = METRIC_RANGES if ranges is None else ranges
    who, m = f"update from {update.client_id!r}", update.metrics
    if not isinstance(m, dict) or len(m) > MAX_METRICS:
        raise UpdateRejected(f"{who}: {len(m) if isinstance(m, dict) else type(m).__name__} metrics, at most "
                             f"{MAX_METRICS} allowed")
    for k, v in m.items():
        if not isinstance(k, str) or not _IDENT.fullmatch(k):
            raise UpdateRejected(f"{who}: metric name {str(k)[:80]!r} is not an identifier of at most 64 characters")
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise UpdateRejected(f"{who}: metric {k} is a {type(v).__name__}, not a number")
        if k in ranges:
            lo, hi, nan_ok = ranges[k]
            if math.isnan(v) and not nan_ok or not math.isnan(v) and not lo <= v <= hi:
                raise UpdateRejected(f"{who}: metric {k} = {v!r} is outside [{lo:g}, {hi:g}]")


def validate_update(spec: UpdateSpec, update: ClientUpdate, *, max_examples: int | None = None,
                    metric_ranges: Mapping[str, MetricRange] | None = None) -> None:
    """Refuse (UpdateRejected) an update whose tensor names, shapes or dtypes differ from `spec`, that holds
    a non-finite or out-of-bounds value, whose num_examples is not in [1, max_examples], or whose metrics fail
    validate_metrics (with `metric_ranges`)."""
    who = f"update from {update.client_id!r}"
    n = update.num_examples
    if not isinstance(n, int) or n < 1:
        raise UpdateRejected(f"{who}: num_examples must be a positive integer, got {n!r}")
    if max_examples is not None and n > max_examples:
        raise UpdateRejected(f"{who}: num_examples = {n} exceeds the allowed {max_examples} "
                             "(what the client declared at Join, or [server] max_examples_per_client)")
    validate_metrics(update, metric_ranges)
    missing, extra = sorted(set(spec.tensors) - set(update.tensors)), sorted(set(update.tensors) - set(spec.tensors))
    if missing:
        raise UpdateRejected(f"{who}: {len(missing)} expected tensor(s) missing, e.g. {missing[0]!r}")
    if extra:
        raise UpdateRejected(f"{who}: {len(extra)} unexpected tensor(s), e.g. {extra[0][:100]!r}")
    for name in sorted(spec.tensors):
        want, t = spec.tensors[name], update.tensors[name]
        if tuple(t.shape) != tuple(want.shape):
            raise UpdateRejected(f"{who}: {name} has shape {tuple(t.shape)}, expected {tuple(want.shape)}")
        if t.dtype != want.dtype:
            raise UpdateRejected(f"{who}: {name} has dtype {t.dtype}, expected {want.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UpdateRejected(f"{who}: {name} has {bad} non-finite value(s) (NaN/inf)")
        if want.bounds is not None and t.numel():
            lo, hi = want.bounds
            tmin, tmax = t.min().item(), t.max().item()
            if tmin < lo or tmax > hi:
                raise UpdateRejected(f"{who}: {name} has values in [{tmin:g}, {tmax:g}], allowed [{lo:g}, {hi:g}]")
        if math.isfinite(want.radius) and t.numel():
            far = float(((t.double() - want.near.double()) if want.near is not None else t.double()).abs().max())
            if not far <= want.radius:
                where = "from the global model" if want.near is not None else "from 0"
                raise UpdateRejected(f"{who}: {name} moves {far:.3g} {where}; local training as configured moves no "
                                     f"value more than {want.radius:.3g} (a magnitude an honest client cannot send)")
    if spec.check is not None:
        spec.check(update)


class InstructionRejected(ValueError):
    """A task from the coordinator that this client will not run; the message names the field (one line)."""


# What a client accepts from the coordinator (hostile or buggy input: absurd values would allocate GBs, train for
# days or crash mid-round). Generous for real runs; `fedtune` refuses configs beyond them before a run starts.
MAX_LOCAL_STEPS = 100_000
MAX_BATCH_SIZE = 4096
MAX_GRAD_ACCUM = 1024
MAX_RANK = 1024  # LoRA rank: r·(d_in + d_out) floats per target module
_INT63 = 2**63 - 1


class Bound(NamedTuple):
    """What a client accepts for one train-config key: an "int" or "float" in [lo, hi] (lo excluded when lo_open),
    one of `choices` ("choice"), or a map ("dict")."""

    kind: str
    lo: float = 0.0
    hi: float = 0.0
    lo_open: bool = False
    choices: tuple[str, ...] = ()


# Every key the engine puts in a train config (fedtune.run.assemble.train_config + the per-client seed); a method's
# configure_round may add its own (FedAlgorithm.train_fields). Unknown keys are refused: a setting this client does
# not know (say a newer privacy knob) must not be silently ignored.
TRAIN_FIELDS: dict[str, Bound] = {
    "steps": Bound("int", 1, MAX_LOCAL_STEPS),
    "batch_size": Bound("int", 1, MAX_BATCH_SIZE),
    "grad_accum": Bound("int", 1, MAX_GRAD_ACCUM),
    "seed": Bound("int", 0, _INT63),
    "lr": Bound("float", 0.0, 10.0),
    "weight_decay": Bound("float", 0.0, 1e3),
    "max_grad_norm": Bound("float", 0.0, 1e6),
    "privacy": Bound("dict"),
    "secagg": Bound("dict"),  # secure aggregation's round parameters (fedtune.secagg.protocol.RoundParams)
}

# LoRA numbers a setup payload's meta may carry (checked by validate_instruction); FLoRA's train config reuses them.
SETUP_FIELDS: dict[str, Bound] = {
    "rank": Bound("int", 1, MAX_RANK),
    "alpha": Bound("float", 0.0, 1e6, lo_open=True),
    "dropout": Bound("float", 0.0, 1.0),
}


def check_number(value: Any, what: str, kind: str, lo: float, hi: float, lo_open: bool = False) -> None:
    """InstructionRejected unless `value` is an int (kind "int") or a finite int/float in [lo, hi] (lo excluded
    when lo_open). bool is not a number here."""
    ok_type = isinstance(value, int) if kind == "int" else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or not (lo < value if lo_open else lo <= value) or not value <= hi:
        fmt = (lambda x: str(int(x))) if kind == "int" else (lambda x: f"{x:g}")
        interval = f"{'(' if lo_open else '['}{fmt(lo)}, {fmt(hi)}]"
        raise InstructionRejected(f"{what} = {str(value)[:40]!r} is not {'an integer' if kind == 'int' else 'a number'}"
                                  f" in {interval}")


def validate_instruction(ins: Instruction, fields: Mapping[str, Bound] | None = None) -> None:
    """Refuse (InstructionRejected) a task whose train config has a key outside `fields` (TRAIN_FIELDS plus the
    method's own) or a value outside its Bound, or whose setup asks for a LoRA rank/alpha/dropout out of range;
    before anything is allocated or trained. (Tensor shapes are checked where each method applies its
    setup/sync payload.)"""
    fields = TRAIN_FIELDS if fields is None else fields
    t = ins.train
    if not isinstance(t, dict):
        raise InstructionRejected(f"train config is a {type(t).__name__}, not a map")
    if unknown := sorted(set(t) - set(fields)):
        raise InstructionRejected(f"train config has unknown keys {[str(k)[:40] for k in unknown[:5]]}; this client "
                                  f"knows {sorted(fields)} (is it older than the coordinator?)")
    for k, v in t.items():
        b = fields[k]
        if b.kind == "choice" and v not in b.choices:
            raise InstructionRejected(f"train.{k} = {str(v)[:40]!r} is not one of {list(b.choices)}")
        elif b.kind == "dict" and not isinstance(v, dict):
            raise InstructionRejected(f"train.{k} is a {type(v).__name__}, not a map")
        elif b.kind in ("int", "float"):
            check_number(v, f"train.{k}", b.kind, b.lo, b.hi, b.lo_open)
    meta = ins.setup.meta if ins.setup is not None else {}
    for k, b in SETUP_FIELDS.items():
        if k in meta:
            check_number(meta[k], f"setup.{k}", b.kind, b.lo, b.hi, b.lo_open)
    targets = meta.get("target_modules", [])  # peft reads a str as a regex over every module name
    if not isinstance(targets, list) or len(targets) > 64 or not all(
            isinstance(x, str) and _IDENT.fullmatch(x) for x in targets):
        raise InstructionRejected(f"setup.target_modules = {str(targets)[:80]!r} is not a list of at most 64 module "
                                  "names")


HOLDINGS = ("float32", "bfloat16", "float16", "nf4", "int8")  # how a client may hold its base (models.hardware)


@dataclass(frozen=True)
class Capabilities:
    """What a method can do, declared by the method (FedAlgorithm.capabilities). Wrappers, the config checks, the
    transports and the conformance tests ask these, never the method's name."""

    # aggregate = the example-weighted mean of fixed-shape update tensors that replace the state tensors of the
    # same names (FedAvg's A/B, Fed-SB's R): what client-level DP clips and noises, and what [robust] trims per
    # coordinate
    tensor_average: bool = False
    # the global weight change is Σ_k p_k (the change client k's update alone would make): FLoRA's stacked
    # products, Fed-SB's R, FedKSeed's replayed steps; not FedAvg (the product of averaged factors)
    exact: bool = False
    # how [robust] measures and bounds one update: "delta" (‖θ_k − θ_g‖₂ over its tensors, clipped toward θ_g),
    # "lora_product" (a fresh LoRA: ‖s·B·A‖_F, clipped by scaling B); "" = [robust] refused, see robust_refusal
    update_norm: str = ""
    robust_refusal: str = ""
    no_tensor_average: str = ""  # why its aggregate is not a tensor average: said when client-level DP or a
    # coordinate-wise [robust] aggregator is refused
    sample_dp: bool = True  # [privacy] mode = "sample": its clients train under DP (opacus, or its own mechanism)
    batched: bool = False  # its client's train_many trains a round's clients in one batched loop (simulation)
    data_init: bool = False  # initialize reads a few tokenized examples given by set_init_data first
    baseline: bool = False  # a one-client run is plain LoRA training: what `--baseline local|central` runs
    holdings: frozenset[str] = frozenset(HOLDINGS)  # the base holdings its clients can train on
    # [secagg]: its aggregate needs only Σ_k w_k x_k of fixed-shape vectors (secure_layout / secure_vector /
    # apply_secure), so the coordinator can learn the sum alone; no_secure_sum says why not when False
    secure_sum: bool = False
    no_secure_sum: str = ""
    export: str = "adapter"  # the run's result: "adapter" (a peft LoRA adapter) or "merged" (a full model)


class ClientAlgorithm(ABC):
    """Client side of a method. One instance per local model copy."""

    # A non-empty sync payload carries the whole global state (not a delta to replay): after setup, the
    # latest one alone rebuilds the model (lets a node that persists its payloads keep only that one).
    sync_replaces_state: ClassVar[bool] = False
    export_info: dict[str, Any] | None = None  # what the last export_factors did (e.g. a truncation), for summary.json

    def __init__(self) -> None:
        from fedtune.privacy.sample import SampleLevelDP

        self.dp = SampleLevelDP()  # per-client sample-level DP accountants (used when training under DP)

    def state_dict(self) -> dict[str, Any]:
        """Client-side state that must survive a restart (DP accountants)."""
        return {"dp": self.dp.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dp.load_state_dict(state.get("dp", {}))

    @abstractmethod
    def setup(self, model: nn.Module, payload: Payload, holding: Placement | None = None) -> nn.Module:
        """Prepare the base model once (e.g. wrap with peft); return the model to train. `holding`: how the base is
        held (device, dtype, quantization: the loader's Placement; None: read off the model)."""

    @abstractmethod
    def sync(self, model: nn.Module, payload: Payload) -> None:
        """Apply a sync payload so the local model equals the global model."""

    @abstractmethod
    def train(self, model: nn.Module, ctx: TrainContext, config: dict[str, Any]) -> ClientUpdate:
        """Train from the synced global model; return the update; restore the global model."""

    def fork(self, model: nn.Module) -> nn.Module | None:
        """Optional (simulation worker threads): a copy of the synced `model` that shares every frozen base
        tensor with it and owns what `train` writes (adapter weights, their optimiser), so that clients can
        train on forks in parallel threads; `train(fork, ...)` must give the same update, bit for bit, as
        `train(model, ...)`. None: the method cannot train clients concurrently (e.g. full-parameter ZO)."""
        return None

    def train_many(self, model: nn.Module, ctxs: list[TrainContext], configs: list[dict[str, Any]],
                   ) -> list[ClientUpdate] | None:
        """Optional (Capabilities.batched): a round's clients in one batched loop, or None when they cannot share
        one (different schedules, DP, ...): the caller then trains them one by one."""
        return None

    def secure_vector(self, update: ClientUpdate, layout: Sequence[Part]) -> dict[str, np.ndarray]:
        """Capabilities.secure_sum: the vector x_k this client's `update` adds to the secure sum, {part name: float64
        array of the part's shape} for the round's `layout` (FedAlgorithm.secure_layout); by default the change of
        each update tensor from the synced global tensor of the same name (`global_of`)."""
        ref = self.global_of()
        if ref is None:
            raise TypeError(f"{type(self).__name__} has no secure vector (Capabilities.secure_sum is False)")
        return {p.name: (update.tensors[p.name].detach().to("cpu", torch.float64)
                         - ref[p.name].detach().to("cpu", torch.float64)).numpy() for p in layout}

    def global_of(self) -> TensorDict | None:
        """The synced global tensors an update of this client replaces (for the default secure_vector)."""
        return None

    def export_factors(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
        """Optional: the current global adapter as {module: (A (r×d_in), B (d_out×r))}, scale folded
        into B. None if the method cannot export a LoRA adapter."""
        return None


class FedAlgorithm(ABC):
    """Server side of a method. `aggregate` must be pure and deterministic.

    A method declares, beside its code: `name` (its registry key and config section), `config_class` (the
    dataclass of its section), `capabilities` (see Capabilities), `train_fields` (the train-config keys its
    configure_round adds to TRAIN_FIELDS, with what a client accepts), `metric_ranges` (client metrics it reports
    beyond METRIC_RANGES), `resumable` (its config keys a --resume may change) and `state_format`."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    # Layout and meaning of the global state; bump it when either changes: a checkpoint stamped with another
    # format is refused on resume instead of being misread (see fedtune.run.assemble.check_resumed_state).
    state_format: ClassVar[int] = 1
    train_fields: ClassVar[Mapping[str, Bound]] = {}
    metric_ranges: ClassVar[Mapping[str, MetricRange]] = {}
    resumable: ClassVar[tuple[str, ...]] = ()
    CAPABILITIES: ClassVar[Capabilities] = Capabilities()

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def capabilities(self) -> Capabilities:
        """What this method can do with its config (a method whose abilities depend on its settings overrides)."""
        return self.CAPABILITIES

    def holding_problem(self, quantization: str, dtype: str) -> str | None:
        """Why this method, as configured, cannot train on a base held with `quantization` / `dtype` (a dtype name,
        or "auto"), and what to use instead (one line); None when it can."""
        holding = quantization if quantization != "none" else dtype
        if holding == "auto" or holding in self.capabilities.holdings:
            return None
        return (f"{self.name} cannot train on a {holding} base; it supports "
                f"{', '.join(h for h in HOLDINGS if h in self.capabilities.holdings)}")

    def set_init_data(self, features: Sequence[dict[str, list[int]]], pad_id: int) -> None:
        """Capabilities.data_init: a few tokenized examples for `initialize` (called before it)."""
        raise TypeError(f"{self.name} takes no init data (Capabilities.data_init is False)")

    @abstractmethod
    def initialize(self, model: nn.Module, *, seed: int) -> GlobalState:
        """Global state before round 1 (may read the model's shapes; must not keep it)."""

    def setup_payload(self, state: GlobalState) -> Payload:
        """What a client needs once before its first round (shared factors, seed set, ...)."""
        return Payload(meta={"algorithm": self.name})

    @abstractmethod
    def sync_payload(self, state: GlobalState, from_version: int) -> Payload:
        """What a client at `from_version` needs to reach `state.version`."""

    def configure_round(
        self, rnd: int, state: GlobalState, client_ids: Sequence[str], base_train: dict[str, Any],
        roster: Sequence[str],
    ) -> dict[str, dict[str, Any]]:
        """Per-client training config for this round (default: the same for all). `roster` is the
        full ordered list of the run's clients (for per-client settings such as FLoRA ranks)."""
        return {cid: dict(base_train) for cid in client_ids}

    @abstractmethod
    def expected_update(self, state: GlobalState, train: dict[str, Any]) -> UpdateSpec:
        """The update a client given training config `train` (from configure_round) must send back this
        round. Every transport validates against it (validate_update) before `aggregate`."""

    @abstractmethod
    def aggregate(
        self, rnd: int, state: GlobalState, updates: Sequence[ClientUpdate]
    ) -> tuple[GlobalState, dict[str, float]]:
        """New global state (version + 1) and aggregate metrics. PURE. Updates are already validated."""

    @abstractmethod
    def make_client(self) -> ClientAlgorithm:
        """A client-side instance configured like this algorithm."""

    # -- secure aggregation (Capabilities.secure_sum) --------------------------------------------------------------
    @property
    def uniform_weights(self) -> bool:
        """Clients weigh 1 each in the mean (else by their training examples)."""
        return bool(getattr(self.config, "uniform", False))

    def secure_layout(self, state: GlobalState, train: dict[str, Any], clip: float) -> tuple[Part, ...]:
        """What a client's update becomes under secure aggregation: ordered parts with shapes and per-coordinate
        bounds (`clip`: [secagg] clip, for parts without a bound of their own). Default: the change of every state
        tensor the update replaces (expected_update's names), weighted, bounded by the smaller of `clip` and the
        update's magnitude bound (what its local training can move a value)."""
        self._secure_or_refuse()
        spec = self.expected_update(state, train)
        # an honest change never exceeds the update's magnitude bound (TensorSpec.radius): a tighter clip, a finer scale
        return tuple(Part(k, tuple(spec.tensors[k].shape), min(clip, spec.tensors[k].radius)) for k in sorted(spec.tensors))

    def secure_l2_clip(self) -> float:
        """An L2 bound each client scales its whole secure vector to before encoding (client-level DP under secure
        aggregation: the clipping the coordinator can no longer do); 0: none."""
        return 0.0

    def secure_noise(self, state: GlobalState) -> tuple[int, NoiseParams] | None:
        """(ring bits, noise) when each client adds its share of DP noise before masking (distributed DP:
        fedtune.algorithms.wrappers.distributed_dp); None: no noise in the ring."""
        return None

    def apply_secure(self, rnd: int, state: GlobalState, parts: Mapping[str, torch.Tensor],
                     updates: Sequence[ClientUpdate]) -> tuple[GlobalState, dict[str, float]]:
        """New global state from the decoded secure sum: `parts` as secure_layout names them (weighted parts:
        Σ w_k x_k / Σ w_k, float64), `updates` the summed clients' metadata (num_examples, metrics; no tensors).
        PURE. Default: each replaced state tensor moves by its mean change."""
        self._secure_or_refuse()
        tensors = dict(state.tensors)
        for k, mean in parts.items():
            tensors[k] = (state.tensors[k].double() + mean.to(torch.float64)).to(state.tensors[k].dtype)
        return GlobalState(version=state.version + 1, tensors=tensors, meta=dict(state.meta)), {}

    def _secure_or_refuse(self) -> None:
        if not self.capabilities.secure_sum:
            raise TypeError(f"{self.name} cannot aggregate securely: "
                            f"{self.capabilities.no_secure_sum or 'it declares no secure sum'}")

    @classmethod
    def quick_settings(cls) -> dict[str, Any]:
        """[<method>] settings under which a seconds-long run on the tiny test model learns visibly (the conformance
        tests use them); {} when the defaults do."""
        return {}

    @classmethod
    def accepts(cls) -> dict[str, Bound]:
        """Every train-config key a client of this method accepts: TRAIN_FIELDS and the method's own."""
        return {**TRAIN_FIELDS, **cls.train_fields}

    def metrics_accepted(self) -> dict[str, MetricRange]:
        """The client metrics whose range the server checks: METRIC_RANGES and the method's own."""
        return {**METRIC_RANGES, **self.metric_ranges}


def update_norm(kind: str, state: GlobalState, u: ClientUpdate) -> float:
    """The size of one update, as its method measures it (Capabilities.update_norm): "delta" = ‖u − w‖₂ over its
    tensors (each against the global tensor of the same name); "lora_product" = (Σ_m ‖B_m A_m‖_F²)^½ of a fresh LoRA
    (FLoRA: the whole weight change; B carries the scale)."""
    if kind == "delta":
        return float(sum(((t.double() - state.tensors[k].double()) ** 2).sum() for k, t in u.tensors.items()) ** 0.5)
    if kind != "lora_product":
        raise ValueError(f"no update norm {kind!r}")
    total = torch.zeros((), dtype=torch.float64)
    for mod in sorted({k[:-2] for k in u.tensors}):
        a, b = u.tensors[f"{mod}.A"].double(), u.tensors[f"{mod}.B"].double()
        total += ((b.T @ b) * (a @ a.T)).sum().clamp(min=0)  # ‖BA‖_F² = tr(BᵀB·AAᵀ), r×r only
    return float(total.sqrt())


def example_weights(updates: Sequence[ClientUpdate], *, uniform: bool = False) -> list[float]:
    """p_k = n_k / Σ n_j (or 1/K when uniform). Raises on empty input or zero examples."""
    if not updates:
        raise ValueError("aggregate called with no client updates")
    if uniform:
        return [1.0 / len(updates)] * len(updates)
    total = sum(u.num_examples for u in updates)
    if total <= 0:
        raise ValueError("client updates report 0 training examples in total; cannot weight them")
    return [u.num_examples / total for u in updates]


def payload_nbytes(tensors: TensorDict) -> int:
    """Raw tensor bytes: Σ numel · itemsize (no headers)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_k t_k accumulated in float64, returned in the inputs' dtype."""
    out = torch.zeros_like(tensors[0], dtype=torch.float64)
    for t, w in zip(tensors, weights, strict=True):
        out.add_(t.to(torch.float64), alpha=w)
    return out.to(tensors[0].dtype)
