"""Look at a tuned model: held-out loss/perplexity (`fedtune eval`) and its answers (`fedtune generate`, `chat`).

A model is the base alone, the base + an exported peft adapter (runs/NAME/adapter) or a merged model directory
(FedKSeed "full": runs/NAME/merged). By default the run's own config (model, data, split seed) is read from the
run dir's summary.json, so `eval` rebuilds exactly the run's global test set and each client's held-out slice.
Loss = mean token cross-entropy over response tokens (as in training); perplexity = exp(loss).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedtune import config as config_mod
from fedtune.config import ConfigError, RunConfig
from fedtune.models import ModelError, load_model
from fedtune.models.hardware import model_device
from fedtune.models.loading import holding_args
from fedtune.training.evaluate import evaluate

_SECTIONS = ("run", "model", "data", "federation", "train")


def config_from_summary(summary: dict[str, Any]) -> RunConfig:
    """The RunConfig a run was made with (summary.json "config" is RunConfig.to_dict())."""
    c = summary.get("config")
    if not isinstance(c, dict):
        raise ConfigError("summary.json has no \"config\": is this a fedtune run directory?")
    raw = {k: c[k] for k in _SECTIONS if isinstance(c.get(k), dict)}
    if c.get("lora"):
        raw["lora"] = c["lora"]
    raw |= {k: v for k, v in (c.get("algorithms") or {}).items()}
    raw |= {k: v for k, v in (c.get("extra") or {}).items()}
    return config_mod.from_dict(raw)


def read_run(run_dir: Path) -> tuple[RunConfig, dict[str, Any]] | None:
    """(config, summary) of a finished run dir, or None when it has no summary.json."""
    p = run_dir / "summary.json"
    if not p.is_file():
        return None
    try:
        summary = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e.msg})") from None
    return config_from_summary(summary), summary


@dataclass
class Loaded:
    model: Any  # a causal LM (a PeftModel when an adapter is attached)
    tokenizer: Any
    kind: str  # "base" | "adapter" | "merged"
    path: str | None


def load_tuned(model_name: str, *, adapter: str | None = None, merged: str | None = None, seed: int = 0,
               holding: Any = None) -> Loaded:
    """The base model `model_name`, with `adapter` attached (peft), or the merged model directory `merged`;
    held as the [model] section `holding` says (its device, dtype, quantization; None: float32 on the CPU)."""
    hw = holding_args(holding) if holding is not None else {}
    if merged:
        p = Path(merged)
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a merged model directory (no config.json); runs write it to <out>/merged")
        model, tok = load_model(str(p), seed=seed, **hw)
        return Loaded(model, tok, "merged", str(p))
    model, tok = load_model(model_name, seed=seed, **hw)
    if not adapter:
        return Loaded(model, tok, "base", None)
    p = Path(adapter)
    if not (p / "adapter_config.json").is_file():
        raise ModelError(f"{p} is not a peft adapter directory (no adapter_config.json); runs write it to <out>/adapter")
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(p))
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{p}: the adapter does not fit the base model {model_name!r} ({str(e).splitlines()[0]})") from None
    return Loaded(model.eval(), tok, "adapter", str(p))


def loss_row(model, features: list[dict], pad_id: int, batch_size: int) -> dict[str, Any]:
    if not features:
        return {"examples": 0, "loss": None, "perplexity": None}
    loss = evaluate(model, features, pad_id=pad_id, batch_size=batch_size)
    return {"examples": len(features), "loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def evaluate_sets(model, tok, cfg: RunConfig, *, data_files: list[str] | None = None, roster: list[str] | None = None,
                  batch_size: int = 16, generate_max: int | None = None, max_new_tokens: int = 64
                  ) -> dict[str, dict[str, Any]]:
    """{set name: {examples, loss, perplexity}}: with `data_files`, one row per file and "all"; else the run's
    global test set ("test"), the union of the clients' held-out slices ("eval") and each client's slice.
    With `generate_max` (0: every example), each row adds Rouge-L and exact match of greedy generations on its
    first `generate_max` examples (fedtune.training.genmetrics)."""
    from fedtune.data import ChatFormatter
    from fedtune.data.loaders import load_path
    from fedtune.data.prepare import context_length, prepare_data

    pad = tok.pad_token_id
    if data_files:
        fmt = ChatFormatter(tok, cfg.data.max_seq_len or 128)
        sets = {f: fmt.many(load_path(f)) for f in data_files}
        if len(sets) > 1:
            sets["all"] = [x for v in list(sets.values()) for x in v]
    else:
        ids = roster if roster and len(roster) == cfg.federation.num_clients else None
        prep = prepare_data(cfg, tok, ids, context_len=context_length(model))
        sets = {"test": prep.test, "eval": prep.global_eval} | {cid: c.eval for cid, c in prep.clients.items()}
    rows = {name: loss_row(model, feats, pad, batch_size) for name, feats in sets.items()}
    if generate_max is not None:
        from fedtune.training.genmetrics import generation_metrics

        for name, feats in sets.items():
            if name not in ("eval", "all"):  # unions of the other rows: generated once, in their own rows
                rows[name] |= generation_metrics(model, tok, feats, max_examples=generate_max,
                                                 max_new_tokens=max_new_tokens)
    return rows


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    w = max(12, *(len(n) for n in rows))
    gen = any("rouge_l" in r for r in rows.values())
    lines = [f"{'set':<{w}}  {'examples':>8}  {'loss':>8}  {'perplexity':>10}"
             + (f"  {'generated':>9}  {'rouge_l':>7}  {'exact':>6}" if gen else "")]

    def num(v, spec: str, width: int) -> str:
        return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"

    for name, r in rows.items():
        line = f"{name:<{w}}  {r['examples']:>8}  {num(r['loss'], '.4f', 8)}  {num(r['perplexity'], '.2f', 10)}"
        if gen:
            line += (f"  {num(r.get('generated'), 'd', 9)}  {num(r.get('rouge_l'), '.4f', 7)}"
                     f"  {num(r.get('exact_match'), '.3f', 6)}")
        lines.append(line)
    return "\n".join(lines)


# -- generation ------------------------------------------------------------------------------------------------
@dataclass
class GenConfig:
    max_new_tokens: int = 64
    sample: bool = False  # greedy unless asked
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0


def render_chat(tok, messages: list[dict[str, str]]) -> str:
    """The prompt for the next assistant turn, rendered exactly as in training (ChatFormatter: the model's chat
    template, or "User: …\\nAssistant: " for tokenizers without one)."""
    from fedtune.data import ChatFormatter

    return ChatFormatter(tok)._render([(m["role"], m["content"]) for m in messages], gen=True)


@torch.no_grad()
def generate(model, tok, messages: list[dict[str, str]], gc: GenConfig) -> str:
    """The model's answer to `messages` (greedy, or seeded nucleus sampling)."""
    enc = tok(render_chat(tok, messages), return_tensors="pt", add_special_tokens=False).to(model_device(model))
    kwargs: dict[str, Any] = {"max_new_tokens": gc.max_new_tokens, "do_sample": gc.sample, "use_cache": True,
                              "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if gc.sample:
        torch.manual_seed(gc.seed)
        kwargs |= {"temperature": gc.temperature, "top_p": gc.top_p}
    else:  # greedy: no sampling knobs (transformers warns when they are set with do_sample=False)
        kwargs |= {"temperature": None, "top_p": None, "top_k": None}
    model.eval()
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def generate_base(loaded: Loaded, base: Loaded | None, messages: list[dict[str, str]], gc: GenConfig) -> str:
    """The base model's answer: the adapter switched off, or a separately loaded base (merged models)."""
    if loaded.kind == "adapter":
        with loaded.model.disable_adapter():
            return generate(loaded.model, loaded.tokenizer, messages, gc)
    m = base if base is not None else loaded
    return generate(m.model, m.tokenizer, messages, gc)
