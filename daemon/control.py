"""The control topic: how every daemon instance learns about releases and failovers.

Events are JSON objects (orjson) on one compacted topic, one partition recommended (total order):

    key b"release/active", b"release/standby"   the channel's current release (compaction keeps the latest)
    key b"event/<id>"                            every event, releases included (history; unique keys)

A release event is :meth:`daemon.registry.Release.to_dict` plus ``"type": "release"``; other
events (``"type": "failover"``, ...) are free-form objects with a ``type`` and an ``id``.

:func:`publish` writes one event (a release under both of its keys). :class:`ControlReader`
reads the topic from the beginning to its end (``state``: the latest value per key), then
``watch()`` (or ``async for``) yields each new event once, as it arrives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from daemon.errors import ControlTopicError

log = logging.getLogger("failoverd.control")

RELEASE_PREFIX = "release/"
EVENT_PREFIX = "event/"


def client_kwargs(kafka: str | dict) -> dict:
    """aiokafka client arguments from a bootstrap string or a dict of them."""
    if isinstance(kafka, str):
        return {"bootstrap_servers": kafka}
    return dict(kafka)


def release_event(release) -> dict:
    return {"type": "release", **release.to_dict()}


def keys_for(event: dict) -> list[str]:
    """The keys an event is published under."""
    keys = []
    if event.get("type") == "release":
        keys.append(RELEASE_PREFIX + event["channel"])
    keys.append(EVENT_PREFIX + event["id"])
    return keys


async def publish(kafka: str | dict, topic: str, event: Any, *, timeout: float = 15.0) -> dict:
    """Publish one event (a dict with ``type``, or a Release); returns the event as published.

    A release goes under ``release/<channel>`` and ``event/<id>``; anything else under
    ``event/<id>`` (an ``id`` is added when missing). ControlTopicError if the broker does not
    acknowledge within ``timeout`` seconds.
    """
    if not isinstance(event, dict):
        event = release_event(event)
    event = dict(event)
    if not event.get("type"):
        raise ValueError("a control event needs a 'type'")
    event.setdefault("id", uuid.uuid4().hex)
    if event["type"] != "release":
        event.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    value = orjson.dumps(event)
    kw = client_kwargs(kafka)
    producer = AIOKafkaProducer(**kw, acks="all", enable_idempotence=True)
    try:
        async with asyncio.timeout(timeout):
            await producer.start()
            futures = [await producer.send(topic, value, key=k.encode()) for k in keys_for(event)]
            await asyncio.gather(*futures)
    except (KafkaError, OSError, TimeoutError) as exc:
        raise ControlTopicError(f"could not publish {event['type']} event {event['id']} to control topic {topic!r} "
                                f"at {kw.get('bootstrap_servers')}: {type(exc).__name__}: {exc}; fix: check that the "
                                f"broker is reachable and the topic exists (failoverd topics)") from exc
    finally:
        await producer.stop()
    return event


@dataclasses.dataclass(frozen=True)
class ControlEvent:
    key: str
    value: dict | None
    """The event, or None for a tombstone (the key was deleted)."""
    partition: int
    offset: int

    @property
    def type(self) -> str | None:
        return self.value.get("type") if self.value else None

    @property
    def id(self) -> str | None:
        return self.value.get("id") if self.value else None


class ControlReader:
    """Reads the control topic: :meth:`start` catches up to the end, :meth:`watch` follows it."""

    def __init__(self, kafka: str | dict, topic: str, *, timeout: float = 30.0) -> None:
        self.kwargs = client_kwargs(kafka)
        self.topic = topic
        self.timeout = timeout
        self.state: dict[str, dict] = {}
        """Latest value per key (tombstoned keys removed)."""
        self.events: list[ControlEvent] = []
        """Every distinct event read so far, in topic order."""
        self._seen: set[str] = set()
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> ControlReader:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _bootstrap(self) -> str:
        return str(self.kwargs.get("bootstrap_servers"))

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**self.kwargs, group_id=None, enable_auto_commit=False,
                                          auto_offset_reset="earliest", isolation_level="read_committed")
        try:
            async with asyncio.timeout(self.timeout):
                await self._consumer.start()
                parts = self._consumer.partitions_for_topic(self.topic)
                while not parts:
                    await self._consumer._client.force_metadata_update()
                    parts = self._consumer.partitions_for_topic(self.topic)
                    if not parts:
                        await asyncio.sleep(0.2)
                tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
                self._consumer.assign(tps)
                await self._consumer.seek_to_beginning(*tps)
                end = await self._consumer.end_offsets(tps)
                while await self._behind(tps, end):
                    batch = await self._consumer.getmany(timeout_ms=200)
                    for tp in sorted(batch, key=lambda t: t.partition):
                        for rec in batch[tp]:
                            self._apply(rec)
        except (TimeoutError, KafkaError, OSError) as exc:
            await self.stop()
            what = "does not exist or " if isinstance(exc, TimeoutError) else ""
            raise ControlTopicError(f"control topic {self.topic!r} at {self._bootstrap()} {what}could not be read "
                                    f"to its end within {self.timeout}s ({type(exc).__name__}: {exc}); fix: check "
                                    f"the broker and create the topic (compacted) with failoverd topics") from exc
        except BaseException:
            await self.stop()
            raise

    async def _behind(self, tps: list[TopicPartition], end: dict) -> bool:
        for tp in tps:
            if await self._consumer.position(tp) < end[tp]:
                return True
        return False

    async def stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    def _apply(self, rec) -> ControlEvent | None:
        key = rec.key.decode("utf-8", "replace") if rec.key is not None else ""
        value = None
        if rec.value is not None:
            try:
                value = orjson.loads(rec.value)
            except orjson.JSONDecodeError:
                log.warning("control topic: skipping a record that is not JSON",
                            extra={"topic": self.topic, "partition": rec.partition, "offset": rec.offset})
                return None
            if not isinstance(value, dict):
                log.warning("control topic: skipping a record that is not a JSON object",
                            extra={"topic": self.topic, "partition": rec.partition, "offset": rec.offset})
                return None
        if value is None:
            self.state.pop(key, None)
        else:
            self.state[key] = value
        event = ControlEvent(key, value, rec.partition, rec.offset)
        if value is not None and isinstance(value.get("id"), str):
            if value["id"] in self._seen:
                return None  # a release arrives under two keys; report it once
            self._seen.add(value["id"])
        self.events.append(event)
        return event

    def releases(self) -> dict[str, dict | None]:
        """The current release event of each channel, per the topic."""
        return {c: self.state.get(RELEASE_PREFIX + c) for c in ("active", "standby")}

    def release_events(self) -> list[dict]:
        """Every distinct release event read so far, in topic order."""
        return [e.value for e in self.events if e.type == "release"]

    async def watch(self) -> AsyncIterator[ControlEvent]:
        """Yield each new event once, as it arrives (call :meth:`start` first)."""
        if self._consumer is None:
            raise RuntimeError("ControlReader.watch() before start()")
        while self._consumer is not None:
            try:
                batch = await self._consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                raise ControlTopicError(f"control topic {self.topic!r} at {self._bootstrap()}: {exc}") from exc
            for tp in sorted(batch, key=lambda t: t.partition):
                for rec in batch[tp]:
                    event = self._apply(rec)
                    if event is not None:
                        yield event

    def __aiter__(self) -> AsyncIterator[ControlEvent]:
        return self.watch()
