"""Prometheus text of the coordinator's `fedtune status` numbers on an opt-in port ([server] metrics_port).

A custom collector reads `GrpcTransport.status()` at each scrape, so the numbers are the ones `fedtune status`
shows (no second bookkeeping). The endpoint is plain HTTP with no credential: bind it where only the operator's
monitoring reaches (it shows organisation ids, counters and ε, no tokens and no model data)."""

from __future__ import annotations

from prometheus_client import start_http_server
from prometheus_client.core import CollectorRegistry, GaugeMetricFamily


class _Collector:
    def __init__(self, transport) -> None:
        self.transport = transport

    def collect(self):
        st = self.transport.status()
        run = [st["run"]]

        def gauge(name: str, doc: str, value) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["run"])
            g.add_metric(run, float(value))
            return g

        for key, doc in (("rounds_completed", "rounds completed"), ("rounds_total", "rounds configured"),
                         ("epsilon", "DP epsilon spent (max over clients)"), ("round_s", "mean seconds per round"),
                         ("eta_s", "estimated seconds left")):
            if st.get(key) is not None:
                yield gauge(f"fedtune_{key}", doc, st[key])
        yield gauge("fedtune_finished", "1 when the run is finished", st["finished"])
        per = {"connected": "1 while the client's lease is alive", "rounds_completed": "accepted updates",
               "failures": "rounds the client was sampled for and failed", "bytes_up": "update bytes received",
               "last_seen_s_ago": "seconds since the client's last call"}
        for key, doc in per.items():
            g = GaugeMetricFamily(f"fedtune_client_{key}", doc, labels=["run", "client"])
            for cid, c in st["clients"].items():
                if c.get(key) is not None:
                    g.add_metric([st["run"], cid], float(c[key]))
            yield g


def serve_metrics(transport, port: int, addr: str = "0.0.0.0"):
    """Start the metrics HTTP server (a daemon thread); returns (server, thread)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(transport))
    return start_http_server(port, addr=addr, registry=registry)
