"""Run configuration: dataclasses loaded from TOML, CLI overrides, validation with clear messages.

A run config has sections [run] [model] [data] [federation] [train] [lora] and one section per method (named as
the method registers itself: fedtune.algorithms.registry). [lora] keys apply to every LoRA-based method's config;
the method's own section overrides them. Validation asks the method what it can do (its Capabilities, its holding
check), never its name. Unknown keys are errors (typos must not pass silently).
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.algorithms.registry import available, config_class, default_method, get_algorithm
from fedtune.configbase import ConfigError, build_section, dataclass_from_dict, option
from fedtune.models.settings import SETTING, SETTINGS

__all__ = ["ConfigError", "RunConfig", "dataclass_from_dict", "load", "load_tokens", "validate"]


@dataclass
class RunSection:
    """[run]: what the run is called, where it writes, how long it runs."""

    name: str = option("demo", "the run's name; its outputs go to runs/<name> unless out is set")
    seed: int = option(0, "the run seed: client sampling, data split, adapter init, the tiny model's weights")
    rounds: int = option(3, "federated rounds to run (more on --resume continues)")
    algorithm: str = field(default_factory=default_method,
                           metadata={"help": "the method: one of fedtune.algorithms.available() (docs/methods/)"})
    out: str = option("", "output directory; empty: runs/<name>")
    eval_batch_size: int = option(16, "batch size of the evaluations between rounds")
    generate_every: int = option(0, "every N rounds (and round 0 and the last), also log test_rouge_l and "
                                    "test_exact_match: greedy generations on the global test set; 0: never")
    generate_max_examples: int = option(16, "global test examples generated for generate_every (0: all)")
    threads: int = option(0, "torch intra-op threads; 0: torch's default (1 is often faster for small models or "
                             "on a busy machine)")


@dataclass
class ModelSection:
    """[model]: the base model, and how this process holds it (each client its own; nothing of it travels)."""

    name: str = option("smollm2", '"tiny" (random test model), "tiny-<hidden>x<layers>", "smollm2", a Hugging Face '
                                  "model directory or a .gguf file")
    device: str = SETTING["model.device"].field()
    dtype: str = SETTING["model.dtype"].field()
    quantization: str = SETTING["model.quantization"].field()


@dataclass
class DataSection:
    """[data]: where examples come from and how they are split (docs/data.md)."""

    source: str = option("chatterbot", '"chatterbot" (the bundled corpus) or "jsonl" (your own files: JSONL, JSON, '
                                       "CSV, Parquet, save_to_disk directories)")
    language: str = option("english", "chatterbot: the corpus language")
    categories: list[str] = option([], "keep only these categories; empty: all")
    paths: list[str] = option([], "your files: one file (or directory) per client, or one or more to partition")
    partition: str = option("by_category", "how one data set is split: iid | dirichlet | by_category | pathological")
    dirichlet_alpha: float = option(0.5, "dirichlet: concentration (smaller: more skewed clients)")
    categories_per_client: int = option(2, "pathological: categories each client draws")
    eval_fraction: float = option(0.1, "share of each client's examples held out for evaluation")
    max_eval_per_client: int = option(16, "cap on each client's held-out slice")
    test_fraction: float = option(0.1, "global test set: share of the whole corpus drawn once by run.seed before "
                                       "partitioning (the same for any partitioner or client count) and removed "
                                       "from the clients' data")
    max_test_examples: int = option(128, "cap on the global test set; 0: no cap")
    max_train_per_client: int = option(0, "cap on each client's training examples; 0: all")
    max_seq_len: int = option(0, "tokens per example; 0: auto (128 for chatterbot; for your own data the smallest "
                                 "length keeping ≥ 99 % of responses whole)")
    max_drop_fraction: float = option(0.01, "stop if more than this share of a client's examples cannot be kept")


@dataclass
class FederationSection:
    """[federation]: who takes part in a round and how long a round may take."""

    num_clients: int = option(4, "clients in the run")
    fraction: float = option(1.0, "share of clients sampled per round")
    min_clients: int = option(1, "fewer valid updates: the round is aborted (nothing written) and retried")
    round_timeout_s: float = option(600.0, "a round stops waiting for updates after this long")
    max_round_retries: int = option(3, "aborted attempts of a round before the run stops")
    max_norm_ratio: float = option(10.0, "refuse an update whose norm is more than this many times the median of the "
                                         "round's (with 3 or more updates); 0: off. Bounds one client's pull on the "
                                         "model without [robust]")
    max_client_weight: float = option(0.5, "no client's aggregation weight (its share of the round's examples, which "
                                           "clients report themselves) above this; 0 or 1: no cap. 0.5: no single "
                                           "organisation outweighs all the others together")
    batch_clients: bool = option(False, "simulation: train a round's clients in one batched loop per worker thread "
                                        "(methods that declare it). Faster for small models, (clients ÷ workers)× "
                                        "the activation memory, equal to one by one up to float rounding")
    workers: int = option(0, "simulation: worker threads that train a round's clients in parallel, each on its own "
                             "adapter copy of the shared base; 0: one per usable CPU; 1: one by one "
                             "(threads are bit-identical to one by one)")
    devices: list[str] = option([], "simulation: spread a round's clients over these devices, one base "
                                          "replica and one worker thread per device, e.g. [\"cuda:0\", \"cuda:1\"] "
                                          "or the string \"all\" (every CUDA GPU); []: the one [model] device (native simulation only). Results equal "
                                          "one device's (bit for bit on CPUs)")


@dataclass
class TrainSection:
    """[train]: each client's local training."""

    local_steps: int = option(8, "optimiser steps per client per round")
    batch_size: int = option(8, "examples per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    lr: float | None = option(None, "local learning rate; unset: the method's tuned default. [<method>] lr wins "
                                    "over [train] lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "global gradient-norm clip per step; 0: none (DP clips per example instead)")
    gradient_checkpointing: bool = SETTING["train.gradient_checkpointing"].field()


@dataclass
class ServerSection:
    """[server] of `fedtune server` (docs/deploy.md)."""

    address: str = option("0.0.0.0:50051", "listen address")
    tokens_file: str = option("", "TOML of client_id = \"token\" lines (fedtune certs writes one); required")
    revoked_file: str = option("", "TOML `revoked = [ids]` (fedtune init --revoke): these organisations' tokens are "
                                   "refused; relative paths: against the config file's directory")
    admin_token_file: str = option("", "TOML `[admin] token = \"…\"` (fedtune init writes one): the credential of "
                                       "`fedtune status`; empty: no status calls")
    metrics_port: int = option(0, "serve Prometheus metrics (fedtune status numbers) on this port; 0: off")
    clients: list[str] = option([], "the roster in order (client i holds partition i); empty: the tokens' ids, "
                                    "sorted")
    tls_cert: str = option("", "server certificate; empty: plaintext, refused unless insecure = true")
    tls_key: str = option("", "server private key")
    tls_client_ca: str = option("", "mTLS: the CA of client certificates; a token is then only valid with a "
                                    "certificate naming its client (CN/SAN)")
    insecure: bool = option(False, "allow plaintext (tokens in clear text): tests on a trusted network only")
    heartbeat_interval_s: float = option(5.0, "how often clients heartbeat (told at Join)")
    lease_timeout_s: float = option(60.0, "a client silent this long is dropped from the round")
    straggler_timeout_s: float = option(0.0, "once min_clients valid updates are in, wait at most this long for the "
                                             "rest; 0: until round_timeout_s or their leases expire")
    poll_interval_s: float = option(1.0, "how soon an idle client asks for a task again")
    max_upload_mb: float = option(512.0, "largest update a client may send")
    max_examples_per_client: int = option(1_000_000, "cap on an update's num_examples (its aggregation weight); "
                                                     "0: none")
    stream_idle_timeout_s: float = option(60.0, "a chunked stream (one per client and kind at a time) is cancelled "
                                                "after this long without a chunk")
    stream_timeout_s: float = option(900.0, "... or after this long in total")
    max_inflight_mb: float = option(1024.0, "uploads in flight may buffer at most this much together (declared "
                                            "sizes, reserved at chunk 0)")
    evaluate: bool = option(True, "evaluate the global model between rounds (needs the [data] eval/test sets here)")
    finish_grace_s: float = option(10.0, "keep serving after the last round so clients hear the run finished")


@dataclass
class ClientSection:
    """[client] of `fedtune client` (docs/deploy.md)."""

    server: str = option("localhost:50051", "the coordinator's HOST:PORT")
    client_id: str = option("", "this client's id (its token's)")
    partition: int = option(-1, "which [data] partition this client holds (demo data); -1 with [data] paths: all "
                                "of its own files")
    token: str = option("", "the token; prefer the FEDTUNE_TOKEN environment variable or token_file")
    token_file: str = option("", "TOML of client_id = \"token\" lines: the token of client_id is used")
    tls_ca: str = option("", "the CA of the coordinator's certificate; empty: plaintext, refused unless "
                             "insecure = true")
    insecure: bool = option(False, "allow sending the token without TLS: tests on a trusted network only")
    tls_cert: str = option("", "mTLS: this client's certificate")
    tls_key: str = option("", "mTLS: this client's private key")
    state_dir: str = option("", "client-side state (DP accountants); empty: runs/client-<id>")
    rpc_timeout_s: float = option(60.0, "deadline of each RPC")
    max_backoff_s: float = option(30.0, "longest wait between retries")
    max_retry_s: float = option(600.0, "give up (exit 4) after this long without one successful exchange")
    max_download_mb: float = option(2048.0, "largest task this client downloads")
    min_noise_multiplier: float = option(0.0, "distributed DP: refuse a task without distributed DP, or whose noise "
                                              "with the fewest survivors this client accepts is below this σ; "
                                              "0: no floor")


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

    def secagg_config(self):
        """[secagg] as a validated SecAggConfig (off when the section is absent)."""
        from fedtune.secagg.config import SecAggConfig

        try:
            return SecAggConfig.from_dict(self.extra.get("secagg", {}))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"[secagg]: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {"run": RunSection, "model": ModelSection, "data": DataSection,
             "federation": FederationSection, "train": TrainSection}
_OTHER = {"privacy", "server", "client", "flower", "robust", "secagg"}  # sections read by other subsystems


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


def load(path: str | Path | None, overrides: dict[str, Any] | None = None, *,
         other_methods: bool = False) -> RunConfig:
    """Load TOML (or defaults when path is None), apply "section.key" overrides, validate. A [<method>] section
    for a method the run does not use is an error unless `other_methods` (a sweep file shared by several
    methods). Relative file paths of [server]/[client] (PATH_KEYS) resolve against the config file's
    directory, so a kit directory works wherever it is copied; command-line overrides stay as given."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
        _resolve_paths(raw, p.resolve().parent)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})[key] = value
    cfg = from_dict(raw)
    validate(cfg, other_methods=other_methods)
    return cfg


PATH_KEYS = {"server": ("tokens_file", "tls_cert", "tls_key", "tls_client_ca", "revoked_file", "admin_token_file"),
             "client": ("token_file", "tls_ca", "tls_cert", "tls_key", "state_dir")}


def _resolve_paths(raw: dict[str, Any], base: Path) -> None:
    """Make the relative file paths of PATH_KEYS absolute against `base` (the config file's directory)."""
    for section, keys in PATH_KEYS.items():
        sec = raw.get(section)
        if not isinstance(sec, dict):
            continue
        for k in keys:
            v = sec.get(k)
            if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
                sec[k] = str(base / v)


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


def clients_per_round(num_clients: int, fraction: float, min_clients: int) -> int:
    """How many clients a round samples: round(fraction·N), at least min_clients, at most N."""
    return min(num_clients, max(min_clients, round(fraction * num_clients)))


def check_secagg(cfg: RunConfig, algo, robust) -> None:
    """ConfigError when [secagg] is on with something it cannot work with, saying why and what to use."""
    sa = cfg.secagg_config()
    if not sa.enabled:
        _require(cfg.privacy_config().mode != "distributed",
                 "[privacy] mode = \"distributed\" needs secure aggregation: the clients add the noise inside the "
                 "masked sum. Set [secagg] enabled = true (or --secagg), or use mode = \"client\"")
        return
    caps = algo.capabilities
    if not caps.secure_sum:
        from fedtune.algorithms.registry import with_capability

        able = ", ".join(with_capability(lambda c: c.secure_sum))
        raise ConfigError(f"[secagg] cannot aggregate {cfg.run.algorithm} securely: {caps.no_secure_sum or 'it declares no secure sum'} "
                          f"(methods that can: {able})")
    if robust.enabled:
        raise ConfigError("[secagg] and [robust] cannot be used together: robust aggregation bounds, clips or trims "
                          "each client's update, and under secure aggregation the coordinator never sees one. "
                          "Turn one off (secagg protects the updates' privacy, robust the model's integrity)")
    f = cfg.federation
    per_round = clients_per_round(f.num_clients, f.fraction, f.min_clients)
    _require(per_round >= sa.min_survivors,
             f"[secagg] needs at least min_survivors = {sa.min_survivors} clients per round (a sum of fewer reveals "
             f"individual updates); this run samples {per_round} of {f.num_clients} (raise federation.num_clients or "
             "fraction)")


def validate(cfg: RunConfig, *, other_methods: bool = False) -> None:
    r, d, f, t = cfg.run, cfg.data, cfg.federation, cfg.train
    _require(r.rounds >= 1, f"run.rounds must be ≥ 1, got {r.rounds}")
    _require(r.generate_every >= 0 and r.generate_max_examples >= 0,
             f"run.generate_every and run.generate_max_examples must be ≥ 0 (0: off / all), got "
             f"{r.generate_every} and {r.generate_max_examples}")
    _require(f.num_clients >= 1, f"federation.num_clients must be ≥ 1, got {f.num_clients}")
    _require(0 < f.fraction <= 1, f"federation.fraction must be in (0, 1], got {f.fraction}")
    _require(1 <= f.min_clients <= f.num_clients,
             f"federation.min_clients must be in [1, num_clients={f.num_clients}], got {f.min_clients}")
    _require(0 <= f.workers <= 256, f"federation.workers must be in [0, 256] (0 = one per CPU), got {f.workers}")
    _require(f.devices == "all" or (isinstance(f.devices, list) and all(
        isinstance(d, str) and (d == "cpu" or re.fullmatch(r"cuda(:\d+)?", d)) for d in f.devices)),
        f'federation.devices must be "all" or a list of "cpu" / "cuda:N", got {f.devices!r}')
    _require(f.max_norm_ratio == 0 or f.max_norm_ratio >= 1,
             f"federation.max_norm_ratio must be 0 (off) or ≥ 1, got {f.max_norm_ratio}")
    _require(0 <= f.max_client_weight <= 1,
             f"federation.max_client_weight must be in [0, 1] (0 or 1: no cap), got {f.max_client_weight}")
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
    _require(not d.paths or d.source == "jsonl",
             f"data.paths lists {len(d.paths)} file(s), but data.source is {d.source!r}: the bundled corpus would be "
             "used and your files ignored; add source = \"jsonl\" to [data] (or drop paths)")
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
    if (unused := sorted(set(cfg.algorithms) - {r.algorithm})) and not other_methods:
        raise ConfigError(f"config section(s) {', '.join(f'[{n}]' for n in unused)} would be ignored: this run's "
                          f"method is {r.algorithm}; remove them (or run --algorithm {unused[0]})")
    if problem := get_algorithm(cfg.run.algorithm, ac).holding_problem(cfg.model.quantization, cfg.model.dtype):
        raise ConfigError(problem)
    cfg.privacy_config()
    rc = cfg.robust_config()
    check_secagg(cfg, get_algorithm(cfg.run.algorithm, ac), rc)
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
