"""`fedtune export-base` + the peft snippet of docs/evaluate.md, run literally in a process that never imports
fedtune."""

import json
import re
import subprocess
import sys
from pathlib import Path

from fedtune import config
from fedtune.cli import main
from fedtune.run.assemble import simulate

PAGE = Path(__file__).resolve().parents[1] / "docs/evaluate.md"


def _readme_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.DOTALL)
    found = [b for b in blocks if "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(" in b]
    assert len(found) == 1, "docs/evaluate.md must show exactly one PeftModel.from_pretrained snippet"
    return "\n".join(line.strip() for line in found[0].splitlines())  # the block is indented in a list item


CHECK = """
import sys
import torch
from peft import AutoPeftModelForCausalLM
assert not any(m == "fedtune" or m.startswith("fedtune.") for m in sys.modules), "the snippet imported fedtune"
ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
merged = AutoModelForCausalLM.from_pretrained("runs/t1/merged")
auto = AutoPeftModelForCausalLM.from_pretrained("runs/t1/adapter")  # the base named in adapter_config.json
base = AutoModelForCausalLM.from_pretrained("runs/t1-base")
with torch.no_grad():
    want, got, got_auto = merged(ids).logits, model(ids).logits, auto(ids).logits
    print(float((got - want).abs().max()), float((got_auto - want).abs().max()), float((base(ids).logits - want).abs().max()))
"""


def test_export_base_and_readme_peft_snippet_on_tiny(tmp_path, capsys):
    cfg = config.load(None, {"model.name": "tiny", "run.seed": 3, "run.rounds": 1, "federation.num_clients": 2,
                             "train.local_steps": 2, "train.lr": 0.02, "data.max_train_per_client": 8,
                             "data.max_seq_len": 32, "data.max_eval_per_client": 4,
                             "run.out": str(tmp_path / "runs/t1")})
    summary = simulate(cfg, progress=False, save_merged=True)
    # FLoRA, 2 clients × r 16: ΔW of q (64×64) has rank 32 as factors, v (32×64) is dense at rank 32; exact
    info = summary["adapter_export"]
    assert (info["rank"], info["ranks"], info["export_rank"]) == (32, [32], None) and info["relative_error"] < 1e-12
    adapter = tmp_path / "runs/t1/adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    assert main(["export-base", str(tmp_path / "runs/t1-base"), "--adapter", str(adapter), "--seed", "4"]) == 2
    assert "not the base the adapter was trained on" in capsys.readouterr().err
    assert main(["export-base", str(tmp_path / "runs/t1-base"), "--adapter", str(adapter)]) == 0  # seed 3 from the adapter
    base_dir = tmp_path / "runs/t1-base"
    assert {"config.json", "model.safetensors", "tokenizer.json", "fedtune-base.json"} <= {p.name for p in base_dir.iterdir()}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir.resolve())
    proc = subprocess.run([sys.executable, "-c", _readme_snippet() + CHECK], check=False, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, got_auto, base_gap = map(float, proc.stdout.split())
    assert got <= 1e-5 and got_auto <= 1e-5 and base_gap > 1e-4
    # nothing silent: an earlier export, or an adapter already pointed elsewhere, is replaced only with --force
    capsys.readouterr()
    assert main(["export-base", str(base_dir), "--adapter", str(adapter)]) == 2
    assert f"{base_dir} already holds an exported base model: pass --force" in capsys.readouterr().err
    other = tmp_path / "runs/t1-base2"
    assert main(["export-base", str(other), "--adapter", str(adapter)]) == 2
    assert f"already names {base_dir.resolve()} as its base: pass --force" in capsys.readouterr().err
    assert not other.exists()  # refused before anything was written
    assert main(["export-base", str(other), "--adapter", str(adapter), "--force"]) == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(other.resolve())
