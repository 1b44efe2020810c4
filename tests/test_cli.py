"""Bad input gets one clear line on stderr and exit code 2 — no traceback."""

import json

import pytest

from fedtune.cli import main


@pytest.fixture(autouse=True)
def _hermetic(tmp_path, monkeypatch):
    """Never the clone's runs/: a run without --out lands in this test's own directory."""
    monkeypatch.chdir(tmp_path)


def _run(capsys, *argv):
    code = main(["simulate", "--no-progress", *argv])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--config", "nope.toml"], "config file not found: nope.toml"),
        (["--algorithm", "nosuchmethod", "--model", "tiny"], "unknown algorithm 'nosuchmethod'; choose one of: "),
        (["--model", "tiny", "--clients", "5000"], "5000 clients but only"),
        (["--model", "/no/such/model"], "model '/no/such/model' not found"),
        (["--model", "tiny", "--rounds", "0"], "run.rounds must be ≥ 1, got 0"),
    ],
)
def test_bad_cli_input(capsys, tmp_path, argv, needle):
    code, err = _run(capsys, "--out", str(tmp_path / "o"), *argv)
    assert code == 2
    assert needle in err and "Traceback" not in err and err.startswith("error: ")


def _toml(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_rank_zero(capsys, tmp_path):
    code, err = _run(capsys, "--config", _toml(tmp_path, "[lora]\nrank = 0\n"), "--model", "tiny")
    assert code == 2 and "lora rank must be a positive integer, got 0" in err


def test_unknown_key_is_named(capsys, tmp_path):
    code, err = _run(capsys, "--config", _toml(tmp_path, "[train]\nlocal_stepz = 3\n"), "--model", "tiny")
    assert code == 2 and "[train] has unknown keys ['local_stepz']" in err


def test_missing_data_file(capsys, tmp_path):
    code, err = _run(capsys, "--model", "tiny", "--clients", "1", "--data", str(tmp_path / "x.jsonl"))
    assert code == 2 and "data file not found" in err


def test_malformed_jsonl_line(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{oops\n")
    code, err = _run(capsys, "--model", "tiny", "--clients", "1", "--data", str(f))
    assert code == 2 and f"{f}:2: not valid JSON" in err


def test_jsonl_wrong_fields(capsys, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "a"}) + "\n")
    code, err = _run(capsys, "--model", "tiny", "--clients", "1", "--data", str(f))
    assert code == 2 and f"{f}:1: unknown schema (keys ['question']); accepted: " in err


def test_empty_client_file(capsys, tmp_path):
    good, empty = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    good.write_text(json.dumps({"text": "hello there"}) + "\n")
    empty.write_text("")
    code, err = _run(capsys, "--model", "tiny", "--clients", "2", "--data", str(good), str(empty))
    assert code == 2 and "no examples (the file is empty)" in err


@pytest.mark.parametrize("command", ["simulate", "server", "client", "eval", "generate", "chat", "export-base", "certs"])
def test_every_command_prints_its_help(capsys, command):
    """--help of every command (argparse %-formats help texts: a bare % in one, e.g. the hardware settings', crashed
    it)."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: fedtune" in capsys.readouterr().out


def test_a_process_that_attaches_lora_logs_no_dependency_notices():
    """peft's deprecated-alias FutureWarning and bitsandbytes' "pip install kernels" notice (on AVX512-BF16 CPUs) are
    dropped by `import fedtune`, even with FutureWarnings made errors; anything else a dependency says still shows."""
    import subprocess
    import sys

    code = ("import fedtune, warnings\n"
            "from fedtune.models.tiny import tiny_llama\n"
            "from fedtune.algorithms.common.lora import attach_lora\n"
            "attach_lora(tiny_llama(64), adapter='a', rank=2, alpha=4, targets=['q_proj'])\n"
            "warnings.warn('still shown', FutureWarning)\n")
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("FutureWarning: still shown"), proc.stderr
    assert "is_gradient_checkpointing" not in proc.stderr and "kernels-community" not in proc.stderr, proc.stderr


def test_overwrite_checks_the_data_before_deleting_anything(capsys, tmp_path):
    out = tmp_path / "o"
    # no --no-progress: stderr is not a terminal here, so no bars, only the plain per-round lines
    assert main(["simulate", "--model", "tiny", "--rounds", "1", "--clients", "2", "--local-steps", "1",
                 "--out", str(out)]) == 0
    std = capsys.readouterr()
    assert "\r" not in std.err and "rounds:" not in std.err and "it/s" not in std.err
    assert "round   1 | clients 2/2" in std.out, std.out
    before = sorted(p.name for p in out.iterdir())
    assert "summary.json" in before
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = _run(capsys, "--model", "tiny", "--out", str(out), "--overwrite", "--data", str(empty))
    assert code == 2 and "empty.jsonl" in err
    assert sorted(p.name for p in out.iterdir()) == before  # the old run is still there


def test_one_client_warns_that_nothing_is_federated(capsys, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="fedtune"):
        code, err = _run(capsys, "--model", "tiny", "--clients", "1", "--overwrite", "--resume", "--out", str(tmp_path / "o"))
    assert code == 2 and "use one of them" in err  # stops before any training, after the warning
    assert "federation.num_clients = 1: nothing is federated" in caplog.text


def test_version_and_verbosity_flags_anywhere(capsys):
    from fedtune import __version__
    from fedtune.cli import build_parser

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fedtune {__version__}"
    p = build_parser()
    for argv, want in ((["-v", "eval", "--base"], (True, False)), (["eval", "--base", "-v"], (True, False)),
                       (["server", "--config", "x", "--quiet"], (False, True)), (["eval", "--base"], (False, False))):
        args = p.parse_args(argv)
        assert (getattr(args, "verbose", False), getattr(args, "quiet", False)) == want, argv
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "-v", "-q"])
