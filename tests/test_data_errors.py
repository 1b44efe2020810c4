"""Bad data gets one clear line and exit code 2, before anything is written to the run dir."""

import json

import pytest

from fedtune.cli import main
from fedtune.data.loaders import ACCEPTED

GOOD = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(12)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(tmp_path, capsys, data, config=""):
    cfg = tmp_path / "run.toml"
    cfg.write_text(config, encoding="utf-8")
    out = tmp_path / "run"
    code = main(["simulate", "--config", str(cfg), "--model", "tiny", "--rounds", "1", "--local-steps", "1",
                 "--clients", str(len(data)), "--no-progress", "--out", str(out), "--data", *map(str, data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert not out.exists(), "nothing may be written to the run dir before a data error"
    return code, err[-1] if err else ""


def test_non_utf8_names_file_line_and_fix(tmp_path, capsys):
    bad = tmp_path / "latin.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    assert _run(tmp_path, capsys, [bad]) == (
        2, (f"error: {bad}:2: not UTF-8 (byte 0xe9); re-save the file as UTF-8, e.g. "
           f"iconv -f latin1 -t utf-8 {bad} > fixed.jsonl"))


def test_directory_without_data_files(tmp_path, capsys):
    d = tmp_path / "empty_dir"
    d.mkdir()
    assert _run(tmp_path, capsys, [d]) == (
        2, (f"error: {d} is a directory with no data files (.jsonl, .json, .csv, .parquet) and not a datasets "
           "save_to_disk directory; give a file, or put data files in it"))


def test_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert _run(tmp_path, capsys, [_jsonl(tmp_path / "a.jsonl", GOOD), empty]) == (
        2, f"error: {empty}: no examples (the file is empty); add data or remove it from [data] paths")


def test_unknown_schema_lists_the_accepted_ones(tmp_path, capsys):
    bad = _jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    assert _run(tmp_path, capsys, [bad]) == (
        2, f"error: {bad}:1: unknown schema (keys ['answer', 'question']); accepted: {ACCEPTED}")


def test_mixed_schemas_in_one_file(tmp_path, capsys):
    bad = _jsonl(tmp_path / "mixed.jsonl", [GOOD[0], {"text": "plain"}])
    assert _run(tmp_path, capsys, [bad]) == (
        2, (f"error: {bad}:2: row has schema text but the file's first row has prompt_response; "
           "use one schema per file"))


def test_invalid_json_line(tmp_path, capsys):
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps(GOOD[0]) + "\n{not json\n")
    assert _run(tmp_path, capsys, [bad]) == (
        2, (f"error: {bad}:2: not valid JSON (Expecting property name enclosed in double quotes); "
           "each line must be one JSON object"))


def test_missing_file_and_unknown_format(tmp_path, capsys):
    assert _run(tmp_path, capsys, [tmp_path / "nope.jsonl"]) == (
        2, f"error: data file not found: {tmp_path / 'nope.jsonl'} (check the path in [data] paths or --data)")
    txt = tmp_path / "data.txt"
    txt.write_text("hello")
    assert _run(tmp_path, capsys, [txt]) == (
        2, (f"error: {txt}: unknown format '.txt'; use .jsonl, .json, .csv, .parquet or a datasets save_to_disk "
           "directory"))


def test_category_filter_matching_nothing(tmp_path, capsys):
    f = _jsonl(tmp_path / "cats.jsonl", [dict(r, category="math" if i % 2 else "chat") for i, r in enumerate(GOOD)])
    assert _run(tmp_path, capsys, [f], '[data]\ncategories = ["maths"]\npartition = "iid"\n') == (
        2, f"error: [data] categories ['maths'] match no example in {f}; categories present: chat, math")


def test_max_seq_len_above_model_context(tmp_path, capsys):
    f = _jsonl(tmp_path / "a.jsonl", GOOD)
    assert _run(tmp_path, capsys, [f], '[data]\nmax_seq_len = 4096\npartition = "iid"\n') == (
        2, ("error: [data] max_seq_len = 4096 exceeds the model's context length (512 tokens); "
           "set max_seq_len ≤ 512 (or 0 for auto)"))


def test_too_many_dropped_names_the_file_and_the_fix(tmp_path, capsys):
    conv = {"messages": [{"role": "system", "content": "a long system prompt " * 20},
                         {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    f = _jsonl(tmp_path / "sys.jsonl", [conv] * 12)
    code, msg = _run(tmp_path, capsys, [f], '[data]\nmax_seq_len = 32\npartition = "iid"\ntest_fraction = 0\n')
    assert (code, msg) == (2, (f"error: {f}: 12 of 12 examples of client-0 cannot be kept at max_seq_len = 32 (12× "
                              "the chat template and system turns alone take 222 tokens ≥ max_seq_len); raise [data] "
                              "max_seq_len (or [data] max_drop_fraction, now 0.01)"))


def test_eval_fraction_zero_finishes_with_exit_code_0(tmp_path, capsys):
    f = _jsonl(tmp_path / "a.jsonl", GOOD)
    cfg = tmp_path / "run.toml"
    cfg.write_text('[data]\neval_fraction = 0\npartition = "iid"\nmax_seq_len = 32\n[train]\nbatch_size = 2\n')
    out = tmp_path / "run"
    code = main(["simulate", "--config", str(cfg), "--model", "tiny", "--rounds", "1", "--local-steps", "1",
                 "--clients", "1", "--no-progress", "--out", str(out), "--data", str(f)])
    stdout = capsys.readouterr().out
    assert code == 0 and "eval loss - → - (eval skipped: no eval examples" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_final"] is None and summary["eval_skipped"]
    assert summary["data"]["clients"]["client-0"]["eval_examples"] == 0


@pytest.mark.parametrize("content", [b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode() + b"\n"])
def test_utf8_bom_is_fine(tmp_path, content):
    from fedtune.data.loaders import load_path

    p = tmp_path / "bom.jsonl"
    p.write_bytes(content)
    assert load_path(p)[0].prompt == "question 0"


def test_data_paths_without_a_jsonl_source_is_refused_not_ignored():
    """[data] paths with the default source trained on the bundled corpus and never read the files (issue 27)."""
    from fedtune import config

    with pytest.raises(config.ConfigError, match=r"data.paths lists 1 file\(s\), but data.source is 'chatterbot'.*"
                                                 r'add source = "jsonl"'):
        config.load(None, {"data.paths": ["mine.jsonl"]})


def test_a_section_of_another_method_is_an_error_naming_the_runs_method():
    from fedtune import config

    with pytest.raises(config.ConfigError, match=r"\[fedavg\] would be ignored: this run's method is flora"):
        config.load(None, {"run.algorithm": "flora", "fedavg.uniform": True})
    # a sweep file shared by several methods says so
    assert config.load(None, {"run.algorithm": "flora", "fedavg.uniform": True}, other_methods=True).run.algorithm == "flora"
