"""A run directory belongs to one run: run.json, refusal of a used dir, --overwrite, resume checks, the lock,
stale temp dirs, and file modes of everything a run writes."""

import json
import os
import shutil
import stat

import pytest
import torch

from fedtune import config
from fedtune.cli import main
from fedtune.fileio import save_safetensors
from fedtune.run.assemble import in_process, prepare_run, simulate
from fedtune.run.rundir import RunDir, RunDirError

FAST = {"model.name": "tiny", "federation.num_clients": 2, "train.local_steps": 1, "train.batch_size": 4,
        "data.max_train_per_client": 8, "data.max_seq_len": 32, "data.max_eval_per_client": 4}


def _cfg(out, **kw):
    return config.load(None, {**FAST, "run.out": str(out), **kw})


def _rounds(out):
    return [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _cli(out, *extra):
    toml = out.parent / "fast.toml"
    toml.write_text("[data]\nmax_train_per_client = 8\nmax_seq_len = 32\nmax_eval_per_client = 4\n")
    return main(["simulate", "--config", str(toml), "--model", "tiny", "--clients", "2", "--rounds", "1",
                 "--local-steps", "1", "--out", str(out), "--no-progress", *extra])


def test_fresh_run_into_used_dir_refuses_and_overwrite_clears(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # not a run output: never deleted
    assert _cli(out) == 0
    first = json.loads((out / "run.json").read_text())
    assert set(first) >= {"run_id", "config_hash", "base_model_fingerprint", "created", "config"}
    capsys.readouterr()
    assert _cli(out) == 2
    err = capsys.readouterr().err
    assert f"already holds run {first['run_id'][:8]}" in err
    assert all(flag in err for flag in ("--resume", "--out", "--overwrite")) and "Traceback" not in err
    assert json.loads((out / "run.json").read_text())["run_id"] == first["run_id"]  # nothing touched
    assert _cli(out, "--resume", "--overwrite") == 2
    assert _cli(out, "--overwrite") == 0
    second = json.loads((out / "run.json").read_text())
    assert second["run_id"] != first["run_id"] and second["config_hash"] == first["config_hash"]
    assert _rounds(out) == [0, 1] and (out / "notes.txt").read_text() == "mine"


def test_failed_start_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["simulate", "--model", "tiny", "--clients", "5000", "--out", str(out), "--no-progress"]) == 2
    assert "5000 clients" in capsys.readouterr().err and not out.exists()


def test_resume_refuses_other_config_names_the_key(tmp_path):
    out = tmp_path / "run"
    simulate(_cfg(out, **{"run.rounds": 1, "train.lr": 0.001}), progress=False)
    with pytest.raises(RunDirError, match=r"train\.lr: 0\.001 → 0\.5"):
        simulate(_cfg(out, **{"run.rounds": 2, "train.lr": 0.5}), resume=True, progress=False)
    with pytest.raises(RunDirError, match="base model differs"):  # tiny's weights depend on the seed
        simulate(_cfg(out, **{"run.rounds": 2, "run.seed": 1, "train.lr": 0.001}), resume=True, progress=False)
    assert _rounds(out) == [0, 1]  # refused before anything was written


def test_foreign_checkpoint_and_stale_temp_dirs_are_never_resumed(tmp_path):
    """The bug from issue 14: an older run's round-0003 beside this run's round-0002 was picked by --resume
    (metrics said 0–2, summary said 3 rounds). Now only this run's checkpoints count."""
    old, new = tmp_path / "old", tmp_path / "new"
    simulate(_cfg(old, **{"run.rounds": 3, "train.lr": 0.01}), progress=False)
    simulate(_cfg(new, **{"run.rounds": 2}), progress=False)
    shutil.copytree(old / "checkpoints/round-0003", new / "checkpoints/round-0003")
    stale = [new / "checkpoints/.tmp-round-0003-999999", new / "checkpoints" / f".tmp-round-0003-{os.getpid()}"]
    for d in stale:
        d.mkdir()
        (d / "global.safetensors").write_bytes(b"half")
    summary = simulate(_cfg(new, **{"run.rounds": 3}), resume=True, progress=False)
    assert _rounds(new) == [0, 1, 2, 3]  # round 3 really ran from this run's round 2
    assert summary["rounds_completed"] == 3
    assert json.loads((new / "summary.json").read_text())["eval_loss_final"] == summary["eval_loss_final"]
    run_id = json.loads((new / "run.json").read_text())["run_id"]
    state = json.loads((new / "checkpoints/round-0003/state.json").read_text())
    assert state["engine"]["run_id"] == run_id != json.loads((old / "run.json").read_text())["run_id"]
    assert not any(d.exists() for d in stale)


def test_resume_cuts_metrics_and_summary_to_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    simulate(_cfg(out, **{"run.rounds": 2}), progress=False)
    shutil.rmtree(out / "checkpoints/round-0002")  # as if killed between round 1's and round 2's checkpoint
    (out / "summary.json").write_text('{"rounds_completed": 2}')
    lock = RunDir(out).lock()  # a live writer holds the dir
    with pytest.raises(RunDirError, match=r"in use by another fedtune process \(pid \d+\)"):
        simulate(_cfg(out, **{"run.rounds": 2}), resume=True, progress=False)
    lock.release()
    run = prepare_run(_cfg(out, **{"run.rounds": 2}), transport=in_process, resume=True)
    try:
        assert run.start_round == 2 and _rounds(out) == [0, 1] and not (out / "summary.json").exists()
    finally:
        run.close()


@pytest.mark.parametrize("algorithm", ["fedavg", "flora", "fedsb", "fedkseed"])
def test_resume_checks_the_checkpoints_state_format_and_layout(tmp_path, algorithm):
    """A checkpoint stamps its method's state format; resume refuses another format, an unstamped one for a
    method whose format changed (Fed-SB, FedKSeed), and a state whose tensors do not fit: with exit 2 before
    anything runs, never a KeyError mid-round."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    kw = {"run.algorithm": algorithm, "run.rounds": 1}
    simulate(_cfg(out, **kw), progress=False)
    ck = out / "checkpoints/round-0001"
    meta, tensors = json.loads((ck / "state.json").read_text()), load_file(ck / "global.safetensors")
    fmt = {"fedavg": 1, "flora": 1, "fedsb": 2, "fedkseed": 2}[algorithm]
    assert meta["engine"]["state_format"] == fmt

    def write(engine_format, t):
        m = json.loads(json.dumps(meta))
        if engine_format is None:
            del m["engine"]["state_format"]
        else:
            m["engine"]["state_format"] = engine_format
        (ck / "state.json").write_text(json.dumps(m))
        save_safetensors(t, ck / "global.safetensors")

    def resume():
        run = prepare_run(_cfg(out, **{**kw, "run.rounds": 2}), transport=in_process, resume=True)
        run.close()
        return run.start_round

    write(fmt + 1, tensors)
    with pytest.raises(RunDirError, match=f"its {algorithm} state has format {fmt + 1}, this fedtune reads format {fmt}"):
        resume()
    write(None, tensors)  # written before checkpoints were stamped: fine where the format never changed
    if fmt == 1:
        assert resume() == 2
    else:
        with pytest.raises(RunDirError, match="a format from before fedtune stamped checkpoints"):
            resume()
    if algorithm == "fedsb":  # the old layout (one R per module) under the current stamp: named, not a KeyError
        old = {k: v for k, v in tensors.items() if k != "R"}
        modules = sorted({k.rsplit(".", 1)[0] for k in old})
        old.update({f"{m}.R": tensors["R"][i].clone() for i, m in enumerate(modules)})
        write(fmt, old)
        with pytest.raises(RunDirError, match=r"'R' should be \(4, 8, 8\) torch.float32, found no such tensor"):
            resume()
    if algorithm == "fedavg":
        name = min(tensors)
        write(fmt, {**tensors, name: tensors[name].double()})
        with pytest.raises(RunDirError, match=f"'{name}' should be .* torch.float32, found .* torch.float64"):
            resume()
    write(fmt, tensors)
    assert resume() == 2 and _rounds(out) == [0, 1]


def test_every_written_file_is_world_readable(tmp_path):
    """safetensors writes 0600; every fedtune output ends up 0666 & ~umask (0644 under umask 022)."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        simulate(_cfg(out, **{"run.rounds": 1}), progress=False, save_merged=True)
        modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
        assert any(k.endswith(".safetensors") for k in modes) and "merged/model.safetensors" in modes
        for path, mode in modes.items():
            assert mode == (0o755 if (out / path).is_dir() else 0o644), (path, oct(mode))
        os.umask(0o027)
        save_safetensors({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
        assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_a_run_written_before_the_client_claim_bounds_resumes(tmp_path):
    """[federation] max_norm_ratio / max_client_weight bound what clients may send in the rounds to come: a run whose
    run.json predates them (no such keys in its identity) still resumes, and changing them is allowed."""
    import json

    from fedtune import config
    from fedtune.run.assemble import simulate

    over = {"model.name": "tiny", "federation.num_clients": 3, "run.rounds": 1, "run.algorithm": "fedavg",
            "data.max_train_per_client": 16, "data.max_seq_len": 32, "run.out": str(tmp_path / "r")}
    simulate(config.load(None, over), progress=False)
    rec = json.loads((tmp_path / "r" / "run.json").read_text())
    assert "max_client_weight" not in rec["config"]["federation"] and "max_norm_ratio" not in rec["config"]["federation"]
    summary = simulate(config.load(None, {**over, "run.rounds": 2, "federation.max_client_weight": 0.4}), resume=True,
                       progress=False)
    assert summary["rounds_completed"] == 2
