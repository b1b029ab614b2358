"""failoverd releases inside a faust-streaming agent (docs/faust.md).

    scorer = FaustScorer.from_config(app, "failoverd.toml", table=cards)

    @app.agent(source)
    async def score(stream):
        async for events in stream.take_events(500, within=0.2):
            for s in await scorer.score(events):
                await scorer.send(s, output_topic, dead_letter_topic)

:class:`FaustScorer` puts a :class:`~daemon.integrations.scoring.Scorer` (the active and standby
releases in their model workers, the daemon's failover signals and policy, the control topic)
behind the faust idioms:

- **batches**: ``stream.take_events(n, within=t)`` (``take`` with the events, which carry their
  source topic, partition and offset for the provenance headers);
- **state in a faust Table**: the agent's Table, keyed by the record's key, holds one entry per
  state namespace (``{"fraud-scorer/s2": {...}, "fraud-scorer/s1": {...}}``: release name and
  state-schema version, as in the daemon, so a standby never reads state an incompatible release
  wrote). The model sees ``record.state`` from it and its new state is written back, to the
  changelog partition of the event that produced it (faust's own rule for a Table written from
  an agent);
- **results as the daemon's**: each :class:`Scored` is an output or a dead letter (reason,
  detail, original bytes) with the provenance headers the daemon writes (``fd.release.*``,
  ``fd.source.*``; ``fd.dlq.*`` on dead letters); :meth:`FaustScorer.send` sends it.

faust's delivery stays faust's: at least once (docs/faust.md, "Guarantees"). Values must reach
the agent as bytes (a ``value_serializer="raw"`` topic), as the daemon reads them: decoding,
schema validation and encoding happen where the model runs.
"""

from __future__ import annotations

try:
    import faust  # noqa: F401 - the check that the extra is installed
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("daemon.integrations.faust needs faust-streaming, which is not installed; fix: "
                      "pip install 'failoverd[faust]' (or pip install 'faust-streaming>=0.11')") from exc

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from daemon.engine.batch import NO_STATE, OK
from daemon.engine.headers import dead_letter_headers, release_headers, source_headers
from daemon.engine.release import LoadedRelease
from daemon.integrations import metrics as im
from daemon.integrations.scoring import NoRelease, Options, Scorer

__all__ = ["FaustScorer", "NoRelease", "Options", "Scored"]

INTEGRATION = "faust"


@dataclasses.dataclass(slots=True)
class Scored:
    """One input's result: an output, or a dead letter saying why (the daemon's vocabulary)."""

    event: Any
    """The faust event it came from."""
    ok: bool
    value: bytes | None
    """The encoded output, or (a dead letter) the input's original bytes."""
    headers: list[tuple[str, bytes | None]]
    """Provenance (``fd.release.*``, ``fd.source.*``); a dead letter's also ``fd.dlq.reason``/``detail``."""
    release: str
    """``name@version`` of the release that scored it."""
    reason: str | None = None
    detail: str | None = None

    @property
    def key(self) -> bytes | None:
        key: bytes | None = self.event.message.key
        return key


class FaustScorer:
    """Score faust events with failoverd releases; see the module docstring."""

    def __init__(self, app: Any, scorer: Scorer, *, table: Any = None, settings: Any = None) -> None:
        self.app = app
        self.scorer = scorer
        self.table = table
        self.settings = settings
        """The failoverd :class:`~daemon.config.Settings` when built from a configuration file (its
        ``inputs``, ``output`` and ``dead_letter`` topics are there for the app to use)."""
        self.duplicates_skipped = 0
        self._started: asyncio.Task[None] | None = None
        self._partitions: set[tuple[str, int]] = set()
        app.task(self._run)  # loads the releases as the worker starts; closes them as it stops

    @classmethod
    def from_config(cls, app: Any, path: str | Path, *, table: Any = None, active: Path | None = None,
                    standby: Path | None = None) -> FaustScorer:
        """Everything from a failoverd configuration file: ``[worker]`` (mode, timeouts, limits),
        ``[failover]`` (signals, policy, isolation), ``[registry]`` (bundles, release log, control
        topic), ``[kafka]`` (to read the control topic), ``[state] directory`` (unpacked bundles),
        the formats. ``active``/``standby``: bundle files instead of the registry's channels."""
        from daemon.config import load
        from daemon.engine.worker import configure

        settings = load(path)
        configure(settings)  # boundary, formats, bindings: process-wide, as in the daemon (app.py)
        return cls(app, Scorer(Options.from_settings(settings), active=active, standby=standby,
                               integration=INTEGRATION), table=table, settings=settings)

    @classmethod
    def from_bundles(cls, app: Any, active: Path, standby: Path | None = None, *, table: Any = None,
                     **options: Any) -> FaustScorer:
        """Explicit bundle files and :class:`Options` fields; no registry, no control topic unless given."""
        return cls(app, Scorer(Options(**options), active=Path(active), standby=standby and Path(standby),
                               integration=INTEGRATION), table=table)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the releases (once; every caller waits for the same start)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self.scorer.start())
        await asyncio.shield(self._started)

    async def stop(self) -> None:
        started = self._started
        if started is not None and not started.done():
            # stopped while the releases load (faust cancels its tasks at shutdown): the load is
            # shielded for its other callers, so cancel it here; a worker being started is killed
            started.cancel()
            await asyncio.gather(started, return_exceptions=True)
        await self.scorer.stop()

    async def _run(self) -> None:
        try:
            await self.start()
            await asyncio.Event().wait()  # until faust cancels its tasks at shutdown
        finally:
            await self.stop()

    @property
    def active(self) -> LoadedRelease | None:
        return self.scorer.active

    @property
    def standby(self) -> LoadedRelease | None:
        return self.scorer.standby

    # ---- scoring ---------------------------------------------------------------------------
    async def score(self, events: Sequence[Any]) -> list[Scored]:
        """Score a batch of faust events (from ``stream.take_events``); one :class:`Scored` per
        event, in order. New states go to the Table before it returns."""
        await self.start()
        if not events:
            return []
        table = self.table
        skey_of: dict[Any, int] = {}
        keys: list[Any] = []
        items = []
        for ev in events:
            msg = ev.message
            raw = msg.value if isinstance(msg.value, (bytes, bytearray)) else ev.value
            if not isinstance(raw, (bytes, bytearray)):
                raise TypeError("FaustScorer.score needs the raw value bytes; fix: declare the source topic with "
                                "value_serializer='raw' (value_type=bytes)")
            tkey = ev.key
            if tkey is None or table is None:
                skey = NO_STATE
            else:
                skey = skey_of.get(tkey, -2)
                if skey == -2:
                    skey = skey_of[tkey] = len(keys)
                    keys.append(tkey)
            items.append((_key_bytes(msg.key), bytes(raw), skey))
            tp = (msg.topic, msg.partition)
            if tp not in self._partitions:
                self._partitions.add(tp)
                im.init_partition_labels(INTEGRATION, msg.topic, msg.partition)
            im.RECORDS_IN.labels(INTEGRATION, msg.topic, str(msg.partition)).inc()

        def states_for(rel: LoadedRelease) -> list[bytes | None]:
            out: list[bytes | None] = []
            for k in keys:
                entry = table.get(k) if table is not None else None
                state = entry.get(rel.ns) if isinstance(entry, dict) else None
                out.append(orjson.dumps(state) if state is not None else None)
            return out

        answer = await self.scorer.score(items, states_for)
        rel = answer.release
        if table is not None and answer.states:
            last_partition = {}
            for ev, (_, _, skey) in zip(events, items):
                if skey != NO_STATE:
                    last_partition[skey] = ev.message.partition
            for skey, state in answer.states.items():
                self._set_state(keys[skey], rel.ns, state, last_partition[skey])
        provenance = rel.headers
        out = []
        for ev, item, result in zip(events, items, answer.results):
            msg = ev.message
            where = source_headers(msg.topic.encode(), str(msg.partition).encode(), msg.offset)
            p = str(msg.partition)
            if result[0] == OK:
                im.RECORDS_OUT.labels(INTEGRATION, msg.topic, p).inc()
                out.append(Scored(ev, True, result[1], [*provenance, *where], rel.ref))
            else:
                reason, detail = result[1], result[2]
                im.RECORDS_DEAD_LETTERED.labels(INTEGRATION, msg.topic, p, reason).inc()
                hs = dead_letter_headers(_headers(msg), reason, detail, [*provenance, *where])
                out.append(Scored(ev, False, item[1], hs, rel.ref, reason, detail))
        return out

    def _set_state(self, key: Any, ns: str, state: bytes | None, partition: int) -> None:
        """``table[key][ns] = state``, its changelog record to ``partition`` (the event's: faust's
        rule for Table writes in an agent, where ``take`` leaves no single current event)."""
        table = self.table
        old = table.get(key)
        entry = dict(old) if isinstance(old, dict) else {}
        if state is None:
            entry.pop(ns, None)
        else:
            entry[ns] = orjson.loads(state)
        table.send_changelog(partition, key, entry)
        table.data[key] = entry

    async def send(self, scored: Scored, output: Any, dead_letters: Any) -> Any:
        """Send one result: an output to ``output``, a dead letter to ``dead_letters`` (faust
        topics with raw values), with its headers; the key is the input's."""
        topic = output if scored.ok else dead_letters
        return await topic.send(key=scored.key, value=scored.value, headers=scored.headers)

    @staticmethod
    def release_headers(release: LoadedRelease) -> list[tuple[str, bytes]]:
        """The provenance headers of a release (what every output of it carries)."""
        return release_headers(release.info)


def _key_bytes(key: Any) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, (bytearray, memoryview)):
        return bytes(key)
    return str(key).encode()


def _headers(msg: Any) -> list[tuple[str, bytes | None]]:
    hs = msg.headers
    if not hs:
        return []
    if isinstance(hs, dict):
        return list(hs.items())
    return [(k, v) for k, v in hs]
