"""`fedtune server`: a run whose rounds travel over gRPC (fedtune.transports.grpc.coordinator)."""

from __future__ import annotations

import logging
import signal
import threading
import tomllib
from pathlib import Path

from grpc_health.v1 import health_pb2

from fedtune.config import ConfigError, RunConfig, ServerSection, load_tokens
from fedtune.run.assemble import Run, execute, finalize_run, prepare_run
from fedtune.transports import wire
from fedtune.transports.grpc.coordinator import GrpcTransport, drain, start_grpc_server

log = logging.getLogger("fedtune.server")


def load_revoked(path: str) -> set[str]:
    """The revoked organisation ids of a revocation list (`revoked = [ids]`); empty when no file is configured."""
    if not path:
        return set()
    p = Path(path)
    if not p.is_file():  # configured but gone: refusing to start beats letting a revoked organisation back in
        raise ConfigError(f"[server] revoked_file not found: {p}")
    try:
        ids = tomllib.loads(p.read_text()).get("revoked", [])
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e})") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ConfigError(f"{p}: expected revoked = [\"org-id\", ...]")
    return set(ids)


def load_admin_token(path: str) -> str:
    """The admin token of `fedtune status` (`[admin] token = "…"`); "" when no file is configured."""
    if not path:
        return ""
    p = Path(path)
    try:
        token = tomllib.loads(p.read_text()).get("admin", {}).get("token", "")
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"[server] admin_token_file {p}: {e}") from None
    if not isinstance(token, str) or len(token) < 16:
        raise ConfigError(f"{p}: expected [admin] token = \"…\" (at least 16 characters; fedtune init writes one)")
    return token


def status_numbers(run: Run) -> dict:
    """Run-level numbers for `fedtune status`: rounds done, ε spent, time per round, estimated time left."""
    rows = [r for r in run.writer.rows if r.get("round", 0) >= 1]
    total = run.cfg.run.rounds
    done = rows[-1]["round"] if rows else run.start_round - 1
    walls = [r["wall_s"] for r in rows if isinstance(r.get("wall_s"), int | float)]
    per_round = sum(walls) / len(walls) if walls else None
    eps = next((r["epsilon"] for r in reversed(rows) if r.get("epsilon") is not None), None)
    return {"rounds_total": total, "rounds_completed": done, "epsilon": eps,
            "round_s": round(per_round, 2) if per_round is not None else None,
            "eta_s": round(per_round * (total - done), 1) if per_round is not None else None}


def serve(cfg: RunConfig, *, resume: bool = False, progress: bool = False, ready: threading.Event | None = None,
          port_box: list | None = None, stop: threading.Event | None = None) -> dict:
    """`fedtune server`: run the configured rounds over gRPC; returns the run summary."""
    scfg: ServerSection = cfg.section("server", ServerSection)
    if not scfg.tls_cert:
        if not scfg.insecure:
            raise ConfigError("[server] tls_cert is empty: client tokens would travel in clear text; set tls_cert and "
                              "tls_key (fedtune certs makes dev ones) or, only on a trusted network, pass --insecure "
                              "([server] insecure = true)")
        log.warning("INSECURE: no TLS; client tokens and updates travel in clear text ([server] insecure = true)")
    tokens = load_tokens(scfg.tokens_file, "[server] tokens_file")
    revoked = load_revoked(scfg.revoked_file)
    if listed := sorted(set(scfg.clients) & revoked):
        raise ConfigError(f"[server] clients lists {listed}, revoked in {scfg.revoked_file}; take them off the roster")
    tokens = {c: t for c, t in tokens.items() if c not in revoked}  # neither their token nor their certificate counts
    if revoked:
        log.info("revoked (refused): %s", ", ".join(sorted(revoked)))
    roster = list(scfg.clients) or sorted(tokens)
    unknown = sorted(set(roster) - set(tokens))
    if unknown:
        raise ConfigError(f"[server] clients {unknown} have no token in {scfg.tokens_file}")
    if len(roster) != cfg.federation.num_clients:
        raise ConfigError(f"{len(roster)} clients in the roster but federation.num_clients = "
                          f"{cfg.federation.num_clients}; make them agree")
    admin = load_admin_token(scfg.admin_token_file)

    def grpc_transport(run: Run) -> GrpcTransport:
        return GrpcTransport(roster=roster, tokens={c: tokens[c] for c in roster}, fingerprint=run.base_fingerprint,
                             model_name=cfg.model.name, run_name=cfg.run.name, algorithm=run.algo.name, cfg=scfg,
                             stop=stop, secagg=sa if (sa := cfg.secagg_config()).enabled else None,
                             admin_token=admin)

    run = prepare_run(cfg, transport=grpc_transport, resume=resume, roster=roster, deployment=True,
                      evaluate=scfg.evaluate)
    try:
        return _serve_run(run, run.engine.transport, cfg, scfg, roster, progress=progress, ready=ready,
                          port_box=port_box)
    finally:
        run.close()


def _serve_run(run: Run, transport: GrpcTransport, cfg: RunConfig, scfg: ServerSection, roster: list[str], *,
               progress: bool, ready: threading.Event | None, port_box: list | None) -> dict:
    transport.status_extra = lambda: status_numbers(run)
    server, port, health_servicer = start_grpc_server(transport, scfg.address, scfg)
    if scfg.metrics_port:
        from fedtune.transports.grpc.metrics import serve_metrics

        serve_metrics(transport, scfg.metrics_port)
    log.info("coordinator for run %r (%s, %d clients) listening on port %d%s", cfg.run.name, run.algo.name,
             len(roster), port, (" with mTLS" if transport.mtls else " with TLS") if scfg.tls_cert else " WITHOUT TLS")
    if port_box is not None:
        port_box.append(port)
    if ready is not None:
        ready.set()
    on_main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, lambda *_: transport.stop_event.set()) for s in (signal.SIGTERM, signal.SIGINT)} if on_main else {}
    try:
        execute(run, progress=progress)
        summary = finalize_run(run)
        with transport.lock:
            transport.finished = True
        drain(transport, scfg.finish_grace_s)
        return summary
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for svc in ("", wire.SERVICE_NAME):
            health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        server.stop(grace=1.0)
        transport.closed.set()
