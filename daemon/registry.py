"""The registry: bundles stored by digest, and the append-only release log.

Layout of a registry directory::

    bundles/<digest>.fdb         the archives, content-addressed (BundleStore)
    bundles/<digest>.json        their MANIFEST.json, for lookups without unpacking
    unpacked/<digest>/           verified unpacked copies (a cache; safe to delete)
    releases.jsonl               the release log: one JSON object per line, fsync'd, never rewritten
    .lock                        serializes writers (flock)

A release log entry (:class:`Release`) records when (UTC ISO time and epoch seconds), which
channel (``active`` or ``standby``), which bundle (name, version, digest), who, why and what
kind of event (``promote``, ``rollback``, ``failover``). The state of a channel is its latest
entry in time order; ``history(at=...)`` answers "what was active then".

Promotion refuses, writing nothing, a bundle that does not verify or whose schemas are
incompatible with the active release's (rule: :mod:`daemon.bundle.compat`). Rollbacks and
failovers return to releases that already served the topic, so only integrity is checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import filecmp
import getpass
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload

import orjson

from daemon.bundle import compat
from daemon.bundle.loader import Bundle, open_bundle
from daemon.bundle.manifest import canonical_json
from daemon.errors import BundleError, RegistryError

if TYPE_CHECKING:
    from daemon.clients import Target  # aiokafka loads only when a command talks to Kafka

CHANNELS = ("active", "standby")
KINDS = ("promote", "rollback", "failover")
LOG_NAME = "releases.jsonl"
_DIGEST_RE = re.compile(r"^[0-9a-f]{8,64}$")
_OPTIONAL = frozenset({"source", "bindings"})  # release entries written before these fields existed stay valid


@dataclasses.dataclass(frozen=True)
class Release:
    id: str
    time: str
    epoch: float
    channel: str
    name: str
    version: str
    digest: str
    who: str
    why: str
    kind: str
    source: str | None = None
    """Where the bundle came from into this registry (``bundle pull``/``push``, a fetch), when known."""
    bindings: dict[str, str] | None = None
    """{name: content digest} of the bindings the bundle declares, as bound where it was promoted
    (docs/bundles.md#bindings); None when it declares none or the promotion did not check them."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: object, where: str = "release") -> Release:
        if not isinstance(doc, dict):
            raise RegistryError(f"{where}: expected a JSON object, got {type(doc).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - doc.keys() - _OPTIONAL)
        if missing:
            raise RegistryError(f"{where}: release entry lacks {', '.join(missing)}")
        r = cls(**{k: doc[k] for k in fields if k in doc})
        if r.channel not in CHANNELS or r.kind not in KINDS or not isinstance(r.epoch, (int, float)):
            raise RegistryError(f"{where}: release entry has channel={r.channel!r} kind={r.kind!r} "
                                f"epoch={r.epoch!r}; expected channel in {CHANNELS}, kind in {KINDS}")
        return r


def default_who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = f"uid{os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def _iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BundleStore(Protocol):
    """Where archives live. The local directory is the one implementation; an object store could follow."""

    def put(self, digest: str, archive: Path, manifest: dict[str, Any]) -> Path: ...
    def path(self, digest: str) -> Path | None: ...
    def manifest(self, digest: str) -> dict[str, Any] | None: ...
    def digests(self) -> list[str]: ...


class LocalBundleStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, digest: str, archive: Path, manifest: dict[str, Any]) -> Path:
        """Store ``archive`` under ``digest``. Stored bytes are never replaced: the same bytes
        again is a no-op, different bytes under a stored digest are refused (RegistryError)."""
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / f"{digest}.fdb"
        if dest.is_file():
            if not filecmp.cmp(archive, dest, shallow=False):
                raise RegistryError(
                    f"bundle store {self.root}: refusing to store {archive} under digest {digest[:12]}: "
                    f"{dest} already holds that digest with different bytes, and stored bytes are never replaced; fix: for a rebuild of "
                    f"the same bundle (compression may differ between builds), use the stored archive: refer to it by "
                    f"NAME@VERSION or digest, without --bundle; if `failoverd bundle verify {dest}` fails, move "
                    f"that file aside and add the archive again")
            self._write(self.root / f"{digest}.json", canonical_json(manifest))
            return dest
        self._write(self.root / f"{digest}.json", canonical_json(manifest))
        self._write(dest, Path(archive).read_bytes())
        _fsync_dir(self.root)
        return dest

    @staticmethod
    def _write(target: Path, data: bytes) -> None:
        if target.is_file() and target.read_bytes() == data:
            return
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)

    def path(self, digest: str) -> Path | None:
        p = self.root / f"{digest}.fdb"
        return p if p.is_file() else None

    def manifest(self, digest: str) -> dict[str, Any] | None:
        p = self.root / f"{digest}.json"
        doc: dict[str, Any] | None = orjson.loads(p.read_bytes()) if p.is_file() else None
        return doc

    def digests(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.fdb")) if self.root.is_dir() else []


class ReleaseLog:
    """Append-only JSON lines; each append is fsync'd. A torn last line (crash mid-write) is dropped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[Release]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        lines.pop()  # after the last newline: empty, or a write torn by a crash
        out = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise RegistryError(f"release log {self.path} line {number} is not JSON ({exc}); fix: restore the "
                                    f"file from backup; never edit the release log by hand") from None
            out.append(Release.from_dict(doc, f"release log {self.path} line {number}"))
        return out

    def append(self, releases: list[Release]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with open(self.path, "ab+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":  # drop a torn tail left by a crash
                    fh.seek(0)
                    data = fh.read()
                    fh.truncate(data.rfind(b"\n") + 1)
                    fh.seek(0, os.SEEK_END)
            fh.write(b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in releases))
            fh.flush()
            os.fsync(fh.fileno())
        if created:
            _fsync_dir(self.path.parent)


class Registry:
    def __init__(self, path: Path, *, store: BundleStore | None = None, unpack_dir: Path | None = None) -> None:
        self.path = Path(path)
        self.store: BundleStore = store or LocalBundleStore(self.path / "bundles")
        self.unpack_dir = Path(unpack_dir) if unpack_dir else self.path / "unpacked"
        self.log = ReleaseLog(self.path / LOG_NAME)

    def __repr__(self) -> str:
        return f"<Registry {self.path}>"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    # -- bundles ---------------------------------------------------------------------------

    def add(self, bundle_archive: Path, *, source: str | None = None) -> str:
        """Verify the archive and store it; returns its digest. Idempotent. ``source`` (where it
        came from: a peer, another registry) is kept beside it, the first time, for the release log."""
        archive = Path(bundle_archive)
        if archive.is_dir():
            raise RegistryError(f"registry {self.path}: {archive} is a directory; the registry stores archives; "
                                f"fix: `failoverd bundle build {archive} --out DIR` and add the .fdb")
        try:
            bundle = open_bundle(archive, self.unpack_dir)
        except BundleError as exc:
            raise RegistryError(f"registry {self.path}: refusing to add {archive}: {exc}") from exc
        with self._locked():
            for digest in self.store.digests():
                m = self.store.manifest(digest) or {}
                b = m.get("bundle", {})
                if digest != bundle.digest and (b.get("name"), b.get("version")) == (bundle.name, bundle.version):
                    raise RegistryError(
                        f"registry {self.path}: refusing to add {archive}: {bundle.ref} is already stored with "
                        f"digest {digest[:12]}, and this archive has different content (digest {bundle.digest[:12]}); "
                        f"fix: bump [bundle] version in bundle.toml and rebuild: a name@version names one bundle")
            self.store.put(bundle.digest, archive, bundle.manifest)
            if source and self.bundle_dir is not None and not self._source_file(bundle.digest).exists():
                self._source_file(bundle.digest).write_text(source + "\n", encoding="utf-8")
        return bundle.digest

    def _source_file(self, digest: str) -> Path:
        assert self.bundle_dir is not None
        return self.bundle_dir / f"{digest}.source"

    def source_of(self, digest: str) -> str | None:
        """Where the bundle came from into this registry (None: added from a file here, or unknown)."""
        if self.bundle_dir is None:
            return None
        try:
            return self._source_file(digest).read_text(encoding="utf-8").strip() or None
        except FileNotFoundError:
            return None

    def find(self, name: str, version: str) -> str:
        for digest in self.store.digests():
            b = (self.store.manifest(digest) or {}).get("bundle", {})
            if (b.get("name"), b.get("version")) == (name, version):
                return digest
        known = sorted({self._ref_of(d) for d in self.store.digests()})
        raise RegistryError(f"registry {self.path}: no bundle {name}@{version} (stored: {', '.join(known) or 'none'}); "
                            f"fix: add it with `failoverd release promote {name}@{version} --bundle PATH ...`")

    def resolve(self, ref: str) -> str:
        """Digest of ``name@version``, a full digest, or an unambiguous digest prefix (8+ hex chars)."""
        if "@" in ref:
            name, version = ref.rsplit("@", 1)
            return self.find(name, version)
        if _DIGEST_RE.match(ref):
            matches = [d for d in self.store.digests() if d.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise RegistryError(f"registry {self.path}: digest prefix {ref} is ambiguous; give more digits")
            raise RegistryError(f"registry {self.path}: no bundle with digest {ref}; fix: add it first "
                                f"(`--bundle PATH`) or check `failoverd release status`")
        raise RegistryError(f"registry {self.path}: {ref!r} is neither NAME@VERSION nor a digest")

    @property
    def bundle_dir(self) -> Path | None:
        """Where the local store keeps archives (None for another store)."""
        return self.store.root if isinstance(self.store, LocalBundleStore) else None

    def bundle_path(self, digest: str, *, missing_ok: bool = False) -> Path:
        """The archive of ``digest``. ``missing_ok``: where it will be once fetched
        (daemon/distribution), instead of a RegistryError, when it is not stored yet."""
        p = self.store.path(digest)
        if p is None and missing_ok and self.bundle_dir is not None:
            return self.bundle_dir / f"{digest}.fdb"
        if p is None:
            raise RegistryError(f"registry {self.path}: bundle {digest[:12]} is not stored here; fix: add its "
                                f"archive (`failoverd release promote ... --bundle PATH`)")
        return p

    def open(self, digest: str) -> Bundle:
        """The stored bundle, verified and unpacked (BundleError/IntegrityError if it does not verify)."""
        return open_bundle(self.bundle_path(digest), self.unpack_dir, expect_digest=digest)

    def _ref_of(self, digest: str) -> str:
        b = (self.store.manifest(digest) or {}).get("bundle", {})
        return f"{b.get('name')}@{b.get('version')}"

    # -- releases --------------------------------------------------------------------------

    def _ordered(self) -> list[Release]:
        entries = self.log.read()
        return [r for _, r in sorted(enumerate(entries), key=lambda ir: (ir[1].epoch, ir[0]))]

    def status(self) -> dict[str, Release | None]:
        current: dict[str, Release | None] = {c: None for c in CHANNELS}
        for r in self._ordered():
            current[r.channel] = r
        return current

    @overload
    def history(self, at: None = None) -> list[Release]: ...
    @overload
    def history(self, at: datetime.datetime) -> Release | None: ...

    def history(self, at: datetime.datetime | None = None) -> list[Release] | Release | None:
        """Every release in time order; with ``at``, the release active at that moment (or None)."""
        entries = self._ordered()
        if at is None:
            return entries
        if at.tzinfo is None:
            at = at.replace(tzinfo=datetime.UTC)
        t = at.timestamp()
        active = None
        for r in entries:
            if r.epoch > t:
                break
            if r.channel == "active":
                active = r
        return active

    def _verified(self, digest: str, action: str) -> Bundle:
        """The bundle, after re-hashing the stored archive itself (open_bundle does, before its cache)."""
        try:
            return self.open(digest)
        except BundleError as exc:
            raise RegistryError(f"registry {self.path}: refusing to {action} {self._ref_of(digest)}: {exc}") from exc

    def _append(self, channel: str, bundle: Bundle, reason: str, who: str | None, kind: str,
                bindings: dict[str, str] | None = None) -> Release:
        last = max((r.epoch for r in self.log.read()), default=0.0)
        epoch = max(time.time(), last + 1e-6)  # strictly increasing even if the clock steps back
        release = Release(id=uuid.uuid4().hex, time=_iso(epoch), epoch=epoch, channel=channel, name=bundle.name,
                          version=bundle.version, digest=bundle.digest, who=who or default_who(), why=reason,
                          kind=kind, source=self.source_of(bundle.digest), bindings=bindings or None)
        self.log.append([release])
        return release

    @staticmethod
    def _check_args(channel: str, reason: str | None, kind: str) -> str:
        """The reason, once channel, kind and reason are all valid."""
        if channel not in CHANNELS:
            raise RegistryError(f"unknown channel {channel!r}; use one of {', '.join(CHANNELS)}")
        if kind not in KINDS:
            raise RegistryError(f"unknown release kind {kind!r}; use one of {', '.join(KINDS)}")
        if not reason or not reason.strip():
            raise RegistryError("a release needs a reason (--reason TEXT): the log says why every change was made")
        return reason

    def promote(self, ref: str, channel: str, reason: str, who: str | None = None, kind: str = "promote", *,
                check_schemas: bool = True, bindings: Mapping[str, Path] | None = None) -> Release:
        """Put the bundle ``ref`` (name@version or digest) on ``channel``; returns the log entry.

        Promoting what a channel already holds writes nothing and returns the current entry.
        ``bindings``: this environment's ``[bindings]`` (name -> path). Given, a bundle declaring a
        binding it lacks is refused, and the entry records every declared binding's content digest;
        None (a failover between releases already promoted) checks and records nothing.
        """
        self._check_args(channel, reason, kind)
        with self._locked():
            digest = self.resolve(ref)
            bundle = self._verified(digest, "promote")
            bound = self._bound(bundle, channel, bindings) if bindings is not None else None
            current = self.status()
            held = current[channel]
            if held is not None and held.digest == digest:
                return held
            active = current["active"]
            if check_schemas and kind == "promote" and active is not None and active.digest != digest:
                try:
                    serving = self.open(active.digest)
                except (BundleError, RegistryError) as exc:
                    raise RegistryError(f"registry {self.path}: cannot check {bundle.ref} against the active release "
                                        f"{active.ref}, whose bundle is unavailable: {exc}") from exc
                problems = compat.incompatibilities(serving.input_schema, serving.output_schema,
                                                    bundle.input_schema, bundle.output_schema)
                if problems:
                    raise RegistryError(
                        f"registry {self.path}: refusing to promote {bundle.ref} to {channel}: its schemas are "
                        f"incompatible with the active release {active.ref}:\n  " + "\n  ".join(problems)
                        + "\nfix: keep the new schemas compatible (docs/bundles.md#compatibility), or promote with "
                          "--allow-incompatible-schema once the topic and its consumers have been migrated")
            return self._append(channel, bundle, reason, who, kind, bound)

    def _bound(self, bundle: Bundle, channel: str, bindings: Mapping[str, Path]) -> dict[str, str]:
        """{name: content digest} of the bundle's declared bindings; RegistryError if one is not bound."""
        from daemon.bundle import bindings as bb

        try:
            return bb.digests(bb.resolve(bundle.declared_bindings, bindings, bundle.ref))
        except BundleError as exc:
            raise RegistryError(f"registry {self.path}: refusing to promote {bundle.ref} to {channel}: {exc}") from None
        except OSError as exc:
            raise RegistryError(f"registry {self.path}: refusing to promote {bundle.ref} to {channel}: cannot read "
                                f"a binding: {exc}; fix: check [bindings] of the failoverd configuration") from None

    def rollback(self, to: str | None = None, reason: str | None = None, who: str | None = None,
                 channel: str = "active") -> Release:
        """Return ``channel`` to ``to``, by default to the release it held before the current one."""
        reason = self._check_args(channel, reason, "rollback")
        with self._locked():
            entries = [r for r in self._ordered() if r.channel == channel]
            if not entries:
                raise RegistryError(f"registry {self.path}: nothing to roll back: channel {channel} "
                                    f"never had a release")
            current = entries[-1]
            if to is None:
                previous = [r for r in entries if r.digest != current.digest]
                if not previous:
                    raise RegistryError(f"registry {self.path}: nothing to roll back to: {current.ref} is the only "
                                        f"release channel {channel} ever had; fix: promote another bundle instead")
                digest = previous[-1].digest
            else:
                digest = self.resolve(to)
                if not any(r.digest == digest for r in entries):
                    raise RegistryError(f"registry {self.path}: cannot roll back to {to}: it was never on channel "
                                        f"{channel}; fix: use `failoverd release promote` for a new release")
                if digest == current.digest:
                    raise RegistryError(f"registry {self.path}: {to} is already on channel {channel}; nothing to do")
            bundle = self._verified(digest, "roll back to")
            return self._append(channel, bundle, reason, who, "rollback")

    # -- agreement with the control topic ----------------------------------------------------

    def apply_events(self, events: Iterable[dict[str, Any]]) -> list[Release]:
        """Append the release events (from the control topic) this log does not have yet; returns them.

        Events :func:`daemon.control.check_event` refuses are skipped, logged and counted."""
        from daemon import control
        from daemon.distribution import peers

        with self._locked():
            known = {r.id for r in self.log.read()}
            new: dict[str, Release] = {}
            for event in events:
                try:
                    control.check_event(event)
                except control.InvalidEvent as exc:
                    control.skipped(exc.reason, str(exc), where="release log sync")
                    continue
                # who announced holding the bundle (release and holding events): a source to fetch it
                # from. ControlReader notes every event it reads too; noting one again is harmless.
                peers.note_event(event)
                if event.get("type") != "release":
                    continue
                doc = {k: v for k, v in event.items() if k != "type"}
                r = Release.from_dict(doc, "control topic release event")
                if r.id not in known:
                    new[r.id] = r
            ordered = sorted(new.values(), key=lambda r: (r.epoch, r.id))
            if ordered:
                self.log.append(ordered)
            return ordered

    async def sync_from_topic(self, kafka: Target, topic: str, timeout: float = 30.0) -> list[Release]:
        """Read the control topic to its end and append the releases missing here."""
        from daemon.control import ControlReader

        async with ControlReader(kafka, topic, timeout=timeout) as reader:
            return self.apply_events(reader.release_events())
