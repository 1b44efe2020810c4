"""FedKSeed: seed-regenerated z, SPSA, exact replay, catch-up, bytes, "pro" sampling, memory ≈ inference."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import fresh, params_of
from conftest import start_fedkseed as start

from fedtune.algorithms import ClientUpdate, GlobalState, Payload, TrainContext, get_algorithm
from fedtune.algorithms.fedkseed import FedKSeedConfig
from fedtune.algorithms.fedkseed.server import seed_probabilities
from fedtune.algorithms.fedkseed.shared import round_key
from fedtune.training import zo

ROOT = Path(__file__).resolve().parents[1]


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def run_round(algo, state, client, model, rnd, parts, ktok, steps=3):
    """Train every client on `model` (shared), aggregate; returns (state, metrics, updates)."""
    ids = [f"c{i}" for i in range(len(parts))]
    base = {"steps": steps, "lr": 123.0, "batch_size": 2, "seed": 0}
    conf = algo.configure_round(rnd, state, ids, base, ids)
    ups = []
    for i, cid in enumerate(ids):
        cfg = dict(conf[cid], seed=1000 * rnd + i)
        ups.append(client.train(model, TrainContext(cid, parts[i], ktok.pad_token_id), cfg))
    state, metrics = algo.aggregate(rnd, state, ups)
    return state, metrics, ups


# --- z and SPSA primitives -------------------------------------------------------------------------------


def test_z_is_deterministic_per_seed_and_generated_on_cpu(ktok):
    params = zo.zo_parameters(fresh(ktok))
    z1, z2, z3 = zo.materialize(params, 7), zo.materialize(params, 7), zo.materialize(params, 8)
    assert all(torch.equal(a, b) for a, b in zip(z1, z2))
    assert all(not torch.equal(a, c) for a, c in zip(z1, z3))
    assert [n for n, _ in params] == sorted(n for n, _ in params)  # fixed order: sorted names
    # definition: the sorted tensors as one flat vector, one CPU-generator block of min(CHUNK, total) elements
    # (here the whole tiny model), then moved to the param's device/dtype
    total = sum(p.numel() for _, p in params)
    flat = torch.randn(total, generator=torch.Generator().manual_seed(zo.block_seed(7, 0)))
    assert torch.equal(torch.cat([z.view(-1) for z in z1]), flat)
    meta = [(n, torch.empty(p.shape, device="meta")) for n, p in params]
    chunks = list(zo.noise(meta, 7))
    assert all(z.device.type == "meta" for _, z in chunks) and len(chunks) == len(params)


def test_z_blocks_span_tensors_and_do_not_depend_on_the_thread_count(ktok, monkeypatch):
    """Blocks of CHUNK elements cut across tensor boundaries; each is its own seeded stream, so perturb gives
    bit-identical θ on 1 or 3 worker threads; z has mean 0, variance 1 and unrelated blocks/seeds."""
    monkeypatch.setattr(zo, "CHUNK", 10_000)
    params = zo.zo_parameters(fresh(ktok))
    total = sum(p.numel() for _, p in params)
    size, blocks = zo.layout(params)
    assert size == 10_000 and len(blocks) == -(-total // 10_000) >= 5
    assert sum(hi - lo for b in blocks for _, lo, hi in b) == total
    assert any(len(b) > 1 for b in blocks)  # a block covering pieces of several tensors
    ref = torch.cat([torch.randn(10_000, generator=torch.Generator().manual_seed(zo.block_seed(3, b)))
                     for b in range(len(blocks))])[:total]
    z = torch.cat([t.view(-1) for t in zo.materialize(params, 3)])
    assert torch.equal(z, ref)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([z, torch.cat([t.view(-1) for t in zo.materialize(params, 4)])]))[0, 1])) < 0.01
    assert zo.block_seed(3, 0) != zo.block_seed(3, 1) != zo.block_seed(4, 0)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            theta = [(k, p.detach().clone()) for k, p in params]
            zo.perturb(theta, 3, 1e-3)
            zo.apply_update(theta, 5, 2e-3)
            out.append(theta)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*out))


def test_perturb_round_trip_and_spsa_matches_directional_derivative(ktok, kfeats):
    model = fresh(ktok)
    params = zo.zo_parameters(model)
    before = [p.detach().clone() for _, p in params]
    batch = next(zo_batches(kfeats, ktok))
    g, lp, lm = zo.spsa_step(model, params, batch, 11, 1e-3)
    assert max(max_abs(p, b) for (_, p), b in zip(params, before)) <= 3e-6  # +εz, −2εz, +εz
    model.zero_grad()
    zo.example_losses(model, batch).mean().backward()  # the ZO loss: mean over examples of their token means
    directional = sum(
        float((p.grad.double() * z.double()).sum()) for (_, p), z in zip(params, zo.materialize(params, 11))
    )
    assert abs(g - directional) <= 0.05 * abs(directional) + 1e-2  # g ≈ ∇L·z (sign included)
    assert lp != lm


def test_zo_step_regenerates_z_three_times_and_matches_the_unfused_step(ktok, kfeats, monkeypatch):
    """+εz, −2εz, then the restore fused with the update: 3 regenerations (was 4: +εz, −2εz, +εz, −η·g·z),
    counted as generated z blocks; the same g (the forwards see the same θ ± εz) and the same θ up to fp32
    rounding."""
    monkeypatch.setattr(zo, "CHUNK", 30_000)  # several blocks, generated on worker threads
    _, _, client, model = start(FedKSeedConfig(num_seeds=8, lr=1e-2), ktok)
    params = zo.zo_parameters(model)
    nblocks = len(zo.layout(params)[1])
    theta = [p.detach().clone() for _, p in params]
    batch = next(zo_batches(kfeats, ktok))
    calls = []
    orig = zo.block_generator
    monkeypatch.setattr(zo, "block_generator", lambda seed, b: calls.append((seed, b)) or orig(seed, b))
    g, _, _, _ = client.step(model, params, [batch], 11, eps=1e-3, lr=1e-2, grad_clip=100.0, dp=None)
    assert nblocks >= 3 and sorted(calls) == sorted((11, b) for b in range(nblocks) for _ in range(3))
    fused = [p.detach().clone() for _, p in params]
    for (_, p), t in zip(params, theta):
        p.data.copy_(t)
    g_ref, _, _ = zo.spsa_step(model, params, batch, 11, 1e-3)  # the unfused step: restore, then update
    zo.apply_update(params, 11, 1e-2 * float(torch.tensor(g_ref, dtype=torch.float32)))
    assert len(calls) == (3 + 4) * nblocks and g == float(torch.tensor(g_ref, dtype=torch.float32)) != 0
    assert max(max_abs(p, f) for (_, p), f in zip(params, fused)) <= 1e-6
    assert max(max_abs(p, t) for (_, p), t in zip(params, theta)) > 1e-5  # the step did move θ


def zo_batches(feats, ktok):
    from fedtune.training.loop import batches

    return batches(feats, 2, 0, ktok.pad_token_id)


# --- client ----------------------------------------------------------------------------------------------


def test_train_restores_model_bit_exactly_and_uploads_tau_times_8_bytes(ktok, kfeats):
    algo, state, client, model = start(FedKSeedConfig(num_seeds=64, lr=1e-3), ktok)
    before = params_of(model)
    cfg = algo.configure_round(1, state, ["a"], {"steps": 4, "lr": 5.0, "batch_size": 2, "seed": 3}, ["a"])["a"]
    assert cfg["lr"] == 1e-3 and cfg["eps"] == 5e-4  # the method's η replaces the run's generic lr
    upd = client.train(model, TrainContext("a", kfeats[:20], ktok.pad_token_id), cfg)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert upd.tensors["seed_idx"].dtype == torch.int32 and upd.tensors["grad"].dtype == torch.float32
    assert upd.tensors["seed_idx"].shape == upd.tensors["grad"].shape == (4,)
    assert sum(t.numel() * t.element_size() for t in upd.tensors.values()) == 4 * (4 + 4)
    assert upd.num_examples == 20 and upd.tensors["grad"].abs().sum() > 0
    again = client.train(model, TrainContext("a", kfeats[:20], ktok.pad_token_id), cfg)
    assert all(torch.equal(upd.tensors[k], again.tensors[k]) for k in upd.tensors)  # seeded


def test_param_backup_spills_to_a_file_and_restores_bit_exactly(ktok, monkeypatch):
    model = fresh(ktok)
    params = zo.zo_parameters(model)
    before = params_of(model)
    backup = zo.ParamBackup(params)
    assert backup.copy is None and backup.file is not None  # no second θ in memory
    assert backup.file.seek(0, 2) == sum(p.numel() * 4 for _, p in params)
    for s in range(3):  # steps that do not undo exactly in fp32
        zo.perturb(params, s, 1e-3)
        zo.finish_step(params, s, 1e-3, 5e-4)
    assert any(not torch.equal(before[n], p) for n, p in params_of(model).items())
    backup.restore()
    backup.close()
    assert all(torch.equal(before[n], p) for n, p in params_of(model).items())
    # no usable temp dir: the backup falls back to an in-memory copy
    monkeypatch.setattr(zo.tempfile, "TemporaryFile", lambda **kw: (_ for _ in ()).throw(OSError("read-only")))
    mem = zo.ParamBackup(params)
    zo.perturb(params, 9, 1e-3)
    mem.restore()
    assert mem.file is None and all(torch.equal(before[n], p) for n, p in params_of(model).items())


def test_replay_of_aggregate_equals_weighted_client_steps(ktok, kfeats):
    cfg = FedKSeedConfig(num_seeds=6, lr=1e-3)  # few seeds: clients collide on seeds, H must accumulate
    algo, state, client, model = start(cfg, ktok)
    theta0 = params_of(model)
    parts = [kfeats[:10], kfeats[10:40], kfeats[40:50]]  # n_k = 10, 30, 10 → p = .2, .6, .2
    state, _, ups = run_round(algo, state, client, model, 1, parts, ktok, steps=4)
    assert state.tensors[round_key(1, "seed_idx")].numel() <= 6
    client.sync(model, algo.sync_payload(state, 0))  # replay the aggregated pairs
    # direct: from θ_global apply every client's steps with weight p_k
    direct = fresh(ktok)
    params = zo.zo_parameters(direct)
    seeds = client.seeds
    for pk, u in zip([0.2, 0.6, 0.2], ups):
        for i, g in zip(u.tensors["seed_idx"].tolist(), u.tensors["grad"].tolist()):
            zo.apply_update(params, seeds[i], cfg.lr * pk * g)
    replayed, direct_p = params_of(model), params_of(direct)
    assert max(max_abs(replayed[n], direct_p[n]) for n in replayed) <= 1e-6
    assert max(max_abs(replayed[n], theta0[n]) for n in replayed) > 1e-4  # the update is not trivially small


def test_skipped_client_catches_up_bit_exactly(ktok, kfeats):
    algo, state, client, model = start(FedKSeedConfig(num_seeds=32, lr=1e-3), ktok)
    late = algo.make_client()  # a second edge client with its own model; syncs at v1, misses v2 and v3
    late_model = late.setup(fresh(ktok), algo.setup_payload(algo.initialize(fresh(ktok), seed=0)))
    late.sync(late_model, algo.sync_payload(state, -1))
    parts, ver = [kfeats[:20], kfeats[20:50]], 0
    for rnd in (1, 2, 3):
        state, _, _ = run_round(algo, state, client, model, rnd, parts, ktok, steps=2)
        client.sync(model, algo.sync_payload(state, ver))
        ver = state.version
        if rnd == 1:
            late.sync(late_model, algo.sync_payload(state, -1))
    payload = algo.sync_payload(state, 1)
    assert payload.meta["replay_versions"] == [2, 3]
    late.sync(late_model, payload)
    a, b = params_of(model), params_of(late_model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], p) for n, p in params_of(fresh(ktok)).items())


# --- server ----------------------------------------------------------------------------------------------


def upd(cid: str, n: int, idx: list[int], g: list[float]) -> ClientUpdate:
    return ClientUpdate(cid, n, {"seed_idx": torch.tensor(idx, dtype=torch.int32), "grad": torch.tensor(g)})


def test_aggregate_hand_computed_and_bytes():
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=8, lr=0.5))
    state = GlobalState(tensors={}, meta={"lora_seed": 0, "seed_set": 0})
    ups = [upd("a", 1, [3, 1, 3], [1.0, 2.0, 4.0]), upd("b", 3, [1, 6], [-2.0, 8.0])]  # p = .25, .75
    new, m = algo.aggregate(1, state, ups)
    assert new.version == 1 and list(state.tensors) == []  # pure: input untouched
    assert new.tensors[round_key(1, "seed_idx")].tolist() == [1, 3, 6]
    # H[1] = .25·2 − .75·2 = −1; H[3] = .25·(1 + 4) = 1.25; H[6] = .75·8 = 6; coeff = η·H
    assert torch.allclose(new.tensors[round_key(1, "coeff")], torch.tensor([-0.5, 0.625, 3.0]), atol=1e-7)
    assert m["fedkseed_bytes_up_per_client"] == (3 * 8 + 2 * 8) / 2
    assert m["fedkseed_bytes_down_per_client"] == 3 * 8 <= min(8, 5) * 8
    sync = algo.sync_payload(new, 0)
    assert sum(t.numel() * t.element_size() for t in sync.tensors.values()) == 3 * 8
    assert algo.sync_payload(new, 1).tensors == {}
    with pytest.raises(ValueError, match="outside"):
        algo.aggregate(2, new, [upd("c", 1, [8], [1.0])])


def test_round_one_download_is_one_seed_not_k_seeds(ktok):
    """The client derives the K candidate seeds from one seed in the setup payload: the round-1 instruction at
    K = 4096 is well under 18 KB (it was 33 KB with the K seeds as int64), and the seeds equal the server's."""
    from fedtune.algorithms.api import Instruction
    from fedtune.algorithms.fedkseed.shared import candidate_seeds
    from fedtune.transports.wire import sizes

    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=4096))
    state = algo.initialize(torch.nn.Linear(2, 2), seed=17)
    setup = algo.setup_payload(state)
    assert setup.tensors == {}
    train = algo.configure_round(1, state, ["c"], {"steps": 200, "batch_size": 8, "seed": 2**31 - 2}, ["c"])["c"]
    assert sizes.instruction_bytes(Instruction(1, "c", 0, train, algo.sync_payload(state, -1), setup)) < 1024
    client = algo.make_client()
    client.setup(fresh(ktok), setup)
    assert client.seeds == candidate_seeds(4096, 17).tolist()
    for bad in ({"num_seeds": 0}, {"num_seeds": 2**31}, {"num_seeds": 4.0}, {"seed_set": "17"}, {"seed_set": None}):
        with pytest.raises(ValueError, match="setup payload"):
            algo.make_client().setup(fresh(ktok), Payload(meta=dict(setup.meta, **bad)))


def test_pro_probabilities_hand_computed_and_shipped():
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=4, lr=0.1, seed_sampling="pro", uniform=True))
    state = algo.initialize(torch.nn.Linear(2, 2), seed=1)
    assert torch.allclose(algo.sync_payload(state, -1).tensors["seed_probs"], torch.full((4,), 0.25))
    new, m = algo.aggregate(1, state, [upd("a", 5, [0, 0], [2.0, -4.0]), upd("b", 1, [1], [3000.0])])
    # mean |clip(g, ±1000)|: seed0 = 3, seed1 = 1000, seeds 2, 3 unseen = 0 → minmax → softmax
    norm = torch.tensor([3 / 1000, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert torch.allclose(new.tensors["seed_probs"], torch.softmax(norm, 0).float(), atol=1e-7)
    assert torch.equal(algo.sync_payload(new, 1).tensors["seed_probs"], new.tensors["seed_probs"])
    assert m["fedkseed_bytes_down_per_client"] == 2 * 8 + 4 * 4
    assert torch.allclose(
        seed_probabilities(torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)),
        torch.full((3,), 1 / 3),
    )


def test_pro_sampling_client_follows_probabilities(ktok, kfeats):
    algo, state, client, model = start(FedKSeedConfig(num_seeds=4, lr=1e-3, seed_sampling="pro"), ktok)
    client.probs = torch.tensor([0.0, 0.0, 1.0, 0.0])
    cfg = algo.configure_round(1, state, ["a"], {"steps": 3, "batch_size": 2, "seed": 0}, ["a"])["a"]
    assert client.train(model, TrainContext("a", kfeats[:8], ktok.pad_token_id), cfg).tensors["seed_idx"].tolist() == [
        2,
        2,
        2,
    ]


def test_lora_mode_trains_only_adapter(ktok, kfeats):
    algo, state, client, model = start(FedKSeedConfig(num_seeds=16, trainable="lora", rank=2, alpha=4, lr=1e-2), ktok)
    names = [n for n, _ in zo.zo_parameters(model)]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    before = params_of(model)
    state, _, _ = run_round(algo, state, client, model, 1, [kfeats[:20]], ktok, steps=2)
    client.sync(model, algo.sync_payload(state, 0))
    changed = {n for n, p in params_of(model).items() if not torch.equal(before[n], p)}
    assert changed and all(".lora_" in n for n in changed) and any(".lora_B." in n for n in changed)
    factors = client.export_factors(model)
    assert factors and all(a.shape[0] == 2 and b.shape[1] == 2 for a, b in factors.values())


def test_config_validation_messages():
    with pytest.raises(ValueError, match="trainable"):
        FedKSeedConfig(trainable="half")
    with pytest.raises(ValueError, match="eps"):
        FedKSeedConfig(eps=0)
    with pytest.raises(ValueError, match="seed_sampling"):
        FedKSeedConfig(seed_sampling="greedy")
    with pytest.raises(ValueError, match="num_seeds"):
        FedKSeedConfig(num_seeds=0)
    assert FedKSeedConfig().lr == 1e-6 and FedKSeedConfig(trainable="lora").lr == 3e-3


def test_setup_rejects_float64(ktok):
    """bf16/fp16 bases train with float32 master weights (tests/test_hw_fedkseed.py); other dtypes are refused."""
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=4))
    state = algo.initialize(fresh(ktok), seed=0)
    with pytest.raises(ValueError, match="float32"):
        algo.make_client().setup(fresh(ktok).to(torch.float64), algo.setup_payload(state))


# --- memory ----------------------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import json, torch
    from fedtune.models.tiny import tiny_llama
    from fedtune.training import zo
    torch.set_num_threads(1)
    from fedtune.models.memory import extra_peak

    model = tiny_llama(512, hidden=256, layers=4, heads=4)
    params = zo.zo_parameters(model)
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def forward():
        with torch.no_grad():
            model(**batch).loss.item()

    def zo_step():
        g, _, _ = zo.spsa_step(model, params, batch, 5, 5e-4)
        zo.apply_update(params, 5, 1e-6 * g)

    def first_order():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    from fedtune.algorithms import get_algorithm
    from fedtune.algorithms.api import TrainContext
    from fedtune.algorithms.fedkseed import FedKSeedConfig
    algo = get_algorithm("fedkseed", FedKSeedConfig(num_seeds=8))
    client = algo.make_client()
    client.setup(model, algo.setup_payload(algo.initialize(model, seed=0)))
    ctx = TrainContext("c", [{"input_ids": r, "labels": r} for r in ids.tolist()], 0)
    cfg = {"steps": 1, "lr": 1e-6, "eps": 5e-4, "batch_size": 4, "seed": 0}

    def client_round():  # a ZO step and the exact restore (backup spilled to a temp file)
        client.train(model, ctx, cfg)

    forward(); zo_step(); first_order(); client_round()  # warm-up: lazy init, allocator pools
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"weights": weights, "forward": extra_peak(forward), "zo": extra_peak(zo_step),
                      "round": extra_peak(client_round), "first_order": extra_peak(first_order)}))
""")


def test_zo_step_peak_memory_close_to_inference():
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], check=False, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    inference = r["weights"] + r["forward"]
    ratio = (r["weights"] + r["zo"]) / inference
    assert ratio <= 1.15, r
    assert (r["weights"] + r["round"]) / inference <= 1.15, r  # a whole client round, restore included
    assert (r["weights"] + r["first_order"]) / inference > 1.3, r  # the probe does see extra memory
