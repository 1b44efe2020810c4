"""Secure aggregation (SecAgg+) vs plain aggregation: protocol time, bytes and error, side by side in one run.

Each case runs whole attempts of `fedtune.secagg.local.run_local` (every party in this process, messages through
their JSON wire form) and, for the same clients, the plain aggregate FedAvg computes: `fedtune.algorithms.api
.weighted_mean` over float32 torch tensors of the surviving clients (example weights normalised, as
`example_weights` gives them), whose upload is 4·m bytes per client.

Per case (m numbers per client, n clients, `drop` of them lost after share keys: they shared keys but send no
masked vector, so the server rebuilds their mask keys and removes their pairwise masks):
- client s: `Traffic.client_s` (the client's protocol seconds, wall clock: advertise, share keys, inbox, encoding
  + masking, unmask, the JSON of its messages; training excluded), max and mean over the surviving clients; and
  the CPU seconds (thread time) of the client session's methods, max and mean;
- server s: `Traffic.server_s` (wall: every server step run_local times, i.e. the stage handlers and `finish`,
  which unmasks and decodes) and the CPU seconds of the same methods. Building the rosters, inboxes and unmask
  requests is not in it; that is reported apart ("build");
- the goals are judged on the CPU seconds (the protocol is single-threaded, so on an idle machine CPU ≈ wall;
  on a shared one, other processes stretch the wall time of whichever client they preempt, and the max over
  clients catches every stall); "*" marks a verdict the wall time would reverse;
- plain: `weighted_mean` over the survivors' float32 tensors (median of 5, torch threads --threads, default 1
  like the protocol); secure ÷ plain = server CPU ÷ plain CPU;
- upload B per surviving client: the masked vector (m · bits/8) + its protocol messages (advertise, encrypted
  shares, unmask reply: their JSON wire bytes), vs plain float32 4·m; download B per surviving client (roster,
  inbox, unmask request);
- error: `SecureSum.err_bound` and the measured max |secure − reference| over all coordinates, the reference being
  the float64 weighted mean (Σ for unweighted parts) of the survivors' clipped vectors; next to it, the float32
  plain aggregate's own max |error| against the same reference;
- degree: neighbours per client, `protocol.auto_degree(n)` (complete graph up to 50 clients, SecAgg+ above).
Times are the median over --repeats attempts (fresh keys each; the same vectors), after a warm-up attempt.
Timing wrappers around the client and server sessions' methods (subclasses swapped into fedtune.secagg.local for
the attempt; the package is not changed) give the per-stage breakdown; `--profile fail|all` runs one more
attempt of the cases that miss a time goal (by CPU or wall), or of all, with the clients' and the server's
methods under two cProfile profilers, and prints the top functions of each by own time.

Allocator note: the numbers of a case may depend on the allocations of the cases before it (glibc's dynamic mmap
threshold: a fresh mapping faults on every page's first touch). `crypto.prg` now encrypts in 64 KiB chunks into one
output array (it used to allocate two mask-sized buffers per call, which cost more CPU in page faults than AES: the
Fed-SB r=64, n=100 server went from 0.59 to 0.16 s), but to keep each case independent anyway, each runs in a fresh
process (--isolate; off with --quick).

Workloads (goals from the secure-aggregation issue; vectors N(0, 0.01²) clipped to ±1, weights uniform
integers in [50, 500]; RoundParams threshold 2/3, degree 0 (auto), weights "examples", max_weight 1000):
- fedsb-r{16,64}-n{10,100}: Fed-SB's R on SmolLM2-135M q,v (60 modules × r²: m = 15,360 / 245,760), 64-bit
  ring, 10 % dropped. Goals: client ≤ 0.1 s, server ≤ 0.5 s.
- fedavg-lora-4M: a FedAvg-LoRA delta of m = 4,194,304, 32-bit ring, n = 10, 1 dropped. Goals: client ≤ 1.5 s,
  server ≤ 3 s, masked vector ≤ 1.01 × plain float32 upload.
- fedkseed / fedkseed-pro: FedKSeed's secure layout (`FedKSeed.secure_layout`, K = 4096, τ = --kseed-steps,
  grad_clip --kseed-grad-clip): h [K] weighted; "pro" adds abs [K] and count [K] (an integer part), plain sums.
  Each client's vector is its τ (seed, g) pairs densified as `FedKSeedClient.secure_vector` does (g ~ N(0, 1)).
  64-bit ring, n = 10, 1 dropped. Goals: client ≤ 0.05 s, server ≤ 0.2 s. (FedKSeed's own upload is the τ
  pairs, τ·8 B, printed next to them.)
`--quick` runs the same kinds at small sizes (a few seconds; its goals are the full workloads' and mean little).

JSON: simulations/bench/results/secagg.json (--quick: secagg_quick.json), or --out.

    python simulations/bench/secagg.py [--quick] [--repeats 3] [--cases fedsb-r16-n10 ...] [--seed 0]
        [--kseed-steps 200] [--kseed-grad-clip 100] [--threads 1] [--profile none|fail|all] [--out PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import multiprocessing
import os
import platform
import pstats
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.algorithms.api import weighted_mean
from fedtune.algorithms.fedkseed import FedKSeed, FedKSeedConfig
from fedtune.secagg import local, protocol
from fedtune.secagg.encode import Part
from fedtune.secagg.protocol import RoundParams

CLIENT_STAGES = ("advertise", "share_keys", "receive_inbox", "masked_input", "unmask")
SERVER_STAGES = ("advertise", "close_advertise", "share_keys", "close_share_keys", "masked_input",
                 "close_masked_input", "unmask", "finish")
SERVER_BUILD = ("roster_for", "inbox_for", "unmask_request_for")  # run_local does not time these


@dataclass
class Case:
    name: str
    kind: str  # fedsb | fedavg | fedkseed
    m: int
    n: int
    drop: int
    bits: int
    goals: dict[str, float]  # client_s, server_s (max), up_ratio (masked vector ÷ 4·m)
    layout: tuple[Part, ...] = ()
    tau: int = 0  # FedKSeed steps
    extra: dict[str, Any] = field(default_factory=dict)


FEDSB_GOALS = {"client_s": 0.1, "server_s": 0.5}
FEDAVG_GOALS = {"client_s": 1.5, "server_s": 3.0, "up_ratio": 1.01}
KSEED_GOALS = {"client_s": 0.05, "server_s": 0.2}


def kseed_layout(k: int, tau: int, grad_clip: float, pro: bool) -> tuple[Part, ...]:
    algo = FedKSeed(FedKSeedConfig(num_seeds=k, seed_sampling="pro" if pro else "uniform"))
    return algo.secure_layout(None, {"steps": tau, "grad_clip": grad_clip}, 1.0)


def cases(a: argparse.Namespace) -> list[Case]:
    def fedsb(r: int, n: int) -> Case:
        m = 60 * r * r
        return Case(f"fedsb-r{r}-n{n}", "fedsb", m, n, max(1, n // 10), 64, FEDSB_GOALS, (Part("x", (m,), 1.0),))

    def fedavg(m: int, tag: str) -> Case:
        return Case(f"fedavg-lora-{tag}", "fedavg", m, 10, 1, 32, FEDAVG_GOALS, (Part("x", (m,), 1.0),))

    def kseed(k: int, pro: bool) -> Case:
        lay = kseed_layout(k, a.kseed_steps, a.kseed_grad_clip, pro)
        return Case("fedkseed-pro" if pro else "fedkseed", "fedkseed", sum(p.size for p in lay), 10, 1, 64,
                    KSEED_GOALS, lay, tau=a.kseed_steps, extra={"K": k})

    if a.quick:
        out = [fedsb(4, 10), fedsb(4, 60), fedavg(1 << 16, "64K"), kseed(256, False), kseed(256, True)]
    else:
        out = [fedsb(16, 10), fedsb(16, 100), fedsb(64, 10), fedsb(64, 100), fedavg(4 * 1024 * 1024, "4M"),
               kseed(4096, False), kseed(4096, True)]
    if a.cases:
        unknown = set(a.cases) - {c.name for c in out}
        if unknown:
            raise SystemExit(f"unknown cases {sorted(unknown)}; this mode has {[c.name for c in out]}")
        out = [c for c in out if c.name in a.cases]
    return out


# --- the clients' data and the plain reference -------------------------------------------------------------------
def make_data(c: Case, rng: np.random.Generator) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, int]]:
    ids = [f"c{i:03d}" for i in range(c.n)]
    weights = {cid: int(rng.integers(50, 501)) for cid in ids}
    vectors: dict[str, dict[str, np.ndarray]] = {}
    for cid in ids:
        if c.kind == "fedkseed":  # τ (seed index, g) pairs densified over the K seeds (FedKSeedClient.secure_vector)
            idx = rng.integers(0, c.extra["K"], c.tau)
            g = rng.normal(0.0, 1.0, c.tau)
            parts = {}
            for p in c.layout:
                v = np.zeros(p.shape, np.float64)
                if p.name == "h":
                    np.add.at(v, idx, np.clip(g, -p.clip / c.tau, p.clip / c.tau))
                elif p.name == "abs":
                    np.add.at(v, idx, np.abs(np.clip(g, -p.clip / c.tau, p.clip / c.tau)))
                else:
                    np.add.at(v, idx, 1.0)
                parts[p.name] = v
            vectors[cid] = parts
        else:
            p = c.layout[0]
            vectors[cid] = {p.name: np.clip(rng.normal(0.0, 0.01, p.shape), -p.clip, p.clip)}
    return vectors, weights


def reference(c: Case, vectors, weights, survivors: list[str]) -> dict[str, np.ndarray]:
    """float64: Σ w x / Σ w over the survivors for weighted parts, Σ x for the others."""
    tot = sum(weights[s] for s in survivors)
    out = {}
    for p in c.layout:
        acc = np.zeros(p.shape, np.float64)
        for s in survivors:
            x = np.clip(vectors[s][p.name], -p.clip, p.clip)
            acc += (weights[s] / tot) * x if p.weighted else x
        out[p.name] = acc
    return out


def plain(c: Case, vectors, weights, survivors: list[str], repeats: int = 5) -> dict[str, Any]:
    """FedAvg's aggregate over float32 tensors of the whole vector (m numbers): its time and its float32 error."""
    flat = [torch.from_numpy(np.concatenate([vectors[s][p.name].reshape(-1) for p in c.layout]).astype(np.float32))
            for s in survivors]
    tot = sum(weights[s] for s in survivors)
    p = [weights[s] / tot for s in survivors]
    times, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = weighted_mean(flat, p)
        times.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    err = None
    if all(q.weighted for q in c.layout):  # the float32 mean's own rounding error vs the float64 reference
        ref = np.concatenate([v.reshape(-1) for v in reference(c, vectors, weights, survivors).values()])
        err = float(np.abs(out.numpy().astype(np.float64) - ref).max())
    del flat
    return {"plain_s": statistics.median(times), "plain_cpu_s": statistics.median(cpus), "plain_s_all": times,
            "plain_f32_max_err": err}


# --- timing wrappers around the sessions -------------------------------------------------------------------------
@dataclass
class Meter:
    """Seconds of the sessions' methods, wall (perf_counter) and CPU (thread_time: this thread only, so other
    processes on a loaded machine do not inflate it), keyed (cid, method) for clients and method for the server;
    the messages the server built for each client; optional cProfile profilers ("client", "server")."""

    wall: dict = field(default_factory=dict)
    cpu: dict = field(default_factory=dict)
    sent: list = field(default_factory=list)
    prof: dict | None = None


def timed_class(base: type, names: tuple[str, ...], meter: Meter, side: str) -> type:
    """A subclass of `base` whose methods `names` add their seconds to `meter`. A method called from inside another
    timed one (the server's unmask builds the unmask request again) is not counted twice."""

    def wrap(name):
        f = getattr(base, name)

        def method(self, *args, **kw):
            if getattr(self, "_bench_depth", 0):
                return f(self, *args, **kw)
            self._bench_depth = 1
            prof = meter.prof[side] if meter.prof else None
            t0, c0 = time.perf_counter(), time.thread_time()
            if prof is not None:
                prof.enable()
            try:
                out = f(self, *args, **kw)
            finally:
                if prof is not None:
                    prof.disable()
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                self._bench_depth = 0
                key = (self.cid, name) if side == "client" else name
                meter.wall[key] = meter.wall.get(key, 0.0) + dt
                meter.cpu[key] = meter.cpu.get(key, 0.0) + dc
            if name in SERVER_BUILD:  # a message to a client: sized after the attempt
                meter.sent.append((args[0], out))
            return out

        method.__name__ = name
        return method

    return type(f"Timed{base.__name__}", (base,), {n: wrap(n) for n in names})


@contextmanager
def instrumented(meter: Meter):
    """run_local builds its sessions from fedtune.secagg.local's names: swap in timed subclasses for one attempt."""
    saved = local.ClientSession, local.ServerSession
    local.ClientSession = timed_class(saved[0], CLIENT_STAGES, meter, "client")
    local.ServerSession = timed_class(saved[1], SERVER_STAGES + SERVER_BUILD, meter, "server")
    try:
        yield
    finally:
        local.ClientSession, local.ServerSession = saved


def wire_len(msg: Any) -> int:
    if isinstance(msg, np.ndarray):
        return msg.nbytes
    if isinstance(msg, dict):  # encrypted shares / an inbox: {peer: ciphertext}
        return len(local.wire(protocol._cts_to_dict(msg)))
    return len(local.wire(msg.to_dict()))


def setup(c: Case, a: argparse.Namespace):
    rng = np.random.default_rng(a.seed)
    vectors, weights = make_data(c, rng)
    ids = sorted(vectors)
    dropped = {str(x) for x in rng.choice(ids, c.drop, replace=False)} if c.drop else set()
    params = RoundParams(run="bench", round=1, attempt=0, bits=c.bits, threshold=2 / 3, degree=0, weights="examples",
                         max_weight=1000, layout=c.layout)
    return params, vectors, weights, dropped, [s for s in ids if s not in dropped]


def attempt(c: Case, params: RoundParams, vectors, weights, dropped: set[str], meter: Meter | None = None,
            ) -> dict[str, Any]:
    sent: list[tuple[str, str, Any]] = []

    def record(stage, cid, msg):  # keeps a reference only (sized after the attempt, outside the timed windows)
        sent.append((stage, cid, msg))
        return msg

    meter = meter or Meter()
    with instrumented(meter):
        t0 = time.perf_counter()
        res, tr = local.run_local(params, vectors, weights, drop={"masked_input": dropped}, tamper=record)
        wall = time.perf_counter() - t0
    surv = sorted(res.participants)
    up, down, vec_b = defaultdict(int), defaultdict(int), 0
    for stage, cid, msg in sent:
        b = wire_len(msg)
        if stage == "masked_input":
            vec_b = b
        else:
            up[cid] += b
    for cid, msg in meter.sent:
        down[cid] += wire_len(msg)
    cs = [tr.client_s[s] for s in surv]
    ccpu = [sum(meter.cpu.get((s, k), 0.0) for k in CLIENT_STAGES) for s in surv]
    mean = lambda d, k: statistics.fmean(d.get((s, k), 0.0) for s in surv)
    return {
        "res": res, "wall_s": wall, "server_s": tr.server_s, "server_cpu_s": sum(meter.cpu.get(k, 0.0)
                                                                                 for k in SERVER_STAGES),
        "client_max_s": max(cs), "client_mean_s": statistics.fmean(cs),
        "client_cpu_max_s": max(ccpu), "client_cpu_mean_s": statistics.fmean(ccpu),
        "vec_B": vec_b, "proto_up_B": statistics.fmean(up[s] for s in surv), "proto_up_B_max": max(up[s] for s in surv),
        "down_B": statistics.fmean(down[s] for s in surv), "down_total_B": tr.down, "up_total_B": tr.up,
        "bytes_check": sum(down.values()) == tr.down and sum(up.values()) + len(surv) * vec_b == tr.up,
        "client_stages_cpu_s": {k: mean(meter.cpu, k) for k in CLIENT_STAGES},
        "client_json_s": statistics.fmean(cs) - sum(mean(meter.wall, k) for k in CLIENT_STAGES),
        "server_stages_cpu_s": {k: meter.cpu.get(k, 0.0) for k in SERVER_STAGES},
        "server_build_s": sum(meter.wall.get(k, 0.0) for k in SERVER_BUILD),
    }


TIMES = ("client_max_s", "client_mean_s", "client_cpu_max_s", "client_cpu_mean_s", "client_json_s", "server_s",
         "server_cpu_s", "server_build_s", "wall_s")


def run_case(c: Case, a: argparse.Namespace) -> dict[str, Any]:
    params, vectors, weights, dropped, survivors = setup(c, a)
    ref = reference(c, vectors, weights, survivors)
    row: dict[str, Any] = {"case": c.name, "kind": c.kind, "m": c.m, "n": c.n, "dropped": c.drop, "bits": c.bits,
                           "degree": protocol.auto_degree(c.n, 0), "layout": [p.to_dict() for p in c.layout],
                           "goals": c.goals, **c.extra}
    if c.tau:
        row["tau"] = c.tau
        row["native_up_B"] = 8 * c.tau  # FedKSeed's own upload: τ (int32 seed index, float32 g) pairs
    row.update(plain(c, vectors, weights, survivors))
    runs, errs = [], []
    for i in range(a.repeats):
        r = attempt(c, dataclasses.replace(params, attempt=i), vectors, weights, dropped)
        res = r.pop("res")
        if not r["bytes_check"]:
            print(f"  WARNING {c.name}: the per-client byte counts do not add up to run_local's Traffic totals")
        if sorted(res.participants) != survivors:
            raise RuntimeError(f"{c.name}: summed {res.participants}, expected {survivors}")
        err = max(float(np.abs(res.parts[k] - ref[k]).max()) for k in ref)
        errs.append(err)
        row["err_bound"] = res.err_bound
        runs.append(r)
        print(f"  {c.name} attempt {i}: client max {r['client_max_s']:.4f} s (CPU {r['client_cpu_max_s']:.4f}), "
              f"server {r['server_s']:.4f} s (CPU {r['server_cpu_s']:.4f}), wall {r['wall_s']:.2f} s, "
              f"max|err| {err:.3g}", flush=True)
    for k in TIMES:
        row[k] = statistics.median(r[k] for r in runs)
    for k in ("client_stages_cpu_s", "server_stages_cpu_s"):
        row[k] = {s: statistics.median(r[k][s] for r in runs) for s in runs[0][k]}
    last = runs[-1]
    row.update({"vec_B": last["vec_B"], "proto_up_B": last["proto_up_B"], "proto_up_B_max": last["proto_up_B_max"],
                "down_B": last["down_B"], "plain_up_B": 4 * c.m, "max_err": max(errs), "attempts": runs})
    row["up_B"] = row["vec_B"] + row["proto_up_B"]
    row["vec_ratio"] = row["vec_B"] / row["plain_up_B"]
    row["up_ratio"] = row["up_B"] / row["plain_up_B"]
    row["secure_over_plain"] = row["server_s"] / row["plain_s"]
    row["secure_over_plain_cpu"] = row["server_cpu_s"] / row["plain_cpu_s"]
    row["err_ok"] = row["max_err"] <= row["err_bound"]
    g = c.goals
    row["pass"] = {"client_s": row["client_cpu_max_s"] <= g["client_s"], "server_s": row["server_cpu_s"] <= g["server_s"]}
    row["pass_wall"] = {"client_s": row["client_max_s"] <= g["client_s"], "server_s": row["server_s"] <= g["server_s"]}
    if "up_ratio" in g:
        row["pass"]["up_ratio"] = row["vec_ratio"] <= g["up_ratio"]
    return row


def profile_case(c: Case, a: argparse.Namespace, top: int = 14) -> dict[str, str]:
    """One more attempt with the clients' and the server's session methods under two cProfile profilers."""
    params, vectors, weights, dropped, _ = setup(c, a)
    meter = Meter(prof={"client": cProfile.Profile(), "server": cProfile.Profile()})
    attempt(c, dataclasses.replace(params, attempt=a.repeats), vectors, weights, dropped, meter)
    out = {}
    for side, prof in meter.prof.items():
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
        text = s.getvalue()
        out[side] = (text[text.index("Ordered by"):] if "Ordered by" in text else text).rstrip()
        out[side + "_total_s"] = pstats.Stats(prof).total_tt
    return out


def time_ok(row: dict[str, Any]) -> bool:
    return all(row[k][g] for k in ("pass", "pass_wall") for g in ("client_s", "server_s"))


def case_worker(c: Case, a: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str] | None]:
    """One case (in a fresh process with --isolate): its row and, when asked for, its profile."""
    if a.threads:
        torch.set_num_threads(a.threads)
    warm_up()
    row = run_case(c, a)
    prof = profile_case(c, a) if a.profile == "all" or a.profile == "fail" and not time_ok(row) else None
    return row, prof


def warm_up() -> None:
    p = RoundParams(run="bench", round=0, attempt=0, bits=64, threshold=2 / 3, degree=0, weights="examples",
                    max_weight=1000, layout=(Part("x", (16,), 1.0),))
    local.run_local(p, {f"w{i}": {"x": np.zeros(16)} for i in range(4)}, {f"w{i}": 1 for i in range(4)})


# --- report --------------------------------------------------------------------------------------------------------
def mark(ok: bool, ok_wall: bool | None = None) -> str:
    """PASS/FAIL by CPU time; "*" when wall time (inflated by other load) says otherwise."""
    return ("PASS" if ok else "FAIL") + ("" if ok_wall is None or ok_wall == ok else "*")


def report(rows: list[dict[str, Any]]) -> None:
    print("\ntime per round, s (median of attempts; client: max/mean over surviving clients; wall = Traffic's "
          "perf_counter, CPU = thread time of the sessions' methods; goals judged on CPU, * = wall disagrees)")
    h = (f"{'case':<16} {'m':>9} {'n':>4} {'drop':>4} {'deg':>3} {'bits':>4} | {'client wall':>11} {'mean':>7} "
         f"{'CPU':>7} {'mean':>7} {'goal':>11} | {'server wall':>11} {'CPU':>7} {'goal':>10} | {'plain':>8} "
         f"{'sec÷plain':>9} | {'build':>6} {'wall':>6}")
    print(h)
    print("-" * len(h))
    for r in rows:
        g, ok, okw = r["goals"], r["pass"], r["pass_wall"]
        print(f"{r['case']:<16} {r['m']:>9,} {r['n']:>4} {r['dropped']:>4} {r['degree']:>3} {r['bits']:>4} | "
              f"{r['client_max_s']:>11.4f} {r['client_mean_s']:>7.4f} {r['client_cpu_max_s']:>7.4f} "
              f"{r['client_cpu_mean_s']:>7.4f} "
              f"{'≤' + format(g['client_s'], 'g') + ' ' + mark(ok['client_s'], okw['client_s']):>11} | "
              f"{r['server_s']:>11.4f} {r['server_cpu_s']:>7.4f} "
              f"{'≤' + format(g['server_s'], 'g') + ' ' + mark(ok['server_s'], okw['server_s']):>10} | "
              f"{r['plain_cpu_s']:>8.5f} {r['secure_over_plain_cpu']:>9.1f} | {r['server_build_s']:>6.4f} "
              f"{r['wall_s']:>6.2f}")
    print("  plain = weighted_mean over the survivors' float32 tensors (CPU s, median of 5); sec÷plain = server CPU ÷ "
          "plain CPU; build = the server building rosters, inboxes, unmask requests (not in server s); wall = the "
          "whole in-process attempt, every party serially")
    print("\nbytes per surviving client: upload = masked vector + protocol messages (JSON) vs plain float32 (4·m)")
    h = (f"{'case':<16} | {'vector B':>11} {'proto B':>8} {'up B':>11} | {'plain B':>11} {'vec÷plain':>9} "
         f"{'up÷plain':>8} | {'down B':>8} | {'err_bound':>9} {'max|err|':>9} {'ok':>3} | {'f32 plain err':>13}")
    print(h)
    print("-" * len(h))
    for r in rows:
        goal = ""
        if "up_ratio" in r["pass"]:
            goal = f"  vec÷plain ≤ {r['goals']['up_ratio']:g} {mark(r['pass']['up_ratio'])}"
        if "native_up_B" in r:
            goal = f"  (FedKSeed's own upload: {r['native_up_B']:,} B)"
        f32 = "—" if r["plain_f32_max_err"] is None else f"{r['plain_f32_max_err']:.3g}"
        print(f"{r['case']:<16} | {r['vec_B']:>11,} {r['proto_up_B']:>8,.0f} {r['up_B']:>11,.0f} | "
              f"{r['plain_up_B']:>11,} {r['vec_ratio']:>9.3f} {r['up_ratio']:>8.4f} | {r['down_B']:>8,.0f} | "
              f"{r['err_bound']:>9.2g} {r['max_err']:>9.2g} {'yes' if r['err_ok'] else 'NO':>3} | {f32:>13}{goal}")
    print("  max|err| = max |secure − float64 reference| (weighted mean, Σ for unweighted parts); f32 plain err = the "
          "float32 weighted_mean's own max |error| against it")
    print("\nCPU s per stage (client: mean over survivors; json = wall s of a client's JSON and parsing in run_local, "
          "i.e. client_s − its methods' wall s; server: each stage summed over clients)")
    cs = ("advertise", "share_keys", "inbox", "masked_input", "unmask")
    ss = ("adv", "c_adv", "shares", "c_shares", "masked", "c_masked", "unmask", "finish")
    print(f"{'case':<16} | " + " ".join(f"{x:>12}" for x in cs) + f" {'json':>7} | " + " ".join(f"{x:>8}" for x in ss))
    for r in rows:
        c, sv, rest = r["client_stages_cpu_s"], r["server_stages_cpu_s"], r["client_json_s"]
        print(f"{r['case']:<16} | " + " ".join(f"{c[k]:>12.4f}" for k in CLIENT_STAGES) + f" {rest:>7.4f} | "
              + " ".join(f"{sv[k]:>8.4f}" for k in SERVER_STAGES))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a few seconds (smoke test)")
    ap.add_argument("--repeats", type=int, default=0, help="attempts per case (0: 3, --quick 1)")
    ap.add_argument("--cases", nargs="+", default=[], help="run only these cases (names as printed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kseed-steps", type=int, default=200, help="FedKSeed τ (steps per round)")
    ap.add_argument("--kseed-grad-clip", type=float, default=100.0, help="FedKSeed grad_clip (its default)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the plain weighted_mean (the protocol is single-threaded); 0 = torch's")
    ap.add_argument("--profile", choices=("none", "fail", "all"), default="fail",
                    help="cProfile one more attempt of the cases that miss a time goal (CPU or wall), or all")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each case in a fresh process (default: yes, --quick: no); see the allocator note above")
    ap.add_argument("--out", default="", help="JSON path (default simulations/bench/results/secagg[_quick].json)")
    a = ap.parse_args()
    a.repeats = a.repeats or (1 if a.quick else 3)
    a.isolate = not a.quick if a.isolate is None else a.isolate
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out or f"simulations/bench/results/secagg{'_quick' if a.quick else ''}.json")
    todo = cases(a)
    print(f"secagg bench: {len(todo)} cases, {a.repeats} attempt(s) each{', each in a fresh process' if a.isolate else ''}, "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    rows, profiles = [], {}
    for c in todo:
        if a.isolate:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
                row, prof = ex.submit(case_worker, c, a).result()
        else:
            row, prof = case_worker(c, a)
        rows.append(row)
        if prof:
            profiles[c.name] = prof
    report(rows)
    for name, prof in profiles.items():
        for side in ("client", "server"):
            who = "all clients" if side == "client" else "the server"
            print(f"\ncProfile of one more attempt of {name}, {side} side ({who}, {prof[side + '_total_s']:.3f} s under "
                  f"the profiler), by own time:\n{prof[side]}")
    res = {"meta": {"quick": a.quick, "repeats": a.repeats, "isolate": a.isolate, "seed": a.seed, "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_1m_end": os.getloadavg()[0],
                    "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
                    "total_s": time.perf_counter() - t0},
           "cases": rows, "profiles": profiles}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {out} ({res['meta']['total_s']:.1f} s)")


if __name__ == "__main__":
    main()
