"""Run configuration: dataclasses loaded from TOML, CLI overrides, validation with clear messages.

A run config has sections [run] [model] [data] [federation] [train] [lora] and one section per method (named as
the method registers itself: fedtune.algorithms.registry). [lora] keys apply to every LoRA-based method's config;
the method's own section overrides them. Validation asks the method what it can do (its Capabilities, its holding
check), never its name. Unknown keys are errors (typos must not pass silently).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.algorithms.registry import available, config_class, default_method, get_algorithm
from fedtune.configbase import ConfigError, build_section, dataclass_from_dict
from fedtune.models.settings import SETTING, SETTINGS

__all__ = ["ConfigError", "RunConfig", "dataclass_from_dict", "load", "load_tokens", "validate"]


@dataclass
class RunSection:
    name: str = "demo"
    seed: int = 0
    rounds: int = 3
    algorithm: str = field(default_factory=default_method)  # a registered method (fedtune.algorithms.registry)
    out: str = ""  # default runs/<name>
    eval_batch_size: int = 16
    threads: int = 0  # torch intra-op threads; 0 = torch's default. 1 is often faster for small models or on a busy machine


@dataclass
class ModelSection:
    name: str = "smollm2"  # "tiny" | "smollm2" | HF model dir | .gguf file
    # How this process holds the base (each client its own; nothing of it travels). See fedtune/models/hardware.py
    device: str = SETTING["model.device"].field()
    dtype: str = SETTING["model.dtype"].field()
    quantization: str = SETTING["model.quantization"].field()


@dataclass
class DataSection:
    source: str = "chatterbot"  # "chatterbot" | "jsonl" (your own files: JSONL/JSON/CSV/Parquet/save_to_disk dirs)
    language: str = "english"
    categories: list[str] = field(default_factory=list)  # keep only these categories; empty = all
    paths: list[str] = field(default_factory=list)  # one file (or dir) per client, or one or more to partition
    partition: str = "by_category"  # iid | dirichlet | by_category | pathological (see README "Your own data")
    dirichlet_alpha: float = 0.5
    categories_per_client: int = 2  # pathological: categories each client draws
    eval_fraction: float = 0.1
    max_eval_per_client: int = 16
    # global test set: drawn once by run.seed from the whole corpus before partitioning (same for any partitioner
    # or client count) and removed from the clients' data; max_test_examples caps it (0 = no cap)
    test_fraction: float = 0.1
    max_test_examples: int = 128
    max_train_per_client: int = 0  # 0 = all
    # 0 = auto: 128 for chatterbot; for your own data the smallest length keeping ≥ 99 % of responses whole
    max_seq_len: int = 0
    max_drop_fraction: float = 0.01  # stop if more than this share of a client's examples cannot be kept


@dataclass
class FederationSection:
    num_clients: int = 4
    fraction: float = 1.0  # share of clients sampled per round
    min_clients: int = 1  # fewer reporting updates → the round is aborted and retried
    round_timeout_s: float = 600.0
    max_round_retries: int = 3
    # simulation: train a round's clients in one batched loop per worker thread (FedAvg, FLoRA). Faster for small
    # models, but (clients ÷ workers)× the decoder's activation memory and equal to one by one only up to float
    # rounding (SmolLM2 demo before worker threads and the chunked loss: 12 GB peak, 2.2× the wall time), so opt-in.
    batch_clients: bool = False
    # simulation: worker threads that train a round's clients in parallel, each on its own adapter copy of the
    # one shared base ([run] threads split between them, ≥ 1 each). 0 = auto: one per usable CPU; 1 = one by
    # one. Bit-identical to one by one at the same torch threads per client.
    workers: int = 0


@dataclass
class TrainSection:
    local_steps: int = 8
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: the method's tuned default. [<method>] lr > [train] lr > the method's default
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = SETTING["train.gradient_checkpointing"].field()


@dataclass
class ServerSection:
    """[server] of `fedtune server`."""

    address: str = "0.0.0.0:50051"
    tokens_file: str = ""  # TOML {client_id = "token"}; required
    clients: list[str] = field(default_factory=list)  # roster order (partition i ↔ clients[i]); default: sorted tokens
    tls_cert: str = ""  # empty: plaintext, refused unless insecure = true
    tls_key: str = ""
    tls_client_ca: str = ""  # set for mTLS: a token is then only valid with a certificate naming its client (CN/SAN)
    insecure: bool = False  # allow plaintext (tokens in clear text; only for tests on a trusted network)
    heartbeat_interval_s: float = 5.0
    lease_timeout_s: float = 60.0  # a client silent this long is dropped from the round
    # once min_clients valid updates are in, wait at most this long for the rest (0: until round_timeout_s or
    # their leases expire); bounds what a client that heartbeats but never uploads can hold a round for
    straggler_timeout_s: float = 0.0
    poll_interval_s: float = 1.0  # how soon an idle client asks again
    max_upload_mb: float = 512.0
    max_examples_per_client: int = 1_000_000  # cap on an update's num_examples (its aggregation weight); 0 = none
    # no client can hold the server: per chunked stream (PushUpdate upload, PullTask download) at most one per
    # client at a time, cancelled after this long without a chunk, or this long in total; uploads in flight may
    # buffer at most max_inflight_mb together (declared sizes, reserved at chunk 0)
    stream_idle_timeout_s: float = 60.0
    stream_timeout_s: float = 900.0
    max_inflight_mb: float = 1024.0
    evaluate: bool = True  # evaluate the global model on the [data] eval split (needs the data here)
    finish_grace_s: float = 10.0  # keep serving after the last round so clients hear "finished"


@dataclass
class ClientSection:
    """[client] of `fedtune client`."""

    server: str = "localhost:50051"
    client_id: str = ""
    partition: int = -1  # which [data] partition this client holds (demo data); -1 with [data] paths = own files
    token: str = ""  # prefer the FEDTUNE_TOKEN environment variable or token_file
    token_file: str = ""  # TOML {client_id = "token"}: the token of client_id is used
    tls_ca: str = ""  # empty: plaintext, refused unless insecure = true
    insecure: bool = False  # allow sending the token without TLS (only for tests on a trusted network)
    tls_cert: str = ""  # mTLS identity
    tls_key: str = ""
    state_dir: str = ""  # client-side state (DP accountants); default runs/client-<id>
    rpc_timeout_s: float = 60.0
    max_backoff_s: float = 30.0
    max_retry_s: float = 600.0  # give up (exit 4) after this long without one successful exchange
    max_download_mb: float = 2048.0


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    federation: FederationSection = field(default_factory=FederationSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: dict[str, Any] = field(default_factory=dict)
    algorithms: dict[str, dict[str, Any]] = field(default_factory=dict)  # raw [<algorithm>] sections
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)  # other known sections (privacy, server, ...)

    @property
    def out_dir(self) -> Path:
        return Path(self.run.out or f"runs/{self.run.name}")

    def algorithm_config(self):
        """The algorithm's config dataclass from [lora] + [<algorithm>], validated."""
        try:
            cls = config_class(self.run.algorithm)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        names = {f.name for f in dataclasses.fields(cls)}
        own = self.algorithms.get(self.run.algorithm, {})
        unknown = sorted(set(own) - names)
        if unknown:
            raise ConfigError(f"[{self.run.algorithm}] has unknown keys {unknown}; valid: {sorted(names)}")
        kwargs = {k: v for k, v in self.lora.items() if k in names} | own
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"[{self.run.algorithm}]/[lora]: {e}") from None

    def learning_rate(self) -> float:
        """The local learning rate: [<method>] lr when set, else [train] lr when set, else the method's tuned
        default (its config's DEFAULT_LR, chosen by the lr sweep of simulations/report.py). FedKSeed always uses its own η."""
        ac = self.algorithm_config()
        if getattr(ac, "lr", None) is not None:
            return float(ac.lr)
        if self.train.lr is not None:
            return float(self.train.lr)
        return float(getattr(ac, "DEFAULT_LR", 1e-3))

    def section(self, name: str, cls):
        """An optional section ([server], [client], ...) as its dataclass."""
        return build_section(cls, self.extra.get(name, {}), name)

    def privacy_config(self):
        """[privacy] as a validated PrivacyConfig (mode "none" when the section is absent)."""
        from fedtune.privacy.config import PrivacyConfig

        try:
            return PrivacyConfig.from_dict(self.extra.get("privacy", {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"[privacy]: {e}") from None

    def robust_config(self):
        """[robust] as a validated RobustConfig (off when the section is absent)."""
        from fedtune.algorithms.wrappers.robust import RobustConfig

        try:
            return RobustConfig.from_dict(self.extra.get("robust", {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"[robust]: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"run": RunSection, "model": ModelSection, "data": DataSection,
             "federation": FederationSection, "train": TrainSection}
_OTHER = {"privacy", "server", "client", "flower", "robust"}  # sections read by other subsystems


def load_tokens(path: str, key: str) -> dict[str, str]:
    """{client_id: token} from a tokens TOML (as written by `fedtune certs`); `key` names the setting."""
    if not path:
        raise ConfigError(f"{key} is required (make one with: fedtune certs --out certs --clients a,b)")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key} not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e})") from None
    tokens = raw.get("tokens", raw)
    if not tokens or not all(isinstance(v, str) and v for v in tokens.values()):
        raise ConfigError(f"{p}: expected client_id = \"token\" lines (non-empty strings)")
    return dict(tokens)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    for key, value in raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"top-level key {key!r} must be a [section]")
        if key in _SECTIONS:
            setattr(cfg, key, build_section(_SECTIONS[key], value, key))
        elif key == "lora":
            cfg.lora = dict(value)
        elif key in available():
            cfg.algorithms[key] = dict(value)
        elif key in _OTHER:
            cfg.extra[key] = dict(value)
        else:
            raise ConfigError(
                f"unknown section [{key}]; valid: {sorted([*_SECTIONS, 'lora', *_OTHER, *available()])}"
            )
    return cfg


def load(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load TOML (or defaults when path is None), apply "section.key" overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = value
    cfg = from_dict(raw)
    validate(cfg)
    return cfg


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check_hardware(m: ModelSection) -> None:
    """ConfigError unless [model] device / dtype / quantization are spelled as documented."""
    from fedtune.models.hardware import HardwareError, check_choice

    try:
        check_choice(m.device, m.dtype, m.quantization)
    except HardwareError as e:
        raise ConfigError(str(e)) from None


def validate(cfg: RunConfig) -> None:
    r, d, f, t = cfg.run, cfg.data, cfg.federation, cfg.train
    _require(r.rounds >= 1, f"run.rounds must be ≥ 1, got {r.rounds}")
    _require(f.num_clients >= 1, f"federation.num_clients must be ≥ 1, got {f.num_clients}")
    _require(0 < f.fraction <= 1, f"federation.fraction must be in (0, 1], got {f.fraction}")
    _require(1 <= f.min_clients <= f.num_clients,
             f"federation.min_clients must be in [1, num_clients={f.num_clients}], got {f.min_clients}")
    _require(0 <= f.workers <= 256, f"federation.workers must be in [0, 256] (0 = one per CPU), got {f.workers}")
    from fedtune.algorithms.api import MAX_BATCH_SIZE, MAX_GRAD_ACCUM, MAX_LOCAL_STEPS  # what clients accept

    _require(1 <= t.local_steps <= MAX_LOCAL_STEPS, f"train.local_steps must be in [1, {MAX_LOCAL_STEPS}], got {t.local_steps}")
    _require(1 <= t.batch_size <= MAX_BATCH_SIZE, f"train.batch_size must be in [1, {MAX_BATCH_SIZE}], got {t.batch_size}")
    _require(1 <= t.grad_accum <= MAX_GRAD_ACCUM, f"train.grad_accum must be in [1, {MAX_GRAD_ACCUM}], got {t.grad_accum}")
    _require(t.lr is None or t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(d.source in ("chatterbot", "jsonl"), f"data.source must be \"chatterbot\" or \"jsonl\", got {d.source!r}")
    _require(d.partition in ("iid", "dirichlet", "by_category", "pathological"),
             f"data.partition must be iid, dirichlet, by_category or pathological, got {d.partition!r}")
    _require(0 <= d.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    _require(0 <= d.test_fraction < 1, f"data.test_fraction must be in [0, 1), got {d.test_fraction}")
    _require(d.max_test_examples >= 0, f"data.max_test_examples must be ≥ 0 (0 = no cap), got {d.max_test_examples}")
    _require(d.max_seq_len == 0 or d.max_seq_len >= 8, f"data.max_seq_len must be 0 (auto) or ≥ 8, got {d.max_seq_len}")
    _require(0 <= d.max_drop_fraction <= 1, f"data.max_drop_fraction must be in [0, 1], got {d.max_drop_fraction}")
    if d.source == "jsonl":
        _require(bool(d.paths), "data.source = \"jsonl\" needs data.paths (one file per client, or one file to partition)")
        # an edge client with partition = -1 trains on all of its own files, whatever the federation's size
        own_files = "client" in cfg.extra and cfg.section("client", ClientSection).partition < 0
        _require(own_files or len(d.paths) in (1, f.num_clients),
                 f"data.paths has {len(d.paths)} files for {f.num_clients} clients; give one per client or one to partition")
    check_hardware(cfg.model)
    for s in SETTINGS:  # a true/false setting must be one
        v = getattr(getattr(cfg, s.section), s.name)
        _require(not isinstance(s.default, bool) or isinstance(v, bool), f"{s.key} must be true or false, got {v!r}")
    ac = cfg.algorithm_config()  # validates the algorithm name and its settings
    if problem := get_algorithm(cfg.run.algorithm, ac).holding_problem(cfg.model.quantization, cfg.model.dtype):
        raise ConfigError(problem)
    cfg.privacy_config()
    cfg.robust_config()
    sv = cfg.section("server", ServerSection)
    _require(isinstance(sv.max_examples_per_client, int) and sv.max_examples_per_client >= 0,
             f"server.max_examples_per_client must be an integer ≥ 0 (0 = no cap), got {sv.max_examples_per_client!r}")
    for key in ("heartbeat_interval_s", "lease_timeout_s", "poll_interval_s", "max_upload_mb", "stream_idle_timeout_s",
                "stream_timeout_s", "max_inflight_mb"):
        _require(getattr(sv, key) > 0, f"server.{key} must be > 0, got {getattr(sv, key)}")
    _require(sv.straggler_timeout_s >= 0 and math.isfinite(sv.straggler_timeout_s),
             f"server.straggler_timeout_s must be ≥ 0 (0 = off), got {sv.straggler_timeout_s}")
    _require(sv.max_inflight_mb >= sv.max_upload_mb,
             f"server.max_inflight_mb ({sv.max_inflight_mb:g}) must be ≥ server.max_upload_mb ({sv.max_upload_mb:g})")
    cl = cfg.section("client", ClientSection)
    _require(cl.max_retry_s > 0, f"client.max_retry_s must be > 0, got {cl.max_retry_s}")
