"""FedKSeed — federated zeroth-order full-parameter tuning with a finite seed set (Qin et al., 2024,
"Federated Full-Parameter Tuning of Billion-Sized Language Models with Communication Cost under 18 Kilobytes").

K candidate seeds {s_1 … s_K} are drawn once from the run seed, by the server and by every client (only
that one seed travels, in the setup payload). z(s) ~ N(0, I) over all trainable weights is
regenerated from s on demand (fedtune.training.zo: CPU generator, sorted parameter order). Client k does
τ local SPSA steps from the global θ, each on a batch with a seed s_kt from the set:

    g_kt = (L(θ + ε z(s_kt)) − L(θ − ε z(s_kt))) / 2ε,   clamped to ±grad_clip
    θ ← θ − η · g_kt · z(s_kt)

and uploads only (s_kt index int32, g_kt float32) for t = 1..τ: τ·8 bytes. The server accumulates per seed

    H[s] = Σ_k p_k Σ_{t: s_kt = s} g_kt          (float64, p_k = n_k / Σ_j n_j or 1/K)

and keeps every round's pairs (s, η·H[s]). Every client replays θ ← θ − Σ_s η·H[s]·z(s), round by round in
order, so all copies of θ stay bit-identical and no weights ever travel; a client that missed rounds
replays the pairs it lacks. Replay is linear in g, so it equals applying each client's steps weighted by p_k
(with weight decay 0). The client's local steps move its own θ between steps; only (s, g) leaves it, and
its model is restored bit-exactly afterwards from a backup spilled to a temporary file (zo.ParamBackup: no
second copy of θ in memory; undoing the steps is not exact in fp32).

The step's loss is the mean over the batch's examples of each example's mean token loss, so the same two
forwards give every per-example g_i; sample-level DP ([privacy] mode = "sample") clips each g_i to [−C, C] and
releases (Σ_i clip(g_i) + N(0, σ²C²)) / E per step (see client.py; accounting as for DP-SGD).

Choices (see FedKSeedConfig):
- η: the paper's 3e-7 is for billion-scale full tuning; stable ZO step sizes shrink roughly like 1/d, so the
  default is 1e-6 for full tuning of ~135M models (SmolLM2), 3e-3 for "lora" (lr sweep, simulations/results/REPORT.md). The tiny 0.1M-parameter test
  model tolerates ~1e-3. The round's generic `lr` is overridden with this η.
- grad_clip = 100: a clamp on g against loss spikes and blow-ups only (|g| ≈ 1 on the tiny model, ~‖∇L‖ in
  general); 0 disables. Non-finite g (a diverged forward) is recorded as 0 and counted.
- trainable = "lora": ZO over a peft LoRA's A/B only (A seeded from the run seed, B = 0). With B = 0 the loss
  does not depend on A at first, so the A-part of z only adds variance until B moves; z on B carries all the
  early signal. MeZO used a larger ε (1e-2) for LoRA; tune ε if g is dominated by fp32 loss rounding.
- seed_sampling = "pro": p(s) = softmax(minmax(mean |clip(g, ±1000)| over every step that used s)); the server
  computes it from the uploaded g and ships it (float32 [K]) in the sync payload.
- Download per client-round: the round's pairs, ≤ min(K, Σ τ)·8 bytes (+ K·4 with "pro").
- Replay cost: one z regeneration per (round, seed) pair, i.e. O(pairs × #params) per sync.

Holdings (each client's own [model] device / dtype / quantization; fedtune.training.zo docstring):
- full on a bfloat16/float16 base: memory = float32 θ, compute = the base's dtype. At setup the client
  upcasts the weights to float32 master weights (twice a bf16 base's memory) and runs the SPSA forwards under
  torch.autocast to the base's dtype; in bf16 itself θ + εz − εz ≠ θ and an update η·g·z ≈ 1e-6·z vanishes.
- full on a 4-bit/8-bit base: refused (config.hardware_problem, also raised by the client's setup): the
  weights are frozen quantized codes. Use a bf16 base, trainable = "lora", or a first-order method.
- lora on any base: the factors are float32 (lora_common); peft casts at the adapter's boundary, so the
  forwards need no autocast (the same forward as the first-order methods' on that base).
- Replay is the same bits on the CPU and on CUDA: z is drawn on the CPU, scale·z is rounded there (float32)
  and then added on the parameter's device (one IEEE add, no fused multiply-add).
"""

from fedtune.algorithms.fedkseed.client import FedKSeedClient
from fedtune.algorithms.fedkseed.config import FedKSeedConfig
from fedtune.algorithms.fedkseed.server import FedKSeed
from fedtune.algorithms.registry import register

register(FedKSeed)

__all__ = ["FedKSeed", "FedKSeedClient", "FedKSeedConfig"]
