"""The round engine, written once. A transport (in-process simulation, gRPC coordinator, Flower) moves
instructions and updates; the algorithm aggregates; the engine samples, validates, retries, checkpoints
and logs.

One round:  sample clients (seeded by run seed, round, attempt) → build instructions (setup once, sync to
the current global version, per-client train config) → transport.run_round(RoundPlan) → drop every update that
does not match what its client was assigned (algo.expected_update; the client counts as failed) → if fewer than
min_clients valid updates, or aggregate raises or yields non-finite tensors, abort the attempt (nothing
written) and retry → evaluate the global model (eval loss on the clients' held-out slices, test loss on the
global test set; each skipped when its set is empty) → atomic checkpoint → metrics row. Round 0 logs the
base (initial global) model's losses.

With secure aggregation ([secagg]) the transport runs the SecAgg+ protocol (fedtune.secagg) and hands back the
decoded sum instead of updates: the engine checks the clients' clear metadata and calls algo.apply_secure. An
attempt that aborts before its unmask retries with a fresh sample and fresh keys; after an unmask the round commits
or the run stops (a second sum over another set of the same clients' updates would expose the difference). The
journal secagg/r<round>.json records each attempt and the survivors before any unmask request goes out, and the
decoded sum before it is applied: a resumed coordinator starts at the next attempt, sums the same survivors only,
or finishes the round from the journaled sum.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.algorithms.api import (
    ClientUpdate,
    FedAlgorithm,
    GlobalState,
    Instruction,
    Payload,
    TensorSpec,
    UpdateRejected,
    UpdateSpec,
    update_norm,
    validate_update,
)
from fedtune.config import clients_per_round
from fedtune.run import checkpoint
from fedtune.run.metrics import MetricsWriter
from fedtune.run.secjournal import SecAggJournal
from fedtune.secagg.config import SecAggConfig
from fedtune.secagg.encode import EncodingError, capped_counts, scales
from fedtune.secagg.protocol import MASKED, RoundParams, SecureSum
from fedtune.transports.base import RoundPlan, RoundResult, Transport

log = logging.getLogger("fedtune")
HARDWARE_METRICS = ("mem_peak_mb", "cuda_mem_peak_mb")  # client-reported (validated: METRIC_RANGES)


class RoundAborted(RuntimeError):
    pass


class BudgetExhausted(RuntimeError):
    """Too few clients have privacy budget left for another round: the run ends cleanly."""


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, int | float) and not math.isnan(v)]


def _train_loss(updates: list[ClientUpdate]) -> float:
    """Example-weighted (lower) median of the clients' reported train losses: a claim of clients holding less than
    half the round's weight cannot move it past the others' values; clients that report none (or NaN) are left out.
    NaN when no client reports one."""
    rep = sorted((u.metrics["train_loss"], u.num_examples) for u in updates
                 if math.isfinite(u.metrics.get("train_loss", math.nan)))
    half, seen = sum(w for _, w in rep) / 2, 0
    for v, w in rep:
        seen += w
        if seen >= half:
            return v
    return math.nan


@dataclass
class EngineConfig:
    rounds: int
    seed: int
    fraction: float = 1.0
    min_clients: int = 1
    round_timeout_s: float = 600.0
    max_round_retries: int = 3
    train: dict[str, Any] = field(default_factory=dict)  # base local-training config
    max_examples_per_client: int = 0  # cap on an update's num_examples (0 = none)
    max_norm_ratio: float = 10.0  # refuse an update whose norm exceeds this × the round's median (≥ 3 updates; 0: off)
    max_client_weight: float = 0.5  # no client's aggregation weight above this (0 or ≥ 1: no cap)
    secagg: SecAggConfig | None = None  # secure aggregation (enabled), else None
    run_id: str = ""  # binds secure aggregation's keys to this run


@dataclass
class EngineHooks:
    """What the engine calls besides its transport and method; all optional."""

    evaluate: Callable[[GlobalState], float] | None = None  # eval loss: the union of the clients' held-out slices
    test: Callable[[GlobalState], float] | None = None  # test loss: the global test set (what methods compare on)
    budget_check: Callable[[GlobalState], str | None] | None = None  # a reason to stop before the next round
    extra_state: Callable[[], dict[str, Any]] | None = None  # more state for each checkpoint (client state, run id)
    # a NaN from evaluate/test means "not evaluated this round" (a baseline's sparse test), not a broken model
    nan_is_skipped: bool = False
    # [run] generate_every: Rouge-L / exact match on the global test set every N rounds (0: never)
    generate: Callable[[GlobalState], dict[str, Any]] | None = None
    generate_every: int = 0


class RoundEngine:
    """Runs the rounds of one run over `transport`; `resumed` is the engine state of the checkpoint the run resumes
    from (client versions, ε so far), None for a new run."""

    def __init__(
        self,
        *,
        algo: FedAlgorithm,
        transport: Transport,
        roster: Sequence[str],
        cfg: EngineConfig,
        out_dir: Path,
        hooks: EngineHooks | None = None,
        resumed: dict[str, Any] | None = None,
    ) -> None:
        self.algo, self.transport, self.cfg = algo, transport, cfg
        self.hooks = hooks or EngineHooks()
        self.roster = list(roster)
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.client_versions = {c: -1 for c in self.roster}  # -1: never set up
        # per client: how it holds the model (device/dtype/quantization, when its transport knows) and the peak
        # memory its updates reported; written to summary.json
        self.client_hardware: dict[str, dict[str, Any]] = {}
        self.stop_reason: str | None = None
        self.epsilon_max: float | None = None  # sample-level DP: max ε over clients so far
        self.client_epsilon: dict[str, float] = {}  # sample-level DP: the ε each client last reported (never falls)
        self._capped: set[str] = set()  # clients whose weight was capped (warned once)
        if resumed:
            self.client_versions.update(resumed.get("client_versions", {}))
            self.epsilon_max = resumed.get("epsilon_max")
            self.client_epsilon.update(resumed.get("client_epsilon", {}))
        self.journal = SecAggJournal(self.out_dir)
        self._secure: tuple[RoundParams, frozenset[str] | None] | None = None  # this attempt's, with secagg

    # -- sampling and instructions ------------------------------------------------------------
    def sample(self, rnd: int, attempt: int) -> list[str]:
        n = len(self.roster)
        m = clients_per_round(n, self.cfg.fraction, self.cfg.min_clients)
        rng = np.random.default_rng([self.cfg.seed, rnd, attempt])
        return sorted(self.roster[i] for i in rng.choice(n, size=m, replace=False))

    def client_seed(self, rnd: int, cid: str) -> int:
        return int(np.random.default_rng([self.cfg.seed, rnd, self.roster.index(cid), 7]).integers(2**31 - 1))

    def plan(self, rnd: int, state: GlobalState, sampled: list[str], attempt: int = 0,
             require: frozenset[str] | None = None) -> RoundPlan:
        """This attempt's instructions, and the hooks a transport checks what comes back with."""
        configs = self.algo.configure_round(rnd, state, sampled, self.cfg.train, self.roster)
        self._current = (rnd, state, configs)
        self._secure = None
        if (sa := self.cfg.secagg) is not None:
            self._secure = (self.secure_params(rnd, attempt, state, configs), require)
        versions = {cid: self.client_versions.get(cid, -1) for cid in sampled}
        return RoundPlan(
            round=rnd, version=state.version, min_clients=self.cfg.min_clients, roster=tuple(self.roster),
            instructions={cid: self.instruction_for(cid, v) for cid, v in versions.items()}, versions=versions,
            instruction_for=self.instruction_for, check_update=self.check_update,
            expected_update=self.expected_update, sync_payload=self.sync_payload,
            secagg=self._secure[0] if self._secure else None, secagg_require=require,
            on_unmask=(lambda survivors: self.journal.unmasking(rnd, attempt, survivors)) if sa else None,
        )

    def secure_params(self, rnd: int, attempt: int, state: GlobalState, configs: dict[str, dict]) -> RoundParams:
        """Secure aggregation's parameters for this attempt: the method's layout (the same for every client), the
        ring (auto: 64 bits up to 2^20 numbers, else 32 when it can hold the sum), the weights."""
        sa = self.cfg.secagg
        layouts = {self.algo.secure_layout(state, c, sa.clip) for c in configs.values()}
        if len(layouts) != 1:
            raise ValueError("secure aggregation needs one layout for every client of a round; the method gives "
                             f"{len(layouts)} (per-client ranks or steps)")
        layout = layouts.pop()
        max_w = 1 if self.algo.uniform_weights else (self.cfg.max_examples_per_client or 2**24)
        bits, noise = sa.bits, None
        if planned := self.algo.secure_noise(state):  # distributed DP: the run's ring and noise
            bits, noise = planned
        if not bits:
            bits = 64
            if sum(p.size for p in layout) > 2**20:
                try:  # the largest sum the 32-bit ring must hold: every sampled client at its largest weight
                    scales(layout, 32, max_w * len(configs), len(configs))
                    bits = 32
                except EncodingError:
                    pass
        return RoundParams(run=self.cfg.run_id or "run", round=rnd, attempt=attempt, bits=bits,
                           threshold=sa.threshold, degree=sa.degree,
                           weights="uniform" if self.algo.uniform_weights else "examples", max_weight=max_w,
                           layout=layout, min_survivors=max(sa.min_survivors, self.cfg.min_clients),
                           l2_clip=self.algo.secure_l2_clip(),
                           max_share=0.0 if self.algo.uniform_weights else self.cfg.max_client_weight,
                           noise=noise)

    def instruction_for(self, cid: str, version: int) -> Instruction:
        """This round's instruction for `cid`, for a client that holds global `version` (-1: not set up).
        Transports whose clients report their own version (gRPC, Flower) rebuild with it."""
        rnd, state, configs = self._current
        if version > state.version:
            raise ValueError(f"{cid} reports global version {version}, newer than the server's {state.version}")
        extra = {"secagg": self._secure[0].to_dict()} if self._secure else {}
        return Instruction(
            round=rnd, client_id=cid, base_version=state.version,
            train=dict(configs[cid], seed=self.client_seed(rnd, cid), **extra),
            sync=self.algo.sync_payload(state, version),
            setup=self.algo.setup_payload(state) if version < 0 else None,
        )

    def sync_payload(self, version: int) -> Payload:
        """What brings a copy of the global model at `version` to this round's state (a shared model)."""
        _, state, _ = self._current
        return self.algo.sync_payload(state, version)

    # -- validation -------------------------------------------------------------------------------
    def check_update(self, cid: str, update: ClientUpdate, *, max_examples: int | None = None) -> None:
        """Raise UpdateRejected unless `update` is what `cid` was assigned this round (names, shapes,
        dtypes, finite values, 1 ≤ num_examples ≤ the smaller of `max_examples` and the configured cap)."""
        if update.client_id != cid:
            raise UpdateRejected(f"update names client {update.client_id!r}, sent by {cid!r}")
        caps = [c for c in (max_examples, self.cfg.max_examples_per_client) if c]
        validate_update(self.expected_update(cid), update, max_examples=min(caps) if caps else None,
                        metric_ranges=self.algo.metrics_accepted())
        self.check_privacy_claim(cid, update)

    @property
    def sample_dp(self) -> bool:
        """The clients train under sample-level DP (their train config carries [privacy]): only then is a client's
        ε a figure of the run."""
        return isinstance(self.cfg.train.get("privacy"), dict)

    def check_privacy_claim(self, cid: str, update: ClientUpdate) -> None:
        """A client's ε under sample-level DP is its accountant's: it never decreases, and never exceeds the run's
        target_epsilon (a client stops before a round that would). UpdateRejected otherwise."""
        eps = update.metrics.get("epsilon")
        if not self.sample_dp or eps is None:
            return
        prev = self.client_epsilon.get(cid, 0.0)
        if eps < prev * (1 - 1e-9):
            raise UpdateRejected(f"update from {cid!r}: ε = {eps:g} is below the {prev:g} it reported before (an "
                                 "accountant's ε never decreases)")
        target = self.cfg.train["privacy"].get("target_epsilon")
        if target is not None and eps > target * (1 + 1e-6):
            raise UpdateRejected(f"update from {cid!r}: ε = {eps:g} exceeds the run's target_epsilon {target:g} (a "
                                 "client stops before a round that would)")

    def expected_update(self, cid: str) -> UpdateSpec:
        """What `cid` must send this round (UpdateRejected if it was not sampled or the method cannot say)."""
        _, state, configs = self._current
        if cid not in configs:
            raise UpdateRejected(f"{cid!r} was not sampled for this round")
        if self._secure is not None:  # a masked vector in the ring
            p = self._secure[0]
            return UpdateSpec({MASKED: TensorSpec((p.m,), torch.int32 if p.bits == 32 else torch.int64)})
        try:
            return self.algo.expected_update(state, configs[cid])
        except (KeyError, TypeError, ValueError) as e:  # a config the method cannot describe: refuse, do not crash
            raise UpdateRejected(f"cannot tell what {cid!r} should send: {type(e).__name__}: {e}") from None

    def accept(self, res: RoundResult) -> list[ClientUpdate]:
        """The valid updates of a round, sorted by client id; invalid ones (each checked against its assignment, then
        against the round: a norm more than max_norm_ratio × the median) are logged, their clients added to
        res.failed and res.rejected with the reason; example counts capped so that no weight exceeds
        max_client_weight."""
        ok: dict[str, ClientUpdate] = {}

        def refuse(cid: str, why: str) -> None:
            log.warning("round %d: refused an update: %s", self._current[0], why)
            res.rejected.append(cid)
            res.failed.append(cid)
            res.reasons[cid] = why
            ok.pop(cid, None)

        for u in res.updates:
            try:
                if u.client_id in ok:
                    raise UpdateRejected(f"second update from {u.client_id!r} in one round")
                self.check_update(u.client_id, u)
            except UpdateRejected as e:
                refuse(u.client_id, str(e))
                continue
            ok[u.client_id] = u
        for cid, why in self.outliers(ok).items():
            refuse(cid, why)
        if not self.algo.uniform_weights and 0 < self.cfg.max_client_weight < 1:
            capped = capped_counts({c: u.num_examples for c, u in ok.items()}, self.cfg.max_client_weight)
            for c, n in capped.items():
                if n != ok[c].num_examples:
                    say = log.info if c in self._capped else log.warning  # warned once per client, then in the rows
                    self._capped.add(c)
                    say("round %d: %s claims %d examples, %.0f%% of the round: counted as %d (max_client_weight = %g)",
                        self._current[0], c, ok[c].num_examples,
                        100 * ok[c].num_examples / sum(u.num_examples for u in ok.values()), n,
                        self.cfg.max_client_weight)
                    ok[c] = dataclasses.replace(ok[c], num_examples=n)
                    res.weight_capped.append(c)
        return [ok[c] for c in sorted(ok)]  # aggregation order must not depend on timing

    def outliers(self, ok: dict[str, ClientUpdate]) -> dict[str, str]:
        """The updates whose norm (the method's Capabilities.update_norm) is above max_norm_ratio × the median of the
        round's valid updates, with the reason; none with fewer than 3 updates (no majority to compare with)."""
        kind, ratio = self.algo.capabilities.update_norm, self.cfg.max_norm_ratio
        if not kind or ratio <= 0 or len(ok) < 3:
            return {}
        state = self._current[1]
        norms = {c: update_norm(kind, state, u) for c, u in ok.items()}
        med = float(np.median(list(norms.values())))
        return {c: (f"update from {c!r}: norm {n:.3g} is {n / med:.1f}× the round's median {med:.3g} "
                    f"([federation] max_norm_ratio = {ratio:g})")
                for c, n in sorted(norms.items()) if med > 0 and n > ratio * med}

    def _aggregate(self, rnd: int, state: GlobalState, updates: list[ClientUpdate]):
        """algo.aggregate, or None (logged) when it raises or writes a non-finite tensor: the attempt aborts."""
        return self._guarded(rnd, state, lambda: self.algo.aggregate(rnd, state, updates),
                             "aborted: aggregation failed", "; nothing written")

    @staticmethod
    def _guarded(rnd: int, state: GlobalState, step, what: str, then: str = ""):
        """step() → (new state, metrics), or None (logged) when it raises or writes a non-finite tensor."""
        try:
            new_state, metrics = step()
            for k, t in new_state.tensors.items():
                if t is not state.tensors.get(k) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ArithmeticError(f"the aggregate has non-finite values in {k}")
        except Exception as e:  # noqa: BLE001 - a bad round must never take the coordinator down
            log.error("round %d %s (%s: %s)%s", rnd, what, type(e).__name__, e, then)
            return None
        return new_state, metrics

    # -- the loop -------------------------------------------------------------------------------
    def run(self, state: GlobalState, *, start_round: int = 1, writer: MetricsWriter,
            on_round: Callable[[dict[str, Any]], None] | None = None) -> GlobalState:
        """Rounds start_round … cfg.rounds from `state` (stopping early on a spent privacy budget); each round's
        metrics row goes to `writer` and `on_round`. Returns the last global state."""
        h = self.hooks
        if start_round == 1 and (h.evaluate or h.test) and not writer.rows:
            writer.append({"round": 0, "algorithm": self.algo.name, **self.losses(state), **self.generated(0, state)})
        for rnd in range(start_round, self.cfg.rounds + 1):
            if h.budget_check is not None and (reason := h.budget_check(state)):
                self.stop_reason = reason
                log.warning("stopping before round %d: %s", rnd, reason)
                break
            try:
                state = self.run_round(rnd, state, writer)
            except BudgetExhausted as e:
                self.stop_reason = str(e)
                log.warning("stopping before round %d: %s", rnd, e)
                break
            if on_round is not None:
                on_round(writer.rows[-1])
        return state

    def run_round(self, rnd: int, state: GlobalState, writer: MetricsWriter) -> GlobalState:
        if self.cfg.secagg is not None:
            return self.run_secure_round(rnd, state, writer)
        t0 = time.perf_counter()
        for attempt in range(self.cfg.max_round_retries + 1):
            sampled = self.sample(rnd, attempt)
            res = self.transport.run_round(self.plan(rnd, state, sampled), self.cfg.round_timeout_s)
            updates = self.accept(res)
            if len(updates) >= self.cfg.min_clients:
                if (got := self._aggregate_finite(rnd, state, updates, res)) is not None:
                    out, updates, losses = got
                    break
                continue
            if res.budget_exhausted and len(sampled) - len(res.budget_exhausted) < self.cfg.min_clients:
                raise BudgetExhausted(f"privacy budget spent by {', '.join(res.budget_exhausted)}: fewer than "
                                      f"min_clients={self.cfg.min_clients} clients may train another round")
            log.warning("round %d aborted: %d/%d clients sent a valid update (min %d); nothing written, retrying",
                        rnd, len(updates), len(sampled), self.cfg.min_clients)
        else:
            raise RoundAborted(f"round {rnd} failed {self.cfg.max_round_retries + 1} times: too few valid updates "
                               "or aggregation failed")
        return self.commit(rnd, state, out, updates, sampled, res, t0, writer, losses)

    def _aggregate_finite(self, rnd: int, state: GlobalState, updates: list[ClientUpdate], res: RoundResult):
        """(aggregate, the updates in it, its losses), or None: the attempt aborts. An aggregate whose eval or test
        loss is not finite (while the global model's was) is never committed: the update that causes it is found by
        leaving each out in turn (largest norm first, at most 8 tries), refused with that reason, and the round goes
        on without it."""
        if (out := self._aggregate(rnd, state, updates)) is None:
            return None
        losses = self.losses(out[0])
        if self._finite_losses(losses):
            return out, updates, losses
        kind = self.algo.capabilities.update_norm
        order = sorted(updates, key=lambda u: -update_norm(kind, state, u)) if kind else list(updates)
        for bad in order[:8]:
            rest = [u for u in updates if u is not bad]
            if len(rest) < self.cfg.min_clients or (alt := self._aggregate(rnd, state, rest)) is None:
                continue
            if self._finite_losses(alt_losses := self.losses(alt[0])):
                why = (f"update from {bad.client_id!r}: with it the round's model has a non-finite loss "
                       f"({', '.join(f'{k} {v}' for k, v in losses.items())}); the round goes on without it")
                log.warning("round %d: refused an update: %s", rnd, why)
                res.rejected.append(bad.client_id)
                res.failed.append(bad.client_id)
                res.reasons[bad.client_id] = why
                return alt, rest, alt_losses
        log.error("round %d aborted: the aggregate's loss is not finite (%s) and leaving out one update does not "
                  "help; nothing written", rnd, losses)
        return None

    def _finite_losses(self, losses: dict[str, float]) -> bool:
        """No loss that is evaluated is inf or NaN (a NaN that means "not evaluated" is fine)."""
        h = self.hooks
        evaluated = {"eval_loss": h.evaluate is not None, "test_loss": h.test is not None}
        return all(math.isfinite(v) or (h.nan_is_skipped and math.isnan(v)) for k, v in losses.items()
                   if evaluated.get(k))

    def commit(self, rnd: int, state: GlobalState, out: tuple[GlobalState, dict], updates: list[ClientUpdate],
               sampled: list[str], res: RoundResult, t0: float, writer: MetricsWriter,
               losses: dict[str, float] | None = None) -> GlobalState:
        """Record an aggregated round: client versions and hardware, losses, ε, the checkpoint, the metrics row."""
        new_state, agg_metrics = out
        for u in updates:
            self.client_versions[u.client_id] = state.version
            mem = {k: u.metrics[k] for k in HARDWARE_METRICS if k in u.metrics}
            told = res.client_hardware.get(u.client_id, {})
            self.client_hardware.setdefault(u.client_id, {}).update({**told, **mem})
        if losses is None:
            losses = self.losses(new_state)
        claims = updates if self.sample_dp else []  # a client's ε/δ is read only in a run that trains under it
        eps_now = _finite([agg_metrics.pop("epsilon", None), *(u.metrics.get("epsilon") for u in claims)])
        if eps_now:
            self.epsilon_max = max([*eps_now, *_finite([self.epsilon_max])])
        deltas = _finite([agg_metrics.pop("delta", None), *(u.metrics.get("delta") for u in claims)])
        for u in claims:
            if "epsilon" in u.metrics:
                self.client_epsilon[u.client_id] = float(u.metrics["epsilon"])
        checkpoint.save(self.ckpt_dir, checkpoint.Checkpoint(rnd, new_state, self.engine_state()))
        self.journal.clear(rnd)
        row = {
            "round": rnd, "algorithm": self.algo.name, "clients_sampled": len(sampled),
            "clients_completed": len(updates), "clients_failed": sorted(set(res.failed)),
            "updates_rejected": len(res.rejected), "rejected_why": dict(sorted(res.reasons.items())),
            "clients_late": sorted(set(res.late)), "clients_weight_capped": sorted(res.weight_capped),
            "bytes_up": res.bytes_up, "bytes_down": res.bytes_down,
            "payload_bytes_up": res.payload_bytes_up, "payload_bytes_down": res.payload_bytes_down,
            "train_loss": _train_loss(updates),
            **losses, **self.generated(rnd, new_state),
            "epsilon": self.epsilon_max, "delta": max(deltas) if deltas else None,
            "wall_s": round(time.perf_counter() - t0, 3),
            **agg_metrics,
        }
        writer.append(row)
        return new_state

    # -- secure aggregation ---------------------------------------------------------------------------------------
    def run_secure_round(self, rnd: int, state: GlobalState, writer: MetricsWriter) -> GlobalState:
        """One round under [secagg] (module docstring): attempts from the journal's next, the survivors of an earlier
        unmask required, a journaled sum applied as is."""
        t0 = time.perf_counter()
        rec = self.journal.load(rnd) or {}
        first = rec["attempt"] + 1 if "attempt" in rec else 0
        pinned = frozenset(rec["survivors"]) if rec.get("survivors") else None
        if (saved := self.journal.load_sum(rnd)) is not None:
            log.warning("round %d: finishing from the sum journaled before the coordinator stopped", rnd)
            secure, updates = saved
            res = RoundResult(updates=updates, secure=secure, unmasked=True)
            out = self._apply_secure(rnd, state, secure, updates)
            if out is None:
                raise RoundAborted(f"round {rnd}: the journaled secure sum cannot be applied")
            return self.commit(rnd, state, out, updates, sorted(secure.participants), res, t0, writer)
        if pinned:
            log.warning("round %d was unmasked over %s before the coordinator stopped: this round can only sum "
                        "exactly those clients again", rnd, ", ".join(sorted(pinned)))
        for attempt in range(first, first + self.cfg.max_round_retries + 1):
            sampled = sorted(pinned) if pinned else self.sample(rnd, attempt)
            self.journal.started(rnd, attempt)
            plan = self.plan(rnd, state, sampled, attempt, pinned)
            res = self.transport.run_round(plan, self.cfg.round_timeout_s)
            if res.secure is None:
                if res.unmasked:
                    raise RoundAborted(f"round {rnd}: secure aggregation failed after its unmask "
                                       f"({res.secagg_abort}); stopping: another attempt over a different set of the "
                                       "same clients' updates would expose individual updates")
                if res.budget_exhausted and len(sampled) - len(res.budget_exhausted) < self.cfg.min_clients:
                    raise BudgetExhausted(f"privacy budget spent by {', '.join(res.budget_exhausted)}")
                log.warning("round %d attempt %d aborted: %s; nothing written, retrying with a fresh sample and "
                            "fresh keys", rnd, attempt, res.secagg_abort or "no secure sum")
                continue
            updates = self._accept_secure(rnd, res)
            self.journal.decoded(rnd, attempt, res.secure, updates)
            out = self._apply_secure(rnd, state, res.secure, updates)
            if out is None:
                raise RoundAborted(f"round {rnd}: the secure sum could not be applied; stopping (the round was "
                                   "unmasked, so it is not retried)")
            if not self._finite_losses(losses := self.losses(out[0])):
                raise RoundAborted(f"round {rnd}: the model of the secure sum has a non-finite loss ({losses}); no "
                                   "single update can be left out of a secure sum, and the round was unmasked: "
                                   "stopping with nothing written")
            return self.commit(rnd, state, out, updates, sampled, res, t0, writer, losses)
        raise RoundAborted(f"round {rnd} failed {self.cfg.max_round_retries + 1} secure aggregation attempts")

    def _accept_secure(self, rnd: int, res: RoundResult) -> list[ClientUpdate]:
        """The summed clients' clear metadata, checked (num_examples, metrics); one that fails stops the run: its
        vector is already in the sum."""
        secure, out = res.secure, {}
        for u in res.updates:
            if u.client_id in secure.participants:
                out[u.client_id] = ClientUpdate(u.client_id, u.num_examples, {}, dict(u.metrics))
        if sorted(out) != sorted(secure.participants):
            raise RoundAborted(f"round {rnd}: the transport summed {sorted(secure.participants)} but reported "
                               f"metadata for {sorted(out)}")
        caps = [self.cfg.max_examples_per_client] if self.cfg.max_examples_per_client else []
        for u in out.values():
            try:
                validate_update(UpdateSpec({}), u, max_examples=min(caps) if caps else None,
                                metric_ranges=self.algo.metrics_accepted())
            except UpdateRejected as e:
                raise RoundAborted(f"round {rnd}: {e}; its vector is already in the secure sum, stopping") from None
        res.weight_capped = [c for c in secure.participants  # the coordinator capped their weight (max_share)
                             if not self.algo.uniform_weights and secure.weights[c] < out[c].num_examples]
        if secure.bad_shares:
            log.warning("round %d: wrong secret shares from %s (the sum was rebuilt without them)", rnd,
                        ", ".join(secure.bad_shares))
        return [out[c] for c in sorted(out)]

    def _apply_secure(self, rnd: int, state: GlobalState, secure: SecureSum, updates: list[ClientUpdate]):
        """algo.apply_secure on the decoded parts, or None (logged) when it raises or writes a non-finite tensor."""
        parts = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in secure.parts.items()}
        out = self._guarded(rnd, state, lambda: self.algo.apply_secure(rnd, state, parts, updates),
                            "failed to apply the secure sum")
        if out is None:
            return None
        return out[0], dict(out[1], secagg_err_bound=secure.err_bound, **secure.stats)

    def losses(self, state: GlobalState) -> dict[str, float]:
        """eval_loss and test_loss of the global model at `state` (nan when that set is not evaluated)."""
        nan, h = float("nan"), self.hooks
        return {"eval_loss": h.evaluate(state) if h.evaluate is not None else nan,
                "test_loss": h.test(state) if h.test is not None else nan}

    def generated(self, rnd: int, state: GlobalState) -> dict[str, Any]:
        """test_rouge_l / test_exact_match at round 0, every generate_every rounds and the last ({} otherwise)."""
        h = self.hooks
        if h.generate is None or h.generate_every <= 0:
            return {}
        if rnd % h.generate_every and rnd != self.cfg.rounds:
            return {}
        g = h.generate(state)
        return {"test_rouge_l": g["rouge_l"], "test_exact_match": g["exact_match"], "test_generated": g["generated"]}

    def engine_state(self) -> dict[str, Any]:
        extra = self.hooks.extra_state() if self.hooks.extra_state is not None else {}
        return {"client_versions": self.client_versions, "epsilon_max": self.epsilon_max,
                "client_epsilon": self.client_epsilon,
                "state_format": self.algo.state_format, **extra}
