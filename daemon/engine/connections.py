"""The engine's Kafka clients, built from the settings in one place.

- the group consumer (read_committed, manual commits, the rebalance listener);
- the restore consumer (read_committed: only committed changelog records are applied) and the
  high-watermark reader (read_uncommitted: offsets only, the restore's target);
- at-least-once: one shared idempotent producer; exactly-once: one transactional producer per
  input partition (:func:`daemon.engine.partition.transactional_id`), built when it is assigned;
- a short-lived consumer for a rescore.

Nothing else in the engine constructs a client; each is made by :mod:`daemon.clients` (its safe
defaults, and the only place that touches aiokafka's private API), with the engine's overrides.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import InvalidTransactionTimeout, TransactionalIdAuthorizationFailed

from daemon import clients
from daemon.engine.deadline import Deadline
from daemon.engine.partition import transactional_id
from daemon.errors import ConfigError

TRANSACTION_TIMEOUT_MS = 60000
"""Kafka aborts a checkpoint transaction left open this long (its owner died); the brokers'
transaction.max.timeout.ms must allow it."""


class EngineClients:
    def __init__(self, settings: Any) -> None:
        self.s = settings
        self.common: dict[str, Any] = settings.kafka.client_kwargs()
        self.eos = bool(settings.checkpoint.exactly_once)
        self.consumer: AIOKafkaConsumer | None = None
        self.restorer: AIOKafkaConsumer | None = None
        self.hw_reader: AIOKafkaConsumer | None = None
        """Offsets only: the changelog's high watermark (read_uncommitted), the restore's target."""
        self.shared_producer: AIOKafkaProducer | None = None

    async def start(self, listener: ConsumerRebalanceListener, batch_bytes: int) -> None:
        """Start every long-lived client; on failure stop what started (so a retry starts clean)."""
        try:
            await self._start(listener, batch_bytes)
        except BaseException:
            await self.discard()
            raise

    async def discard(self) -> None:
        """Stop every client started so far (5 s each at most) and forget them: a start that failed."""
        for client in self._all():
            try:
                await asyncio.wait_for(client.stop(), 5)
            except Exception:  # noqa: BLE001
                pass
        self.consumer = self.restorer = self.hw_reader = self.shared_producer = None

    async def _start(self, listener: ConsumerRebalanceListener, batch_bytes: int) -> None:
        k = self.s.kafka
        # Restore reads to the end of the changelog, whose tail is a transaction marker (no record
        # to return): a short fetch wait keeps that last empty fetch from costing 0.5-1 s.
        self.restorer = clients.consumer(self.common, fetch_max_wait_ms=10)
        await self.restorer.start()
        self.hw_reader = clients.consumer(self.common, isolation_level="read_uncommitted")
        await self.hw_reader.start()
        if not self.eos:
            # [output] compression, acks, linger_ms, batch_size; batches never larger than the topics accept
            self.shared_producer = clients.producer(self.s, batch_cap=batch_bytes)
            await self.shared_producer.start()
        self.consumer = clients.consumer(
            self.common, group_id=k.group_id, group_instance_id=k.group_instance_id,
            session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_partition_fetch_bytes=1024 * 1024, fetch_max_wait_ms=50)
        self.consumer.subscribe(list(self.s.inputs.topics), listener=listener)
        await self.consumer.start()

    async def partitions_of(self, topic: str) -> int:
        """How many partitions ``topic`` has; ConfigError (with the fix) if it has none."""
        assert self.restorer is not None, "clients not started"
        parts = await clients.partitions_of(self.restorer, topic)
        if not parts:
            raise ConfigError(f"topic {topic!r} does not exist on {self.common.get('bootstrap_servers')}; "
                              "create it with `failoverd topics apply`")
        return len(parts)

    async def transactional_producer(self, tp: TopicPartition, batch_bytes: int) -> AIOKafkaProducer:
        """The producer of ``tp``'s transactions, started: InitProducerId fences every earlier owner
        of the partition and aborts its open transaction."""
        txn_id = transactional_id(self.s.app.name, self.s.kafka.group_id, tp.topic, tp.partition)
        producer = clients.transactional_producer(self.s, txn_id, batch_cap=batch_bytes,
                                                  transaction_timeout_ms=TRANSACTION_TIMEOUT_MS, retry_backoff_ms=10)
        try:
            await producer.start()
        except Exception as exc:
            with contextlib.suppress(Exception):  # whatever failed, the half-started producer stops
                await asyncio.wait_for(producer.stop(), 5)
            if isinstance(exc, InvalidTransactionTimeout):
                raise ConfigError(f"the brokers refuse a transaction timeout of {TRANSACTION_TIMEOUT_MS} ms (exactly-once "
                                  "checkpoints need it): raise transaction.max.timeout.ms on the brokers to at least "
                                  "that (Kafka's default is 900000)") from None
            if isinstance(exc, TransactionalIdAuthorizationFailed):
                raise ConfigError(f"the brokers do not let this principal use transactional id {txn_id!r}: grant it "
                                  f"WRITE and DESCRIBE on the TransactionalId resources with prefix "
                                  f"{self.s.app.name + ':'!r} (docs/operations.md, Kafka ACLs)") from None
            raise
        return producer

    async def rescore_consumer(self) -> AIOKafkaConsumer:
        """A consumer outside the group for re-reading committed inputs (stop it when done)."""
        consumer = clients.consumer(self.common)
        await consumer.start()
        return consumer

    async def stop(self, deadline: Deadline) -> None:
        """Stop every long-lived client, each within what is left of ``deadline`` (at most 5 s)."""
        await asyncio.gather(*(asyncio.wait_for(c.stop(), deadline.left(5)) for c in self._all()),
                             return_exceptions=True)

    def _all(self) -> list[Any]:
        return [c for c in (self.consumer, self.restorer, self.hw_reader, self.shared_producer) if c is not None]
