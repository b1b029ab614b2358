"""Every Prometheus metric failoverd exports, in one place (catalog: docs/operations.md).

Labels are bounded: topic, partition, reason (a fixed vocabulary), channel, release
name/version/digest (one value per loaded release). Never per record or per key.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# ---- data path ----------------------------------------------------------------------------
RECORDS_IN = Counter("failoverd_records_in", "Input records fetched", ["topic", "partition"], registry=REGISTRY)
RECORDS_OUT = Counter("failoverd_records_out", "Output records committed", ["topic", "partition"], registry=REGISTRY)
RECORDS_DEAD_LETTERED = Counter(
    "failoverd_records_dead_lettered", "Input records sent to the dead-letter topic",
    ["topic", "partition", "reason"], registry=REGISTRY)
BATCH_SECONDS = Histogram("failoverd_batch_seconds", "Time to process one fetched batch end to end",
                          buckets=_LATENCY_BUCKETS, registry=REGISTRY)
PREDICT_SECONDS = Histogram("failoverd_predict_seconds", "Model predict call latency per batch",
                            ["channel"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
DEAD_LETTERS_TRUNCATED = Counter(
    "failoverd_dead_letters_truncated", "Dead letters whose value (or headers, or key) was cut to fit the "
    "dead-letter topic (original size in the fd.dlq.original_size header)", registry=REGISTRY)
SCHEMA_REGISTRY_WAITING = Gauge(
    "failoverd_schema_registry_waiting", "1 while a batch waits for an unavailable schema registry (its records "
    "wait; none is dead-lettered for it)", ["channel"], registry=REGISTRY)
SCHEMA_REGISTRY_WAIT_SECONDS = Counter(
    "failoverd_schema_registry_wait_seconds", "Time batches spent waiting for an unavailable schema registry",
    ["channel"], registry=REGISTRY)
WRITES_REFUSED = Counter(
    "failoverd_writes_refused", "Record batches the broker refused (the checkpoint aborts and replays)",
    registry=REGISTRY)
CONSUMER_LAG = Gauge("failoverd_consumer_lag", "Records between the committed position and the log end",
                     ["topic", "partition"], registry=REGISTRY)

# ---- checkpoints --------------------------------------------------------------------------
CHECKPOINT_SECONDS = Histogram("failoverd_checkpoint_seconds", "Time to commit one checkpoint transaction",
                               buckets=_LATENCY_BUCKETS, registry=REGISTRY)
CHECKPOINTS = Counter("failoverd_checkpoints", "Checkpoint transactions committed", registry=REGISTRY)
CHECKPOINT_ABORTS = Counter("failoverd_checkpoint_aborts", "Checkpoint transactions aborted", ["reason"],
                            registry=REGISTRY)
LAST_CHECKPOINT_TIMESTAMP = Gauge("failoverd_last_checkpoint_timestamp_seconds",
                                  "Unix time of the last committed checkpoint", registry=REGISTRY)

# ---- state --------------------------------------------------------------------------------
STATE_RESTORE_REMAINING = Gauge("failoverd_state_restore_remaining", "Changelog records left to restore",
                                ["topic", "partition"], registry=REGISTRY)
STATE_RESTORED = Counter("failoverd_state_restored", "Changelog records applied during restore",
                         registry=REGISTRY)

# ---- releases and failover ----------------------------------------------------------------
RELEASE_INFO = Gauge("failoverd_release_info", "1 for the release loaded on each channel",
                     ["channel", "name", "version", "digest"], registry=REGISTRY)
FAILOVERS = Counter("failoverd_failovers", "Failovers performed", ["reason"], registry=REGISTRY)
FAILOVER_SECONDS = Histogram("failoverd_failover_seconds", "From failure detection to resumed processing",
                             buckets=_LATENCY_BUCKETS, registry=REGISTRY)
RECORDS_REPLAYED = Counter("failoverd_records_replayed", "Input records reprocessed after a failure",
                           registry=REGISTRY)
STANDBY_READY = Gauge("failoverd_standby_ready", "1 when a healthy standby release is loaded", registry=REGISTRY)
FAILOVER_CAP_REACHED = Gauge("failoverd_failover_cap_reached",
                             "1 while consumption is paused because failovers hit their cap or no standby exists",
                             registry=REGISTRY)
STANDBY_AGREEMENT = Gauge("failoverd_standby_agreement_ratio",
                          "Share of records on which the hot standby's output equals the active one's",
                          registry=REGISTRY)
MODEL_ERRORS = Counter("failoverd_model_errors", "Model failures by kind", ["channel", "reason"],
                       registry=REGISTRY)
READY = Gauge("failoverd_ready", "1 when partitions are assigned, state restored and a release loaded",
              registry=REGISTRY)
STANDBY_LOAD_FAILURES = Counter("failoverd_standby_load_failures",
                                "Failed attempts to load the hot/warm standby (retried with backoff; "
                                "daemon/failover/standby.py)", registry=REGISTRY)
BUNDLE_FETCHES = Counter("failoverd_bundle_fetches",
                         "Bundle downloads by digest from one source, by result: ok, refused (bytes that do "
                         "not match the digest), failed (source unreachable, HTTP error); daemon/distribution",
                         ["result"], registry=REGISTRY)
BUNDLE_FETCHES_IN_PROGRESS = Gauge("failoverd_bundle_fetches_in_progress",
                                   "Bundles being fetched by digest right now (daemon/distribution)",
                                   registry=REGISTRY)

# ---- control topic (daemon/coordination.py, daemon/control.py) ----------------------------
CONTROL_FOLLOWING = Gauge("failoverd_control_following",
                          "1 while this instance follows the control topic (release changes reach it)",
                          registry=REGISTRY)
CONTROL_EVENTS_SKIPPED = Counter("failoverd_control_events_skipped",
                                 "Control-topic records skipped because failoverd cannot act on them", ["reason"],
                                 registry=REGISTRY)
CONTROL_PUBLISH_FAILURES = Counter("failoverd_control_publish_failures",
                                   "Failed attempts to record a failover in the release log and control topic",
                                   registry=REGISTRY)
FAILOVERS_UNRECORDED = Gauge("failoverd_failovers_unrecorded",
                             "Failovers of this instance not yet in the release log and on the control topic "
                             "(retried with backoff)", registry=REGISTRY)
CONTROL_SKIP_REASONS = ("not_json", "not_object", "missing_fields", "bad_field", "unknown_type")


FAILOVER_REASONS = ("worker_crashed", "predict_timeout", "exception_rate", "latency_slo", "output_invalid",
                    "state_oversized", "manual", "standby_available", "protocol", "worker_oom")
MODEL_ERROR_REASONS = ("worker_crashed", "predict_timeout", "exception", "exception_rate", "latency_slo",
                       "output_invalid", "state_oversized", "manual", "protocol", "worker_oom")


def init_labels() -> None:
    """Create every bounded label combination at 0, so rate()/increase() see a reason's first event."""
    for reason in FAILOVER_REASONS:
        FAILOVERS.labels(reason)
    for reason in ("fenced", "error"):
        CHECKPOINT_ABORTS.labels(reason)
    for reason in CONTROL_SKIP_REASONS:
        CONTROL_EVENTS_SKIPPED.labels(reason)
    for channel in ("active", "standby"):
        for reason in MODEL_ERROR_REASONS:
            MODEL_ERRORS.labels(channel, reason)
        PREDICT_SECONDS.labels(channel)


def init_partition_labels(topic: str, partition: int) -> None:
    p = str(partition)
    RECORDS_IN.labels(topic, p)
    RECORDS_OUT.labels(topic, p)
    from daemon.engine.headers import DLQ_REASONS

    for reason in DLQ_REASONS:
        RECORDS_DEAD_LETTERED.labels(topic, p, reason)


# ---- state store memory (daemon/engine/state.py) -----------------------------------------
STATE_MEMORY_KEYS = Gauge(
    "failoverd_state_memory_keys", "State keys a partition's store holds in memory (read cache, overlay, flush in "
    "progress, open intervals); every store together stays within StateStore.MEMORY_KEYS plus the open intervals",
    ["topic", "partition"], registry=REGISTRY)
