"""``failoverd release promote|rollback|status|history|sync``: the release log (docs/bundles.md).

The registry directory comes from ``--registry DIR`` or the configuration's ``[registry] path``.
Promotions and rollbacks are also published to the control topic when Kafka is configured
(``--bootstrap``/``--control-topic`` or the configuration) unless ``--no-publish``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
from pathlib import Path

from daemon.commands import UsageError, input_file
from daemon.errors import ConfigError, ControlTopicError, RegistryError

DEFAULT_CONFIG = Path("config/failoverd.toml")
PUBLISH_TIMEOUT = 10.0


def register(sub) -> None:
    p = sub.add_parser("release", help="promote, roll back and list releases (the release log)",
                       description="Put bundles on the active/standby channels, roll back, and read the append-only "
                                   "release log. See docs/bundles.md.")
    rsub = p.add_subparsers(dest="release_command", metavar="ACTION", required=True)

    def common(q, kafka: bool = False, publishes: bool = False):
        q.add_argument("--config", type=Path, default=None,
                       help=f"configuration file (default {DEFAULT_CONFIG} when it exists)")
        q.add_argument("--registry", type=Path, help="registry directory (overrides [registry] path)")
        if kafka or publishes:
            q.add_argument("--bootstrap", help="Kafka bootstrap servers (overrides the configuration)")
            q.add_argument("--control-topic", help="control topic (overrides [registry] control_topic)")
        if publishes:
            q.add_argument("--no-publish", action="store_true", help="do not publish the change to the control topic")
        if kafka or publishes:
            q.add_argument("--json", action="store_true",
                           help="print the result as JSON (notes and warnings stay on stderr)")

    q = rsub.add_parser("promote", help="put NAME@VERSION (or a digest) on a channel")
    q.add_argument("ref", metavar="NAME@VERSION", help="bundle name@version, or its digest (prefix)")
    q.add_argument("--channel", required=True, choices=["active", "standby"],
                   help="active: produces the outputs; standby: takes over when the active release fails")
    q.add_argument("--reason", required=True, help="why (recorded in the release log)")
    q.add_argument("--bundle", type=Path, help="add this .fdb archive to the registry first")
    q.add_argument("--allow-incompatible-schema", action="store_true",
                   help="promote even if the schemas break the compatibility rule (after migrating the topic)")
    q.add_argument("--who", help="who makes the change (default user@host)")
    common(q, publishes=True)
    q.set_defaults(func=run_promote)

    q = rsub.add_parser("rollback", help="return the active channel to an earlier release")
    q.add_argument("--to", metavar="NAME@VERSION", help="target (default: the release active before the current one)")
    q.add_argument("--reason", required=True, help="why (recorded in the release log)")
    q.add_argument("--rescore", action="store_true",
                   help="also re-run the inputs the rolled-back release handled through the restored one and "
                        "write the results as corrections (header fd.correction)")
    q.add_argument("--who", help="who makes the change (default user@host)")
    common(q, publishes=True)
    q.set_defaults(func=run_rollback)

    q = rsub.add_parser("status", help="what is active and standby")
    q.add_argument("--json", action="store_true", help="print {active, standby} as JSON (null when empty)")
    common(q)
    q.set_defaults(func=run_status)

    q = rsub.add_parser("history", help="the release log, or what was active at a moment (--at)")
    q.add_argument("--json", action="store_true", help="print the releases (or, with --at, the active one) as JSON")
    q.add_argument("--at", metavar="TIMESTAMP", help="ISO 8601 time (UTC if no offset), e.g. 2024-06-02T14:05:00Z")
    common(q)
    q.set_defaults(func=run_history)

    q = rsub.add_parser("sync", help="append the releases published on the control topic that this registry lacks")
    common(q, kafka=True)
    q.set_defaults(func=run_sync)


# -- configuration (daemon.config is imported only when needed) -------------------------------

def _settings(args):
    """The Settings from --config (or the default file when it exists), else None."""
    explicit = args.config is not None
    path = args.config if explicit else DEFAULT_CONFIG
    if not path.exists():
        if explicit:
            raise ConfigError(f"configuration file {path} does not exist; fix: pass an existing file to --config")
        return None
    from daemon import config
    from daemon.bundle import archive

    settings = config.load(path)
    archive.configure(archive.Limits(settings.registry.bundle_max_unpacked_bytes, settings.registry.bundle_max_members))
    return settings


def _registry(args, *, must_exist: bool = False):
    """The registry of --registry or the configuration. ``must_exist``: reading commands refuse a
    directory that is not there (a typo would otherwise read as "nothing released")."""
    from daemon.registry import Registry

    if args.registry is not None:
        path, named = args.registry, "--registry"
    else:
        settings = _settings(args)
        if settings is None:
            raise ConfigError(f"no registry: pass --registry DIR, or a configuration with [registry] path "
                              f"(--config FILE; default {DEFAULT_CONFIG} does not exist)")
        path, named = Path(settings.registry.path), f"[registry] path of {settings.source}"
    if path.exists() and not path.is_dir():
        raise UsageError(f"registry {path} ({named}) is not a directory; fix: name the registry directory")
    if must_exist and not path.is_dir():
        raise UsageError(f"registry {path} ({named}) does not exist: nothing was ever promoted there; fix: check "
                         "the path, or promote a release first (`failoverd release promote ... --bundle FILE`)")
    return Registry(path)


def _kafka_target(args) -> tuple[dict | None, str | None, str]:
    """(client kwargs, control topic, why not) for publishing or syncing."""
    settings = None
    if not (args.bootstrap and args.control_topic):
        settings = _settings(args)
    kwargs = {"bootstrap_servers": args.bootstrap} if args.bootstrap else (
        settings.kafka.client_kwargs() if settings is not None else None)
    topic = args.control_topic or (settings.registry.control_topic if settings is not None else None)
    if kwargs is None or not topic:
        return None, None, "no Kafka configured (--bootstrap and --control-topic, or --config FILE)"
    return kwargs, topic, ""


def _publish(args, release, extra: dict | None = None) -> str | None:
    """Publish the release event; the control topic it went to, or None (a note on stderr says why)."""
    if args.no_publish:
        return None
    kwargs, topic, why_not = _kafka_target(args)
    if kwargs is None or topic is None:
        print(f"note: not published to a control topic: {why_not}", file=sys.stderr)
        return None
    from daemon.control import publish, release_event

    try:
        asyncio.run(publish(kwargs, topic, dict(release_event(release), **(extra or {})), timeout=PUBLISH_TIMEOUT))
    except ControlTopicError as exc:
        print(f"warning: recorded in the release log but NOT published, so running daemons do not know yet: {exc}\n"
              f"fix: re-run the same command once the broker is reachable (it is idempotent)", file=sys.stderr)
        return None
    return topic


def _upload(args, registry, digest: str) -> None:
    """With ``[registry] bundle_store``, put the archive there once (keyed by digest) for every instance."""
    settings = _settings(args) if args.registry is None else None
    url = getattr(getattr(settings, "registry", None), "bundle_store", None)
    if not url:
        return
    from daemon.distribution.objectstore import ObjectStoreSource

    new = ObjectStoreSource(url).upload(digest, registry.bundle_path(digest))
    _say(args, f"{'uploaded' if new else 'already in'} {url}/{digest}.fdb")


def _holders(args) -> dict:
    """``holders`` of a release event: the daemon of --config serves the bundle this registry holds
    to the other instances (daemon/distribution); none without a configuration."""
    if args.registry is not None:
        return {}
    settings = _settings(args)
    if settings is None:
        return {}
    from daemon.distribution.peers import advertise_url

    return {"holders": [advertise_url(settings)]}


def _say(args, text: str) -> None:
    """A progress line of the text output (``--json`` prints one document at the end instead)."""
    if not getattr(args, "json", False):
        print(text)


# -- commands ----------------------------------------------------------------------------------

def _line(r) -> str:
    return f"{r.time}  {r.channel:<7}  {r.kind:<8}  {r.ref}  {r.digest[:12]}  by {r.who}: {r.why}"


def run_promote(args) -> int:
    if args.bundle is not None:
        input_file("--bundle", args.bundle)
    registry = _registry(args)
    added = None
    if args.bundle is not None:
        added = registry.add(args.bundle)
        _say(args, f"added {args.bundle} as {added}")
        _upload(args, registry, added)
    _check_environment(args, registry)
    if not args.allow_incompatible_schema:
        _check_output_subject(args, registry)
    before = registry.status()[args.channel]
    settings = _settings(args)  # its [bindings]: a bundle declaring one this environment lacks is refused
    release = registry.promote(args.ref, args.channel, args.reason, who=args.who,
                               check_schemas=not args.allow_incompatible_schema,
                               bindings=settings.bindings if settings is not None else {})
    changed = before is None or before.id != release.id
    if changed:
        _say(args, f"promoted {release.ref} ({release.digest[:12]}) to {release.channel}")
    else:
        _say(args, f"{release.ref} is already on channel {release.channel} (since {release.time}); nothing written")
    topic = _publish(args, release, _holders(args))
    _published(args, topic, {"added": added, "changed": changed, "release": release.to_dict()})
    return 0


def _check_environment(args, registry) -> None:
    """Build (or find) the release's own Python environment before it may go on a channel: a lock
    that cannot be installed here refuses the promotion, naming the package (BundleError).
    The environment goes where the daemon of this configuration looks (``<[state] directory>/envs``),
    so the daemon starts the release without building anything."""
    import time

    from daemon.bundle import environments

    settings = _settings(args)
    envs = Path(settings.state.directory) / "envs" if settings is not None else environments.envs_dir_for(None)
    bundle = registry.open(registry.resolve(args.ref))
    t0 = time.monotonic()
    env = environments.ensure_env(bundle, envs)
    if env is not None:
        _say(args, f"environment of {bundle.ref} ready: {env} ({time.monotonic() - t0:.1f}s)")


def _check_output_subject(args, registry) -> None:
    """An Avro output schema must be compatible with the output topic's subject in the schema
    registry (daemon/formats/compat.py); RegistryError with the registry's reason if not."""
    from daemon.formats.compat import check_output_schema

    note = check_output_schema(_settings(args), registry.open(registry.resolve(args.ref)))
    if note:
        _say(args, note)


def _published(args, topic: str | None, doc: dict) -> None:
    if args.json:
        print(json.dumps(dict(doc, published_to=topic), indent=2))
    elif topic is not None:
        print(f"published to control topic {topic}")


def run_rollback(args) -> int:
    registry = _registry(args)
    release = registry.rollback(args.to, args.reason, who=args.who)
    _say(args, f"rolled back {release.channel} to {release.ref} ({release.digest[:12]})")
    topic = _publish(args, release, {"rescore": True} if args.rescore else None)
    _published(args, topic, {"release": release.to_dict(), "rescore": args.rescore})
    return 0


def run_status(args) -> int:
    registry = _registry(args, must_exist=True)
    status = registry.status()
    if args.json:
        print(json.dumps({c: (r.to_dict() if r else None) for c, r in status.items()}, indent=2))
        return 0
    for channel, r in status.items():
        print(f"{channel:<7}  " + (f"{r.ref}  {r.digest[:12]}  since {r.time} ({r.kind} by {r.who}: {r.why})"
                                   if r else "(none)"))
    return 0


def _parse_at(text: str) -> datetime.datetime:
    try:
        at = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise RegistryError(f"--at {text!r} is not an ISO 8601 time; e.g. --at 2024-06-02T14:05:00Z") from None
    return at if at.tzinfo else at.replace(tzinfo=datetime.UTC)


def run_history(args) -> int:
    registry = _registry(args, must_exist=True)
    if args.at:
        at = _parse_at(args.at)
        r = registry.history(at)
        if args.json:
            print(json.dumps({"at": at.isoformat(), "active": r.to_dict() if r else None}, indent=2))
        elif r is None:
            print(f"nothing was active at {at.isoformat()}")
        else:
            print(f"active at {at.isoformat()}: {r.ref} ({r.digest[:12]})\n  {_line(r)}")
        return 0
    entries = registry.history()
    if args.json:
        print(json.dumps([r.to_dict() for r in entries], indent=2))
    else:
        for r in entries:
            print(_line(r))
        if not entries:
            print("(no releases yet)")
    return 0


def run_sync(args) -> int:
    registry = _registry(args)
    kwargs, topic, why_not = _kafka_target(args)
    if kwargs is None or topic is None:
        raise ConfigError(f"cannot sync: {why_not}")
    new = asyncio.run(registry.sync_from_topic(kwargs, topic))
    if args.json:
        print(json.dumps({"control_topic": topic, "added": [r.to_dict() for r in new]}, indent=2))
        return 0
    for r in new:
        print(f"synced {_line(r)}")
    print(f"{len(new)} release(s) added from control topic {topic}")
    return 0
