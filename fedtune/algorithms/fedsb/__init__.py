"""Fed-SB: federated LoRA-SB with exact R averaging (Singhal, Ponkshe, Vartak, Varshney, Vepakomma, 2025,
"Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in (Private) Federated
LoRA Fine-Tuning"; the layer is LoRA-SB, Ponkshe et al., 2024).

Each target nn.Linear W (d_out×d_in) becomes

    W_eff = W + B·R·A,   A: r×d_in and B: d_out×r frozen and identical on all clients,  R: r×r trained

(LoRA scale 1, i.e. lora_alpha = r). Since A and B are shared, averaging R is exact:

    Σ_k p_k B R_k A = B (Σ_k p_k R_k) A,   p_k = n_k / Σ_j n_j   (uniform = True: p_k = 1/K)

so a client uploads only #modules × r² floats, vs r·(d_in + d_out) per module for LoRA; both are
reported as metrics (`fedsb_upload_bytes`, `fedsb_vs_lora_upload_ratio`). All R matrices travel (and live in
the global state) as ONE tensor "R" [n_modules, r, r], R[i] belonging to the i-th module in sorted name order,
which server and clients both derive from the A/B factors: one tensor header instead of one per module (60
per-module headers made the serialized upload 1.38× its payload; packed: 1.008×).

Init (computed once on the server in `FedSB.initialize`, broadcast in the setup payload). The engine
passes a few tokenized examples with `FedSB.set_init_data(features, pad_id)` before `initialize`; the
full-weight gradients of the target modules are summed over `init_batches` batches, G = −sign(Σ∇W)
("sign", the first-Adam-step direction the reference uses) or −Σ∇W ("grad"), and a seeded randomized
SVD (torch.svd_lowrank, niter = svd_niter, oversampled by 8 columns, so closer to the exact rank-r SVD
than the reference's q = r) gives B = U_r, A = V_rᵀ. Same seed + data → identical A, B. Without init data
A and B are seeded random orthonormal matrices (logged as a warning). The init touches data: under DP it
must use public/proxy data (as here: it is not privatised) or be counted in the privacy budget.

R0 = 0 (the reference instead sets R0 = diag(S_r)/scale without offsetting W, so its model at init is
W + B·R0·A). Choice: with R0 = 0 the model at init *is* the base model (round-0 evaluation is the base,
no data-dependent weight change happens before training), only the subspaces of G are used so no
η_eff / warmup hyperparameter is needed, and nothing is lost in direction: at R = 0 the gradient is
∂L/∂R = Bᵀ ∇W Aᵀ = U_rᵀ ∇W V_r, which for "grad" on the init data is −diag(S_r), so the first gradient
step gives ΔW = η U_r S_r V_rᵀ — the best rank-r approximation of the full first step, the property
LoRA-SB's init bakes in. Aggregation is exact either way.

Layer: `SBLinear` with `base_layer`, `sb_A`, `sb_R`, `sb_B` (all nn.Linear, so opacus handles R's
per-sample gradients); model fingerprints equal the unwrapped model's.
A, R and B are float32 on every base (bfloat16, nf4, int8: the state, uploads and exports are float32 CPU
tensors); on a base whose weight cannot take a float32 gradient the init's ∇W = Σ ∂L/∂y ⊗ x comes from hooks.
"""

from fedtune.algorithms.fedsb.client import FedSBClient
from fedtune.algorithms.fedsb.config import FedSBConfig
from fedtune.algorithms.fedsb.layer import SBLinear, attach_sb, get_R, sb_layers, set_R
from fedtune.algorithms.fedsb.server import FedSB
from fedtune.algorithms.registry import register

register(FedSB)

__all__ = ["FedSB", "FedSBClient", "FedSBConfig", "SBLinear", "attach_sb", "get_R", "sb_layers", "set_R"]
