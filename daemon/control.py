"""The control topic: how every daemon instance learns about releases and failovers.

Events are JSON objects (orjson) on one compacted topic, one partition recommended (total order):

    key b"release/active", b"release/standby"   the channel's current release (compaction keeps the latest)
    key b"event/<id>"                            every event, releases included (history; unique keys)

A release event is :meth:`daemon.registry.Release.to_dict` plus ``"type": "release"`` (and, optional,
``"holders"``: the admin URLs of instances that hold its bundle, to fetch it from); other
events (``"type": "failover"``, ``"failover_request"``) are objects with a ``type`` and an ``id``.
A ``"holding"`` event (``digest``, ``holders``: one admin URL) is an instance announcing that it
fetched a bundle and now serves it to the others (daemon/distribution/fetch.py): every reader
notes its holders (:func:`daemon.distribution.peers.note_event`), nothing else acts on it, and
it is never a release (``release history`` and the release log do not show it).

:func:`check_event` is the one place that decides whether a record is an event failoverd can
act on: the reader, ``release sync`` and :meth:`daemon.registry.Registry.apply_events` all use
it. A record it refuses (not JSON, missing or ill-typed fields, unknown type) is skipped, logged
and counted (``failoverd_control_events_skipped_total{reason}``): one bad record must never stop
an instance from following the topic.

:func:`publish` writes one event (a release under both of its keys). :class:`ControlReader`
reads the topic from the beginning to its end (``state``: the latest value per key), then
``watch()`` (or ``async for``) yields each new event once, as it arrives, and raises
:class:`~daemon.errors.ControlTopicError` when it can no longer follow (broker unreachable, topic
deleted or re-created): the caller restarts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from daemon import clients
from daemon import metrics as m
from daemon.errors import ControlTopicError as ControlTopicError  # re-exported: readers' callers catch it here

log = logging.getLogger("failoverd.control")

Event = dict[str, Any]
"""A control event: a JSON object with a ``type`` and an ``id`` (:func:`check_event`)."""

RELEASE_PREFIX = "release/"
EVENT_PREFIX = "event/"

EVENT_TYPES = ("release", "failover", "failover_request", "holding")
SKIP_REASONS = m.CONTROL_SKIP_REASONS
"""Why a control-topic record was skipped (the ``reason`` label of the skipped-events metric)."""

_RELEASE_TEXT = ("id", "time", "name", "version", "digest", "who", "why")
_CHANNELS = ("active", "standby")  # daemon.registry.CHANNELS / KINDS (not imported: registry loads bundles)
_KINDS = ("promote", "rollback", "failover")


class InvalidEvent(ValueError):
    """A control-topic record failoverd cannot act on; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def check_event(value: Any) -> Event:
    """``value`` if it is an event failoverd can act on, else :class:`InvalidEvent` saying why."""
    if not isinstance(value, dict):
        raise InvalidEvent("not_object", f"expected a JSON object, got {type(value).__name__}")
    kind = value.get("type")
    if kind not in EVENT_TYPES:
        raise InvalidEvent("unknown_type", f"type {kind!r} is not one of {', '.join(EVENT_TYPES)}")
    required = {"release": _RELEASE_TEXT + ("epoch", "channel", "kind"),
                "holding": ("id", "digest", "holders")}.get(kind, ("id",))
    missing = [f for f in required if f not in value]
    if missing:
        raise InvalidEvent("missing_fields", f"{kind} event lacks {', '.join(missing)}")
    bad = [f for f in (_RELEASE_TEXT if kind == "release" else ("id",))
           if not isinstance(value[f], str) or (f in ("id", "name", "version", "digest") and not value[f])]
    if kind == "release":
        if isinstance(value["epoch"], bool) or not isinstance(value["epoch"], (int, float)):
            bad.append("epoch")
        if value["channel"] not in _CHANNELS:
            bad.append("channel")
        if value["kind"] not in _KINDS:
            bad.append("kind")
        if not isinstance(value.get("rescore", False), bool):
            bad.append("rescore")
        holders = value.get("holders", [])  # optional: admin URLs holding the bundle (daemon/distribution)
        if not isinstance(holders, list) or not all(isinstance(h, str) for h in holders):
            bad.append("holders")
        if not isinstance(value.get("source"), (str, type(None))):
            bad.append("source")
    if kind == "failover_request" and not isinstance(value.get("reason", ""), str):
        bad.append("reason")
    if kind == "holding":
        if not isinstance(value.get("digest"), str) or not value["digest"]:
            bad.append("digest")
        holders = value.get("holders")
        if not isinstance(holders, list) or not holders or not all(isinstance(h, str) and h for h in holders):
            bad.append("holders")
    if bad:
        raise InvalidEvent("bad_field", f"{kind} event has ill-typed or unknown " + ", ".join(
            f"{f}={value.get(f)!r}"[:80] for f in bad))
    return value


def decode(raw: bytes) -> Event:
    """A record value as an event (:func:`check_event`); :class:`InvalidEvent` when it is not one."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent("not_json", f"not JSON ({exc})") from None
    return check_event(value)


def skipped(reason: str, detail: str, **where: object) -> None:
    """Log and count one control-topic record that was skipped."""
    m.CONTROL_EVENTS_SKIPPED.labels(reason).inc()
    log.warning("control topic: skipping a record failoverd cannot act on",
                extra={"reason": reason, "detail": detail, **where})


class _Release(Protocol):
    """What :func:`release_event` needs of a :class:`daemon.registry.Release` (not imported: see _CHANNELS)."""

    def to_dict(self) -> dict[str, Any]: ...


def release_event(release: _Release) -> Event:
    return {"type": "release", **release.to_dict()}


def holding_event(digest: str, holder: str) -> Event:
    """``holder`` (an admin URL) now holds the bundle ``digest`` and serves it to peers."""
    return {"type": "holding", "digest": digest, "holders": [holder]}


def keys_for(event: Event) -> list[str]:
    """The keys an event is published under."""
    keys = []
    if event.get("type") == "release":
        keys.append(RELEASE_PREFIX + event["channel"])
    keys.append(EVENT_PREFIX + event["id"])
    return keys


async def publish(kafka: clients.Target, topic: str, event: Event | _Release, *, timeout: float = 15.0) -> Event:
    """Publish one event (a dict with ``type``, or a Release); returns the event as published.

    A release goes under ``release/<channel>`` and ``event/<id>``; anything else under
    ``event/<id>`` (an ``id`` is added when missing). Publishing the same event again (same id)
    is harmless: readers report an id once. ValueError for an event :func:`check_event` refuses;
    ControlTopicError if the broker does not acknowledge within ``timeout`` seconds.
    """
    event = dict(event) if isinstance(event, dict) else release_event(event)
    if not event.get("type"):
        raise ValueError("a control event needs a 'type'")
    event.setdefault("id", uuid.uuid4().hex)
    if event["type"] != "release":
        event.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        check_event(event)
    except InvalidEvent as exc:
        raise ValueError(f"refusing to publish a control event readers would skip: {exc}") from None
    value = orjson.dumps(event)
    producer = clients.producer(kafka)  # acks=all, idempotent
    try:
        async with asyncio.timeout(timeout):
            await producer.start()
            futures = [await producer.send(topic, value, key=k.encode()) for k in keys_for(event)]
            await asyncio.gather(*futures)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise ControlTopicError(f"could not publish {event['type']} event {event['id']} to control topic {topic!r} "
                                f"at {clients.address(kafka)}: {describe(exc)}; fix: check that the "
                                f"broker is reachable and the topic exists (failoverd topics)") from exc
    finally:
        await producer.stop()
    return event


@dataclasses.dataclass(frozen=True)
class ControlEvent:
    key: str
    value: Event | None
    """The event, or None for a tombstone (the key was deleted)."""
    partition: int
    offset: int

    @property
    def type(self) -> str | None:
        return self.value.get("type") if self.value else None

    @property
    def id(self) -> str | None:
        return self.value.get("id") if self.value else None


_REPORTED: set[tuple[str, int, int]] = set()
"""(topic, partition, offset) of the records this process has already reported as skipped."""


class _Missing(Exception):
    """The topic is not in the cluster's topic list."""


def describe(exc: BaseException | None) -> str:
    """``Type: message`` once (aiokafka's messages often start with their type already)."""
    if exc is None:
        return ""
    text = str(exc)
    name = type(exc).__name__
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


class ControlReader:
    """Reads the control topic: :meth:`start` catches up to the end, :meth:`watch` follows it.

    ``seen``: event ids already reported (shared with an earlier reader when a watcher restarts,
    so that the events it missed, and only those, land in :attr:`events`).
    """

    MISSING_GRACE_S = 3.0
    """A topic absent from the cluster's topic list this long (within ``timeout``) does not exist."""

    def __init__(self, kafka: clients.Target, topic: str, *, timeout: float = 30.0, probe_interval: float = 5.0,
                 seen: set[str] | None = None) -> None:
        self.kwargs = clients.common_kwargs(kafka)
        self.topic = topic
        self.timeout = timeout
        self.probe_interval = probe_interval
        self.state: dict[str, Event] = {}
        """Latest value per key (tombstoned keys removed)."""
        self.events: list[ControlEvent] = []
        """Every distinct event read so far and not in ``seen`` before, in topic order."""
        self.skipped: dict[str, int] = {}
        """Records skipped by :func:`check_event`, per reason."""
        self._seen: set[str] = seen if seen is not None else set()
        self._next: dict[int, int] = {}
        self._tps: list[TopicPartition] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> ControlReader:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _bootstrap(self) -> str:
        return clients.address(self.kwargs)

    async def start(self) -> None:
        """Read the topic to its end. ControlTopicError naming what went wrong: the broker is
        unreachable, the topic does not exist, or it could not be read within ``timeout``."""
        self._consumer = clients.consumer(self.kwargs)  # read_committed, no group, from the earliest offset
        phase = "connect"
        try:
            async with asyncio.timeout(self.timeout):
                await self._consumer.start()
                phase = "metadata"
                parts = self._consumer.partitions_for_topic(self.topic)
                absent_until = time.monotonic() + min(self.timeout, self.MISSING_GRACE_S)
                while not parts:
                    await clients.refresh_metadata(self._consumer)
                    parts = self._consumer.partitions_for_topic(self.topic)
                    if not parts:
                        if time.monotonic() > absent_until and self.topic not in await self._consumer.topics():
                            raise _Missing
                        await asyncio.sleep(0.2)
                phase = "read"
                self._tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
                self._consumer.assign(self._tps)
                await self._consumer.seek_to_beginning(*self._tps)
                end = await self._consumer.end_offsets(self._tps)
                while await self._behind(self._tps, end):
                    batch = await self._consumer.getmany(timeout_ms=200)
                    for tp in sorted(batch, key=lambda t: t.partition):
                        for rec in batch[tp]:
                            self._apply(rec)
        except _Missing:
            await self.stop()
            raise ControlTopicError(self._explain("metadata", None)) from None
        except (TimeoutError, KafkaError, OSError) as exc:
            await self.stop()
            raise ControlTopicError(self._explain(phase, exc)) from exc
        except BaseException:
            await self.stop()
            raise

    def _explain(self, phase: str, exc: BaseException | None) -> str:
        where = f"control topic {self.topic!r} at {self._bootstrap()}"
        unreachable = isinstance(exc, KafkaConnectionError) or (isinstance(exc, OSError)
                                                                and not isinstance(exc, TimeoutError))
        if phase == "connect" or unreachable:
            return (f"control topic {self.topic!r}: broker unreachable at {self._bootstrap()} ({describe(exc)}); "
                    f"fix: check the bootstrap servers "
                    f"([kafka] bootstrap_servers or --bootstrap) and that the broker is up (failoverd kafka status)")
        if phase == "metadata":
            return (f"{where}: the topic does not exist; fix: create it (compacted) with `failoverd topics apply`, "
                    f"or check [registry] control_topic / --control-topic")
        return (f"{where}: could not be read to its end within {self.timeout:g}s ({describe(exc)}); "
                f"fix: check the broker's health, or allow more time")

    def _started(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("ControlReader used before start() or after stop()")
        return self._consumer

    async def _behind(self, tps: list[TopicPartition], end: dict[TopicPartition, int]) -> bool:
        for tp in tps:
            if await self._started().position(tp) < end[tp]:
                return True
        return False

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    def _apply(self, rec: ConsumerRecord[bytes, bytes]) -> ControlEvent | None:
        if rec.offset < self._next.get(rec.partition, 0):
            raise ControlTopicError(f"control topic {self.topic!r} at {self._bootstrap()}: partition "
                                    f"{rec.partition} went back to offset {rec.offset} (deleted and re-created?)")
        self._next[rec.partition] = rec.offset + 1
        key = rec.key.decode("utf-8", "replace") if rec.key is not None else ""
        value = None
        if rec.value is not None:
            try:
                value = decode(rec.value)
            except InvalidEvent as exc:
                self.skipped[exc.reason] = self.skipped.get(exc.reason, 0) + 1
                where = (self.topic, rec.partition, rec.offset)
                if where not in _REPORTED:  # a restarted watcher reads it again: log and count it once
                    _REPORTED.add(where)
                    skipped(exc.reason, str(exc), topic=self.topic, partition=rec.partition, offset=rec.offset,
                            key=key)
                return None
        if value is None:
            self.state.pop(key, None)
        else:
            self.state[key] = value
        if value is not None:
            if value["id"] in self._seen:
                return None  # a release arrives under two keys; report it once
            self._seen.add(value["id"])
            if value.get("holders"):  # a release or holding event: who serves that bundle to peers
                from daemon.distribution import peers

                peers.note_event(value)
        event = ControlEvent(key, value, rec.partition, rec.offset)
        self.events.append(event)
        return event

    def releases(self) -> dict[str, Event | None]:
        """The current release event of each channel, per the topic."""
        return {c: self.state.get(RELEASE_PREFIX + c) for c in _CHANNELS}

    def release_events(self) -> list[Event]:
        """Every distinct release event read so far, in topic order."""
        return [e.value for e in self.events if e.type == "release" and e.value is not None]

    async def _probe(self) -> None:
        """ControlTopicError unless the broker answers and the topic is still the one being read."""
        where = f"control topic {self.topic!r} at {self._bootstrap()}"
        try:
            async with asyncio.timeout(self.timeout):
                consumer = self._started()
                await clients.refresh_metadata(consumer)
                if not consumer.partitions_for_topic(self.topic):
                    raise ControlTopicError(f"{where}: the topic no longer exists; fix: re-create it (compacted) "
                                            f"with `failoverd topics apply`")
                end = await consumer.end_offsets(self._tps)
        except (TimeoutError, KafkaError, OSError) as exc:
            raise ControlTopicError(f"{where}: no answer within {self.timeout:g}s ({describe(exc)}); "
                                    f"broker unreachable or topic gone") from exc
        for tp in self._tps:
            if end[tp] < self._next.get(tp.partition, 0):
                raise ControlTopicError(f"{where}: partition {tp.partition} ends at {end[tp]}, before offset "
                                        f"{self._next[tp.partition]} already read (deleted and re-created?)")

    async def watch(self) -> AsyncIterator[ControlEvent]:
        """Yield each new event once, as it arrives (call :meth:`start` first). Every
        ``probe_interval`` seconds, checks that the broker answers and the topic is still there;
        raises ControlTopicError when it cannot follow any more."""
        if self._consumer is None:
            raise RuntimeError("ControlReader.watch() before start()")
        next_probe = time.monotonic() + self.probe_interval
        while self._consumer is not None:
            try:
                batch = await self._consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                raise ControlTopicError(f"control topic {self.topic!r} at {self._bootstrap()}: "
                                        f"{describe(exc)}") from exc
            for tp in sorted(batch, key=lambda t: t.partition):
                for rec in batch[tp]:
                    event = self._apply(rec)
                    if event is not None:
                        yield event
            if time.monotonic() >= next_probe and self._consumer is not None:
                await self._probe()
                next_probe = time.monotonic() + self.probe_interval

    def __aiter__(self) -> AsyncIterator[ControlEvent]:
        return self.watch()
