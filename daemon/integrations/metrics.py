"""The integrations' Prometheus metrics: the daemon's families, in a registry of their own.

An app that scores through an integration (daemon/integrations/faust.py) is not a daemon: it
has no checkpoints, no changelog of its own and no admin API. It exports the daemon's metrics
that mean the same thing there -- records in, out and dead-lettered, predict latency, model
errors, failovers, the loaded releases, the standby, the control topic -- under the **same
names**, each with one more label, ``integration`` (``"faust"``), so that a dashboard or alert
tells the two apart with ``{integration="faust"}`` / ``{integration=""}``.

They live in :data:`REGISTRY`, not in ``daemon.metrics.REGISTRY``: the daemon's label sets stay
exactly as they are (one metric family never has two label sets in one exposition), and a process
that runs both (a test) exports both without a clash. Serve them with :func:`serve` or
:func:`exposition` (docs/faust.md, "Metrics").
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from daemon.engine.headers import DLQ_REASONS
from daemon.metrics import FAILOVER_REASONS, MODEL_ERROR_REASONS

REGISTRY = CollectorRegistry(auto_describe=True)

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_I = "integration"

RECORDS_IN = Counter("failoverd_records_in", "Input records scored through an integration",
                     [_I, "topic", "partition"], registry=REGISTRY)
RECORDS_OUT = Counter("failoverd_records_out", "Outputs produced through an integration (handed to the app; "
                      "the app's framework delivers them, at least once)", [_I, "topic", "partition"],
                      registry=REGISTRY)
RECORDS_DEAD_LETTERED = Counter("failoverd_records_dead_lettered", "Input records that became dead letters",
                                [_I, "topic", "partition", "reason"], registry=REGISTRY)
PREDICT_SECONDS = Histogram("failoverd_predict_seconds", "Model predict call latency per batch", [_I, "channel"],
                            buckets=_BUCKETS, registry=REGISTRY)
MODEL_ERRORS = Counter("failoverd_model_errors", "Model failures by kind", [_I, "channel", "reason"],
                       registry=REGISTRY)
RELEASE_INFO = Gauge("failoverd_release_info", "1 for the release loaded on each channel",
                     [_I, "channel", "name", "version", "digest"], registry=REGISTRY)
FAILOVERS = Counter("failoverd_failovers", "Failovers performed", [_I, "reason"], registry=REGISTRY)
FAILOVER_SECONDS = Histogram("failoverd_failover_seconds", "From failure detection to the standby's first answer",
                             [_I], buckets=_BUCKETS, registry=REGISTRY)
STANDBY_READY = Gauge("failoverd_standby_ready", "1 when a healthy standby release is loaded", [_I],
                      registry=REGISTRY)
FAILOVER_CAP_REACHED = Gauge("failoverd_failover_cap_reached", "1 while scoring waits because failovers hit "
                             "their cap or cool-down, or no standby exists", [_I], registry=REGISTRY)
CONTROL_FOLLOWING = Gauge("failoverd_control_following", "1 while this app follows the control topic", [_I],
                          registry=REGISTRY)


def init_labels(integration: str) -> None:
    """Every bounded label combination at 0, so rate()/increase() see a reason's first event."""
    for reason in FAILOVER_REASONS:
        FAILOVERS.labels(integration, reason)
    for channel in ("active", "standby"):
        for reason in MODEL_ERROR_REASONS:
            MODEL_ERRORS.labels(integration, channel, reason)
        PREDICT_SECONDS.labels(integration, channel)
    FAILOVER_SECONDS.labels(integration)
    STANDBY_READY.labels(integration)
    FAILOVER_CAP_REACHED.labels(integration)
    CONTROL_FOLLOWING.labels(integration)


def init_partition_labels(integration: str, topic: str, partition: int) -> None:
    p = str(partition)
    RECORDS_IN.labels(integration, topic, p)
    RECORDS_OUT.labels(integration, topic, p)
    for reason in DLQ_REASONS:
        RECORDS_DEAD_LETTERED.labels(integration, topic, p, reason)


def exposition() -> bytes:
    """The metrics in Prometheus' text format (for an app's own HTTP route)."""
    return generate_latest(REGISTRY)


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Serve :data:`REGISTRY` on ``http://addr:port/metrics`` from a background thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)
