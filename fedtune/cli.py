"""`fedtune …` entry point. User errors (bad config, data, model) print one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys


def _user_errors() -> tuple[type[BaseException], ...]:
    from fedtune.config import ConfigError
    from fedtune.data import DataError
    from fedtune.models import ModelError

    return (ConfigError, DataError, ModelError)


def _simulate(args: argparse.Namespace) -> int:
    from fedtune import config
    from fedtune.simulation import output_paths, simulate

    overrides = {
        "run.algorithm": args.algorithm, "run.rounds": args.rounds, "federation.num_clients": args.clients,
        "run.out": args.out, "model.name": args.model, "run.seed": args.seed, "train.local_steps": args.local_steps,
    }
    if args.data:
        overrides |= {"data.source": "jsonl", "data.paths": args.data}
    cfg = config.load(args.config, overrides)
    if args.engine == "flower":  # same experiment through Flower's simulation engine (Ray)
        from fedtune.flower import run_flower_simulation

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
    from fedtune.engine import RoundAborted
    from fedtune.server.coordinator import Interrupted, serve
    from fedtune.simulation import output_paths

    overrides = {"run.out": args.out, "run.rounds": args.rounds}
    if args.address:
        overrides["server.address"] = args.address
    cfg = config.load(args.config, overrides)
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
    from fedtune.client.agent import Agent, Refused
    from fedtune.config import ClientSection

    overrides = {"client.server": args.server, "client.client_id": args.client_id, "client.partition": args.partition,
                 "client.token": args.token}
    cfg = config.load(args.config, overrides)
    try:
        return Agent(cfg, cfg.section("client", ClientSection)).run()
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedtune", description="Federated fine-tuning of language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="run a federation in-process on this machine")
    s.add_argument("--config", help="run config (TOML); defaults when omitted")
    s.add_argument("--algorithm", help="fedavg | flora | … (overrides run.algorithm)")
    s.add_argument("--rounds", type=int)
    s.add_argument("--clients", type=int, help="number of clients (federation.num_clients)")
    s.add_argument("--out", help="output dir (default runs/<run.name>)")
    s.add_argument("--model", help='"tiny" (random test model), "smollm2", an HF dir or a .gguf file')
    s.add_argument("--seed", type=int)
    s.add_argument("--local-steps", type=int)
    s.add_argument("--data", nargs="+", help="JSONL file(s): one per client, or one to partition")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    s.add_argument("--save-merged", action="store_true", help="also write the merged full model to <out>/merged")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.add_argument("--engine", choices=["native", "flower"], default="native",
                   help="native: fedtune's in-process simulation; flower: Flower's simulation engine (Ray), "
                        "same outputs")
    s.set_defaults(func=_simulate)
    sv = sub.add_parser("server", help="run the gRPC coordinator")
    sv.add_argument("--config", required=True, help="run config with a [server] section")
    sv.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    sv.add_argument("--address", help="listen address, e.g. 0.0.0.0:50051 (overrides [server] address)")
    sv.add_argument("--out")
    sv.add_argument("--rounds", type=int)
    sv.add_argument("--no-progress", action="store_true")
    sv.set_defaults(func=_server)
    cl = sub.add_parser("client", help="run an edge client that dials out to a coordinator")
    cl.add_argument("--config", required=True, help="client config: [model] [data] [federation] [client]")
    cl.add_argument("--server", help="HOST:PORT of the coordinator")
    cl.add_argument("--client-id")
    cl.add_argument("--partition", type=int, help="which [data] partition this client holds")
    cl.add_argument("--token", help="this client's token (prefer [client] token_file)")
    cl.set_defaults(func=_client)
    sub.add_parser("certs", help="make a dev CA, server/client certificates and tokens (fedtune certs --help)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["certs"]:  # its own argument parser (fedtune.certs)
        from fedtune.certs import certs_main

        return certs_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("httpx", "urllib3", "transformers", "peft"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
