"""``failoverd dlq list|replay``: inspect dead letters, and send them back once the cause is fixed."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

from daemon.engine.headers import DLQ_REASONS
from daemon.errors import ConfigError
from daemon.progress import Progress

DEFAULT_TIMEOUT_S = 30.0


def register(sub) -> None:
    p = sub.add_parser("dlq", help="list dead letters, or replay them to their source topic",
                       description="Read the dead-letter topic (read_committed, from the beginning up to its end "
                                   "when the command starts). `list` counts the dead letters by reason and source "
                                   "and shows the first ones; `replay` sends the selected ones back (original key, "
                                   "value and headers, plus fd.replayed.from) to the source topic and partition "
                                   "they came from, or to --to, so they go through the model again once the cause "
                                   "is fixed (a corrected upstream schema, a new release). Replay is idempotent: each "
                                   "replayed dead letter is marked (a marker record on the dead-letter topic, "
                                   "written in the same transaction as the replayed record) and is not sent again "
                                   "unless --force; `list` shows which were replayed. Dead letters whose value "
                                   "was truncated (oversized) cannot be replayed and are reported.")
    actions = p.add_subparsers(dest="dlq_action", metavar="ACTION", required=True)
    for name, help_text in (("list", "count and show dead letters"),
                            ("replay", "send the selected dead letters back to their source (or --to)")):
        a = actions.add_parser(name, help=help_text, epilog=(
            "exit status: 0 every selected dead letter was sent (or would be, with --dry-run), or had been "
            "replayed before; 3 some could not be (values truncated when dead-lettered, null values, no source "
            "headers): they are listed; 1 Kafka unreachable, too slow (--timeout) or the replay was "
            "interrupted (run it again: what was sent is skipped); 2 bad arguments, configuration, or the "
            "dead-letter topic does not exist") if name == "replay" else (
            "exit status: 0 listed; 1 Kafka unreachable or too slow (--timeout); 2 bad arguments, "
            "configuration, or the dead-letter topic does not exist"))
        a.add_argument("--config", type=Path, default=Path("config/failoverd.toml"),
                       help="configuration naming the brokers and dead_letter.topic (default: %(default)s)")
        a.add_argument("--reason", action="append", choices=DLQ_REASONS, default=[],
                       help="only dead letters with this reason (repeatable)")
        a.add_argument("--source-topic", help="only dead letters of this input topic")
        a.add_argument("--since", help="only dead letters written at or after this time (ISO 8601, UTC if no zone)")
        a.add_argument("--until", help="only dead letters written before this time (ISO 8601)")
        a.add_argument("--limit", type=int, help="at most this many (the oldest first)")
        a.add_argument("--json", action="store_true", help="print JSON instead of text")
        a.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                       help="give up reading the dead-letter topic (and, for replay, each transaction) after this "
                            "long (default: %(default)s)")
        if name == "replay":
            a.add_argument("--to", metavar="TOPIC", help="send to this topic (key-hash partitioning) instead of the "
                                                          "source topic and partition")
            a.add_argument("--dry-run", action="store_true", help="show what would be replayed, send nothing")
            a.add_argument("--force", action="store_true",
                           help="also send dead letters that were replayed before (they are marked again)")
            a.set_defaults(func=run_replay)
        else:
            a.add_argument("--show", type=int, default=20, help="dead letters to show in text mode (default: %(default)s)")
            a.set_defaults(func=run_list)


def _time_ms(flag: str, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: not an ISO 8601 time; e.g. 2026-11-27T09:30:00Z") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


def _select(args):
    from daemon import config
    from daemon.deadletters import Selection

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: must be at least 1")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout:g}: must be more than 0 seconds")
    settings = config.load(args.config)
    selection = Selection(reasons=frozenset(args.reason), source_topic=args.source_topic,
                          since_ms=_time_ms("--since", args.since), until_ms=_time_ms("--until", args.until),
                          limit=args.limit)
    return settings, selection


def _stamp(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def run_list(args) -> int:
    from daemon import deadletters

    settings, selection = _select(args)
    topic = settings.dead_letter.topic
    with Progress("dlq list") as progress:
        letters = asyncio.run(deadletters.read(settings.kafka.client_kwargs(), topic, selection, timeout=args.timeout,
                                               progress=progress))
    counts: dict[tuple[str, str], int] = {}
    for d in letters:
        k = (d.reason, f"{d.source_topic}:{d.source_partition}")
        counts[k] = counts.get(k, 0) + 1
    replayed = sum(1 for d in letters if d.replayed)
    if args.json:
        print(json.dumps({"topic": topic, "count": len(letters), "replayed": replayed,
                          "by_reason_and_source": [{"reason": r, "source": s, "count": n}
                                                   for (r, s), n in sorted(counts.items())],
                          "dead_letters": [d.to_json() for d in letters]}, indent=1))
        return 0
    print(f"{len(letters)} dead letter(s) in {topic}" + (" matching the filters" if _filtered(args) else "")
          + (f", {replayed} of them replayed" if replayed else ""))
    for (reason, source), n in sorted(counts.items()):
        print(f"  {n:8d}  {reason:14s} from {source}")
    for d in letters[: args.show]:
        key = d.key.decode("utf-8", "replace") if d.key is not None else "-"
        last = d.replays[-1] if d.replays else None
        print(f"{_stamp(d.timestamp_ms)}  {d.where:>10s}  {d.reason:13s} key={key} source={d.source_topic}:"
              f"{d.source_partition}@{d.source_offset} release={d.release}{' TRUNCATED' if d.truncated else ''}"
              + (f" REPLAYED{f' x{len(d.replays)}' if len(d.replays) > 1 else ''} {last.get('time', '?')} "
                 f"to {last.get('to', '?')}" if last else "") + f"\n    {d.detail}")
    if len(letters) > args.show:
        print(f"... {len(letters) - args.show} more (--show N, or --json)")
    return 0


def _filtered(args) -> bool:
    return bool(args.reason or args.source_topic or args.since or args.until or args.limit)


def run_replay(args) -> int:
    from daemon import deadletters

    settings, selection = _select(args)
    kafka = settings.kafka.client_kwargs()
    topic = settings.dead_letter.topic
    with Progress("dlq replay") as progress:
        report = asyncio.run(deadletters.replay(kafka, topic, selection, to_topic=args.to, dry_run=args.dry_run,
                                                force=args.force, timeout=args.timeout, progress=progress))
    verb = "would replay" if args.dry_run else "replayed"
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "selected": report.selected,
                          "replayed": [d.to_json() for d in report.replayed],
                          "already_replayed": [d.to_json() for d in report.already],
                          "skipped": report.skipped}, indent=1))
    else:
        print(f"{verb} {len(report.replayed)} of {report.selected} selected dead letter(s) from {topic}"
              + (f" to {args.to}" if args.to else " to their source partitions"))
        for d in report.replayed[:20]:
            print(f"  {d.where:>10s} {d.reason:13s} -> {args.to or f'{d.source_topic}:{d.source_partition}'}"
                  + (" (again: --force)" if d.replayed else ""))
        if len(report.replayed) > 20:
            print(f"  ... {len(report.replayed) - 20} more")
        if report.already:
            print(f"  already replayed {len(report.already)}: not sent again (--force sends them again)")
        for why, n in report.skipped.items():
            print(f"  skipped {n}: {why}")
    return 0 if not report.skipped else 3
