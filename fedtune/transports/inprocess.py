"""In-process transport (simulation): one frozen base model in memory shared by every client.

The base is never copied per client. Each client's round starts from the synced global model (its
ClientAlgorithm loads the global adapter / fresh LoRA), trains, and hands back an update; the
ClientAlgorithm restores the global state afterwards. Instructions and updates are sized exactly as
the gRPC transport would send them, so bytes_up/bytes_down are real wire sizes.

With secure aggregation (plan.secagg) the round's clients train as always, then run the SecAgg+ protocol with the
coordinator in this process (fedtune.secagg.local: every message through its wire form); the engine gets the
decoded sum only.
"""

from __future__ import annotations

import logging
import os
import queue
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed

import torch
from torch import nn
from tqdm.auto import tqdm

from fedtune.algorithms.api import ClientUpdate, Instruction, TrainContext, payload_nbytes
from fedtune.algorithms.runner import Node
from fedtune.data.prepare import ClientData
from fedtune.models.hardware import model_device
from fedtune.models.memory import peak_memory_mb
from fedtune.privacy.sample import PrivacyBudgetExhausted
from fedtune.secagg.local import run_local
from fedtune.secagg.protocol import MASKED, Abort
from fedtune.transports.base import RoundPlan, RoundResult
from fedtune.transports.wire import sizes as wire_size

log = logging.getLogger("fedtune")


class InProcessTransport:
    """Runs a round's sampled clients on the shared model; counts the bytes a network would carry.

    The shared model is one Node (fedtune.algorithms.runner), brought to the round's global version from the plan
    before any client trains. Modes (chosen per round, see `workers_for`): clients one by one on the shared model;
    the round's clients on `workers` threads, each thread training on its own fork of the model
    (ClientAlgorithm.fork: own adapter tensors, the frozen base shared, not copied) with `threads_per_worker` torch
    intra-op threads (torch releases the GIL inside ops, so W threads use W cores); with `batch_clients` (the
    method's Capabilities.batched and [federation] batch_clients), one batched loop per worker over a contiguous
    group of clients (fedtune.training.batched). Each client's update depends only on its own instruction, and
    updates are returned in instruction order (the engine sorts them by client id), so the result does not depend
    on the mode's timing: threaded equals one by one bit for bit."""

    def __init__(self, node: Node, data: dict[str, ClientData], pad_id: int, progress: bool = True,
                 batch_clients: bool = False, workers: int = 1, threads_per_worker: int = 1,
                 secagg_drop: Callable[[RoundPlan], dict[str, set[str]]] | None = None,
                 replicas: list[Node] | None = None) -> None:
        self.node, self.data, self.pad_id, self.progress = node, data, pad_id, progress
        # [federation] devices: one Node per device (its own base replica there; `node` itself where it is on that
        # device), each trained on by one worker thread; set up and synced from the plan like the shared model
        self.replicas = list(replicas or [])
        self.secagg_drop = secagg_drop  # tests: which clients vanish at which protocol stage of an attempt
        self.unmasked: defaultdict[str, set[bytes]] = defaultdict(set)  # per client: the attempts it unmasked
        self.batch_clients = batch_clients
        self.workers, self.threads_per_worker = max(1, workers), max(1, threads_per_worker)
        self.last_mode = ""

    def workers_for(self, instructions: dict[str, Instruction]) -> tuple[int, str]:
        """(worker threads, why) for this round: 1 when the clients must share the one model in turn."""
        if self.workers < 2:
            return 1, "[federation] workers = 1" if self.workers == 1 else "one CPU"
        if len(instructions) < 2:
            return 1, "one client"
        if any(ins.train.get("privacy") for ins in instructions.values()):
            return 1, "sample-level DP (per-client accountants and opacus hooks on the one model)"
        if dropout_active(self.node.model):
            return 1, "dropout draws from torch's global RNG, whose order threads would change"
        return min(self.workers, len(instructions)), ""

    def describe(self) -> str:
        """The mode, for the log line at start."""
        if len(self.replicas) > 1:
            return (f"{len(self.replicas)} devices ({', '.join(str(model_device(r.base)) for r in self.replicas)}), "
                    f"one base replica and one worker thread × {self.threads_per_worker} torch thread(s) each")
        batched = " in one batched loop per thread" if self.batch_clients else ""
        if self.workers < 2:
            return (f"clients one by one{' (batched)' if batched else ''} on the shared model, "
                    f"{torch.get_num_threads()} torch thread(s)")
        return (f"up to {self.workers} worker threads × {self.threads_per_worker} torch thread(s), each on its own "
                f"adapter copy of the shared base{batched or ', clients one by one (bit-identical to sequential)'}")

    def run_round(self, plan: RoundPlan, timeout_s: float) -> RoundResult:
        rnd, instructions, node = plan.round, plan.instructions, self.node
        if node.version != plan.version:  # the shared model is every client's: it syncs once
            node.advance(plan.sync_payload(node.version), plan.version)
        res = RoundResult(updates=[])
        for ins in instructions.values():  # what each client, on its own machine, would have downloaded
            res.bytes_down += wire_size.instruction_bytes(ins)
            res.payload_bytes_down += payload_nbytes(ins.sync.tensors) + (payload_nbytes(ins.setup.tensors) if ins.setup else 0)
        workers, why = self.workers_for(instructions)
        if workers > 1 and len(self.replicas) > 1:  # one worker per device, on that device's replica
            pairs = [(r, r.model) for r in self._sync_replicas(plan)]
            mode = f"on {len(pairs)} devices"
        else:
            pairs = [(node, node.client.fork(node.model)) for _ in range(workers)] if workers > 1 else []
            if pairs and pairs[0][1] is None:
                workers, why, pairs = 1, f"{type(node.client).__name__} cannot train clients on forks of the model", []
            mode = f"on {workers} worker threads" if workers > 1 else f"one by one ({why})"
        if mode != self.last_mode:
            log.info("round %d: clients %s", rnd, mode)
            self.last_mode = mode
        if pairs:
            updates = self._train_threaded(rnd, instructions, pairs)
        else:
            updates = self._train_batched(node, node.model, instructions)
        if updates is None:
            updates = []
            bar = tqdm(instructions.items(), desc=f"round {rnd} clients", leave=False, disable=not self.progress,
                       position=1)
            for cid, ins in bar:
                try:
                    updates.append(self._train(cid, ins))
                except PrivacyBudgetExhausted as e:
                    log.warning("%s", e)
                    res.failed.append(cid)
                    res.budget_exhausted.append(cid)
        mem = peak_memory_mb(model_device(node.model))  # what a client on its own machine would report
        for update in updates:
            update.metrics.update(mem)
            if plan.secagg is None:
                res.bytes_up += wire_size.update_bytes(update)
                res.payload_bytes_up += payload_nbytes(update.tensors)
            res.updates.append(update)
        return self._secure(plan, res) if plan.secagg is not None else res

    def _secure(self, plan: RoundPlan, res: RoundResult) -> RoundResult:
        """The protocol over the round's updates (each client's secure vector), every party here."""
        p = plan.secagg
        vectors = {u.client_id: self.node.client.secure_vector(u, p.layout) for u in res.updates}
        weights = {u.client_id: 1 if p.weights == "uniform" else u.num_examples for u in res.updates}

        def on_unmask(survivors: list[str]) -> None:
            res.unmasked = True
            if plan.on_unmask is not None:
                plan.on_unmask(survivors)

        try:
            res.secure, traffic = run_local(p, vectors, weights, min_clients=plan.min_clients,
                                            drop=self.secagg_drop(plan) if self.secagg_drop else None,
                                            unmasked=self.unmasked, require=plan.secagg_require, on_unmask=on_unmask)
        except Abort as e:
            log.warning("round %d: %s", plan.round, e)
            res.secagg_abort = str(e)
            return res
        ring = torch.int32 if p.bits == 32 else torch.int64
        for u in res.updates:  # what each survivor's push of its masked vector carries, besides the protocol's bytes
            if u.client_id in res.secure.participants:
                res.bytes_up += wire_size.update_bytes(ClientUpdate(u.client_id, u.num_examples,
                                                                    {MASKED: torch.zeros(0, dtype=ring)}, u.metrics))
                res.payload_bytes_up += p.m * p.bits // 8
        res.bytes_up += traffic.up
        res.bytes_down += traffic.down
        res.secure.stats.update(secagg_client_s=max(traffic.client_s.values(), default=0.0),
                                secagg_server_s=traffic.server_s)
        return res

    def _sync_replicas(self, plan: RoundPlan) -> list[Node]:
        """Every device's replica set up (from the plan's setup for a fresh client) and at the plan's version."""
        first = next(iter(plan.instructions))
        for r in self.replicas:
            if r.client is None:
                r.apply(plan.instruction_for(first, -1))
            elif r.version != plan.version:
                r.advance(plan.sync_payload(r.version), plan.version)
        return self.replicas

    def _train_batched(self, node: Node, model: nn.Module, instructions: dict[str, Instruction],
                       ) -> list[ClientUpdate] | None:
        """All clients in one batched loop when the method supports it (fedtune.training.batched), else None."""
        if not self.batch_clients or len(instructions) < 2 or not node.holding.plain:
            return None  # the batched loop stacks float32 CPU factors; other holdings train one by one
        ctxs = [TrainContext(cid, self.data[cid].train, self.pad_id) for cid in instructions]
        return node.client.train_many(model, ctxs, [ins.train for ins in instructions.values()])

    def _train_threaded(self, rnd: int, instructions: dict[str, Instruction],
                        models: list[tuple[Node, nn.Module]]) -> list[ClientUpdate]:
        """The clients on one thread per (node, model) in `models` (a fork of the shared model, or a device's
        replica); updates in instruction order, their tensors on the shared model's device."""
        items, workers = list(instructions.items()), len(models)
        home = model_device(self.node.model)
        forks: queue.SimpleQueue = queue.SimpleQueue()
        for m in models:
            forks.put(m)
        if self.batch_clients:  # contiguous groups, one batched loop each
            size = -(-len(items) // workers)
            tasks = [dict(items[i:i + size]) for i in range(0, len(items), size)]
        else:
            tasks = [{cid: ins} for cid, ins in items]
        main_threads = torch.get_num_threads()

        def run(group: dict[str, Instruction]) -> list[ClientUpdate]:
            torch.set_num_threads(self.threads_per_worker)  # OpenMP/MKL thread counts are per calling thread
            owner, model = forks.get()
            try:
                got = self._train_batched(owner, model, group) if len(group) > 1 else None
                if got is None:
                    got = [owner.train(self.data[cid].train, self.pad_id, ins.train, client_id=cid, model=model)
                           for cid, ins in group.items()]
                for u in got:
                    u.tensors = {k: t.to(home) for k, t in u.tensors.items()}
                return got
            finally:
                forks.put((owner, model))

        bar = tqdm(total=len(items), desc=f"round {rnd} clients", leave=False, disable=not self.progress, position=1)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedtune-client") as pool:
                futures = [pool.submit(run, g) for g in tasks]
                for f in as_completed(futures):
                    if f.exception() is not None:
                        for other in futures:
                            other.cancel()
                    else:
                        bar.update(len(f.result()))
                out = [u for f in futures for u in f.result()]  # raises the first failure, in client order
        finally:
            bar.close()
            torch.set_num_threads(main_threads)
        return out

    def _train(self, cid: str, ins: Instruction) -> ClientUpdate:
        steps = tqdm(total=int(ins.train.get("steps", 0)), desc=f"{cid} steps", leave=False,
                     disable=not self.progress, position=2)

        def on_step(step: int, loss: float) -> None:
            steps.update(1)
            steps.set_postfix(loss=f"{loss:.3f}")

        try:
            return self.node.train(self.data[cid].train, self.pad_id, ins.train, client_id=cid, on_step=on_step)
        finally:
            steps.close()


def dropout_active(model: nn.Module) -> bool:
    """Whether training draws dropout masks: an nn.Dropout with p > 0, or a model config's attention dropout."""
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True
    cfg = getattr(model, "config", None)
    return any(float(getattr(cfg, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout", "dropout"))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_workers(requested: int, threads: int, cpus: int) -> tuple[int, int]:
    """(worker threads, torch threads per worker) for [federation] workers = `requested` (0: auto), torch's
    intra-op `threads` ([run] threads, else torch's default) and `cpus` usable CPUs. Auto: one worker per CPU,
    each with threads ÷ workers torch threads (at least 1): small per-client matmuls use a core better each
    on its own than split across cores, and single-threaded ops do not stall on a busy machine."""
    workers = max(1, cpus) if requested == 0 else requested
    return workers, max(1, threads // workers)
