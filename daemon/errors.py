"""The exception tree of failoverd.

Every error a user can cause says what was wrong and how to fix it.

    FailoverdError
    ├── ConfigError            bad configuration: names the file, field, value, expectation
    ├── UsageError             a command-line argument names something unusable (commands/__init__.py)
    ├── BrokerError            the local Kafka broker could not be fetched/started/stopped
    │   └── SchemaRegistryError  the local schema registry likewise (schema_registry_local.py)
    ├── TopicPlanError         the topics plan is unsafe or the cluster differs from it
    ├── DeadLetterTopicError   the dead-letter topic could not be read or written (deadletters.py; retriable)
    ├── BundleError            a bundle is malformed, unsafe or does not verify
    │   └── IntegrityError     a file does not match its manifest digest
    ├── RegistryError          release log / registry problems (unknown release, nothing to roll back to)
    │   ├── ControlTopicError  the control topic could not be read or written (retriable)
    │   └── FetchError     no source could deliver a bundle by digest (distribution/sources.py)
    ├── CheckpointFailed       a checkpoint committed in the background failed (retriable: the engine rewinds)
    └── ReleaseFailure         the running release failed (worker died, timed out, raised)
        ├── BatchFailed        predict raised for a whole batch (reason ``exception``)
        ├── WorkerCrashed      the model process died (reason ``worker_crashed``)
        ├── WorkerTimeout      it did not answer within the predict timeout (reason ``predict_timeout``)
        ├── WorkerOutOfMemory  the worker hit its memory limit (said so before it exited)
        └── ProtocolError      the worker sent an oversized, undecodable or unexpected frame

Errors that may go away on their own carry ``retriable = True`` (as in aiokafka). The four defined
beside the one command or tool that raises them are named with their module. Inside the release
boundary, what a worker sends wrong (``engine.framing.FrameError``, ``engine.replies.BadReply``)
becomes a ProtocolError before anything else sees it.
"""

from __future__ import annotations


class FailoverdError(Exception):
    """Base class of every error failoverd raises on purpose."""

    retriable = False
    exit_code = 1


class ConfigError(FailoverdError):
    """The configuration is invalid. The message names file, field, value and the fix."""

    exit_code = 2


class BrokerError(FailoverdError):
    """The local Kafka broker could not be managed."""


class TopicPlanError(FailoverdError):
    """The topic plan is unsafe, or the cluster does not match it."""


class BundleError(FailoverdError):
    """A bundle is malformed, unsafe or cannot be loaded."""


class IntegrityError(BundleError):
    """A bundle file does not match the digest its manifest records."""


class RegistryError(FailoverdError):
    """The registry or release log cannot do what was asked."""


class CheckpointFailed(FailoverdError):
    """A checkpoint committed in the background failed; the batch waiting to be written is dropped
    and every partition rewinds to its last checkpoint (nothing of the interval is visible)."""

    retriable = True


class ReleaseFailure(FailoverdError):
    """The running model release failed; the failover controller acts on it."""

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class BatchFailed(ReleaseFailure):
    """``predict`` raised for a whole batch (more records failed on their own than isolation allows)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="exception")


class WorkerCrashed(ReleaseFailure):
    def __init__(self, message: str) -> None:
        super().__init__(message, reason="worker_crashed")


class WorkerTimeout(ReleaseFailure):
    def __init__(self, message: str) -> None:
        super().__init__(message, reason="predict_timeout")


class WorkerOutOfMemory(ReleaseFailure):
    """A MemoryError in the worker (``[worker] memory_mb``): it reported it, then exited."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="worker_oom")


class ProtocolError(ReleaseFailure):
    """The worker broke the data-only protocol (daemon/engine/replies.py): it is killed and the
    release fails over -- the daemon trusts nothing a release sends."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="protocol")


class ControlTopicError(RegistryError):
    """The control topic could not be read or written (broker unreachable, topic missing)."""

    retriable = True
