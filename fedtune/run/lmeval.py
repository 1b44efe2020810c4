"""lm-evaluation-harness tasks (MMLU, HellaSwag, … or a task YAML on local files) on a loaded model.

The model object fedtune already holds (its device, dtype and quantization; a PeftModel with the run's adapter)
is wrapped in lm-eval's HFLM, so the harness scores exactly what `fedtune eval` loaded. Needs the `lm-eval`
package (the `eval` extra). A task YAML's directory is added to the harness's task search path; a task on local
files (dataset_path: json, data_files: …) runs offline.
"""

from __future__ import annotations

from pathlib import Path


class TaskError(ValueError):
    """A bad --tasks argument, or lm-eval is not installed."""


def _yaml_task_name(p: Path) -> str:
    import yaml

    class Loader(yaml.SafeLoader):  # lm-eval YAMLs use tags such as !function: not needed for the name
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    try:
        doc = yaml.load(p.read_text(), Loader=Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise TaskError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    name = doc.get("task") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        raise TaskError(f"{p}: a task YAML needs a `task: NAME` line")
    return name


def resolve_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names, include dirs): a *.yaml/*.yml path contributes its `task` name and its directory."""
    names, include = [], []
    for t in tasks:
        if t.endswith((".yaml", ".yml")):
            p = Path(t)
            if not p.is_file():
                raise TaskError(f"{p}: no such task YAML")
            names.append(_yaml_task_name(p))
            d = str(p.resolve().parent)
            include += [d] if d not in include else []
        else:
            names.append(t)
    return names, include


def run_tasks(model, tok, tasks: list[str], *, limit: float | None = None, num_fewshot: int | None = None,
              batch_size: int | str = 1, seed: int = 0) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of lm-eval's simple_evaluate on `model` (metric names without lm-eval's ",none"
    filter suffix; stderr as "<metric>_stderr")."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TaskError("--tasks needs lm-evaluation-harness: pip install 'fedtune[eval]' (or lm-eval)") from None
    names, include = resolve_tasks(tasks)
    # only local YAMLs: skip indexing the thousands of built-in task configs
    named = any(not t.endswith((".yaml", ".yml")) for t in tasks)
    tm = TaskManager(include_path=include or None, include_defaults=named)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        raise TaskError(f"unknown lm-eval task(s) {', '.join(missing)}: see `lm-eval ls tasks`, or give a task YAML")
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
        res = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                              log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        row = {}
        for key, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                name, _, filt = key.partition(",")
                row[name if filt in ("", "none") else f"{name},{filt}"] = float(v)
        out[task] = row
    return out


def format_task_table(columns: dict[str, dict[str, dict[str, float]]]) -> str:
    """One row per task × metric, one column per model ("tuned", "base", …)."""
    keys: list[tuple[str, str]] = []
    for res in columns.values():
        for task, metrics in res.items():
            keys += [(task, m) for m in metrics
                     if not m.endswith("_stderr") and m != "sample_len" and (task, m) not in keys]
    w = max([16] + [len(f"{t} {m}") for t, m in keys])
    lines = [f"{'task metric':<{w}}" + "".join(f"  {c:>10}" for c in columns)]
    for t, m in keys:
        cells = []
        for res in columns.values():
            v = res.get(t, {}).get(m)
            cells.append(f"  {'-':>10}" if v is None else f"  {v:>10.4f}")
        lines.append(f"{f'{t} {m}':<{w}}" + "".join(cells))
    return "\n".join(lines)
