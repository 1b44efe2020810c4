"""Truncation that keeps the response, the label mask of every schema, and loading every format."""

import json

import pytest

from fedtune.data import ChatFormatter, Example
from fedtune.data.format import IGNORE
from fedtune.data.loaders import load_path

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def _text(n, seed):
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n))


def _labeled(f):
    return [t for t in f["labels"] if t != IGNORE]


def test_long_prompts_keep_every_example_and_their_whole_response(tok):
    fmt = ChatFormatter(tok, 64)
    exs = [Example(_text(200, s), _text(8, s + 1)) for s in range(20)]
    feats, stats = fmt.format_all(exs)
    assert len(feats) == 20 and stats["counts"] == {"whole": 0, "truncated_prompt": 20, "truncated_response": 0,
                                                    "dropped": 0}
    for ex, f in zip(exs, feats, strict=True):
        assert len(f["input_ids"]) <= 64
        # the response tokens (+ <|im_end|>\n) are exactly the labels, at the end of the sequence
        want = tok(ex.response + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        assert _labeled(f) == want and f["input_ids"][-len(want):] == want
        text = tok.decode(f["input_ids"])
        # template intact: the user turn is opened and closed, the assistant turn follows; the prompt kept its end
        assert text.startswith("<|im_start|>user\n") and "<|im_end|>\n<|im_start|>assistant\n" in text
        kept = text[len("<|im_start|>user\n"): text.index("<|im_end|>")]
        assert len(kept) > 20 and ex.prompt.endswith(kept.strip())


def test_response_alone_too_long_is_cut_from_the_right_and_keeps_a_prompt_tail(tok):
    fmt = ChatFormatter(tok, 64)
    ex = Example(_text(100, 0), _text(200, 3))
    f = fmt.format(ex)
    assert f.outcome == "truncated_response" and len(f.feature["input_ids"]) == 64
    full = tok(ex.response + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    lab = _labeled(f.feature)
    assert lab == full[: len(lab)]  # a prefix of the response
    prompt_part = f.feature["input_ids"][: 64 - len(lab)]
    assert len(prompt_part) >= 64 // 4  # the prompt keeps ≥ L/4 tokens (its tail) plus the template


def test_template_alone_too_long_is_dropped_with_a_reason(tok):
    fmt = ChatFormatter(tok, 16)
    ex = Example("", "a", messages=(("system", _text(80, 1)), ("user", "hi"), ("assistant", "a")))
    f = fmt.format(ex)
    assert f.feature is None and f.outcome == "dropped" and "system turns alone take" in f.reason


def test_multi_turn_loss_only_on_assistant_tokens(tok):
    msgs = (("system", "be brief"), ("user", "hello there"), ("assistant", "hi"), ("user", "how are you"),
            ("assistant", "fine thanks"))
    f = ChatFormatter(tok, 256)(Example("how are you", "fine thanks", messages=msgs))
    ids, labels = f["input_ids"], f["labels"]
    # labeled positions, as contiguous spans, decode to exactly the assistant turns (+ their end tokens)
    spans, cur = [], []
    for t, lbl in zip(ids, labels, strict=True):
        if lbl != IGNORE:
            assert lbl == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur) if cur else None
    assert [tok.decode(s) for s in spans] == ["hi<|im_end|>\n", "fine thanks<|im_end|>\n"]
    assert tok.decode(ids) == tok.apply_chat_template([{"role": r, "content": c} for r, c in msgs], tokenize=False)


def test_multi_turn_drops_oldest_exchange_first(tok):
    msgs = (("system", "sys"), ("user", _text(60, 1)), ("assistant", _text(60, 2)), ("user", "last question"),
            ("assistant", "last answer"))
    f = ChatFormatter(tok, 48).format(Example("last question", "last answer", messages=msgs))
    text = tok.decode(f.feature["input_ids"])
    assert f.outcome == "truncated_prompt"
    assert text == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nlast question<|im_end|>\n" \
                   "<|im_start|>assistant\nlast answer<|im_end|>\n"


def test_text_schema_loss_on_every_token(tok):
    f = ChatFormatter(tok, 32)(Example("", _text(100, 0)))
    assert len(f["input_ids"]) == 32 and f["labels"] == f["input_ids"]


ROWS = [{"prompt": "What is 2+2?", "response": "4", "category": "math"},
        {"prompt": "Say hi", "response": "hi, there", "category": "chat"},
        {"prompt": "Empty, \"quoted\"", "response": "007", "category": "chat"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_csv_parquet_save_to_disk_and_json_load_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    want = load_path(_jsonl(tmp_path / "d.jsonl", ROWS))
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "d_saved"))
    (tmp_path / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
    for name in ("d.csv", "d.parquet", "d_saved", "d.json"):
        assert load_path(tmp_path / name) == want, name
    assert want[2].response == "007"  # CSV cells stay strings


def test_schemas_instruction_text_messages(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 2", "output": "4"}, {"instruction": "Greet", "output": "hi"}]
    got = load_path(_jsonl(tmp_path / "ins.jsonl", rows))
    assert [(e.prompt, e.response, e.category) for e in got] == [("Add\n\n2 and 2", "4", "ins"), ("Greet", "hi", "ins")]
    got = load_path(_jsonl(tmp_path / "t.jsonl", [{"text": "plain"}]))
    assert got[0].prompt == "" and got[0].response == "plain"
    conv = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}]}
    got = load_path(_jsonl(tmp_path / "m.jsonl", [conv]))
    assert got[0].messages == (("user", "a"), ("assistant", "b")) and (got[0].prompt, got[0].response) == ("a", "b")


def test_directory_of_files_reads_them_in_name_order(tmp_path):
    d = tmp_path / "org"
    d.mkdir()
    _jsonl(d / "b.jsonl", ROWS[1:])
    _jsonl(d / "a.jsonl", ROWS[:1])
    (d / "notes.txt").write_text("ignored")
    assert [e.response for e in load_path(d)] == ["4", "hi, there", "007"]


@pytest.mark.parametrize("max_len", [16, 48, 128, 512])
def test_prefetched_formatting_equals_one_tokenizer_call_per_text(tok, max_len):
    """format_each / needed_lens render each conversation once and tokenize a block's texts in one batched
    backend call; the features, outcomes, lengths and needed lengths are exactly those of the per-example
    path with one `tokenizer(text)` call per text (every schema, multi-turn with system turns, all outcomes)."""
    from fedtune.data.loaders import load_chatterbot

    exs = list(load_chatterbot("english", ["ai", "food", "literature"]))
    exs += [Example(_text(n, n), _text(n // 2 + 1, n + 1)) for n in range(0, 300, 7)]
    exs += [Example("", _text(n, 3)) for n in (1, 40, 400)]  # {"text"}
    turns = (("system", _text(9, 1)), ("user", _text(30, 2)), ("assistant", _text(20, 3)), ("user", _text(60, 4)),
             ("assistant", _text(40, 5)))
    exs += [Example("", "", messages=turns[:k]) for k in (3, 5)] + [Example("", "", messages=turns[1:])]
    exs += exs[:5]  # repeats share memo entries
    ref = ChatFormatter(tok, max_len)
    ref._encode_many = lambda texts: [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    want = [ref.format(ex) for ex in exs]
    fmt = ChatFormatter(tok, max_len)
    got = list(fmt.format_each(exs))
    assert [(f.feature, f.outcome, f.length, f.reason) for f in got] == \
           [(f.feature, f.outcome, f.length, f.reason) for f in want]
    assert fmt.needed_lens(exs) == [ref.needed_len(ex) for ex in exs]
    assert {f.outcome for f in got} >= {"whole", "truncated_response"} and fmt._tokens is None  # memo released
