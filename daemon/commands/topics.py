"""``failoverd topics apply|check``: Kafka topics as code (config/topics.toml)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

from daemon import config, topics
from daemon.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("topics", help="create or check the Kafka topics declared in config/topics.toml",
                       description="Compare the topics declared in a topics file (partitions, replication "
                                   "factor, declared configs) with the cluster. `apply` creates missing topics, "
                                   "adds partitions and fixes drifted configs; `check` lists every difference "
                                   "(exit 1) or confirms the cluster is in sync (exit 0). Both refuse unsafe "
                                   "plans: input retention shorter than the replay window, changelog, "
                                   "checkpoint or control topics that are not compacted.")
    actions = p.add_subparsers(dest="topics_action", metavar="ACTION", required=True)
    for name, help_text in (("apply", "create missing topics, add partitions, alter drifted configs"),
                            ("check", "list every difference between the file and the cluster")):
        a = actions.add_parser(name, help=help_text)
        a.add_argument("--topics", default="config/topics.toml", help="topics file (default: %(default)s)")
        a.add_argument("--config", default="config/failoverd.toml",
                       help="daemon configuration: Kafka connection and checkpoint interval (default: %(default)s)")
        a.add_argument("--bootstrap", help="host:port[,host:port] overriding kafka.bootstrap_servers")
        if name == "apply":
            a.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
        else:
            a.add_argument("--json", action="store_true",
                           help="print {in_sync, bootstrap, topics_file, differences} as JSON (exit codes as without)")
        a.set_defaults(func=run_apply if name == "apply" else run_check)


def _inputs(args) -> tuple[topics.TopicsFile, config.Settings]:
    settings = config.load(args.config)
    if args.bootstrap:
        servers = tuple(s.strip() for s in args.bootstrap.split(",") if s.strip())
        try:
            kafka = dataclasses.replace(settings.kafka, bootstrap_servers=servers)
        except ConfigError as exc:
            raise ConfigError(f"--bootstrap {args.bootstrap!r}: {exc}") from None
        settings = dataclasses.replace(settings, kafka=kafka)
    return topics.load_topics(args.topics), settings


def run_apply(args) -> int:
    spec, settings = _inputs(args)
    asyncio.run(topics.apply(spec, settings, dry_run=args.dry_run))
    return 0


def run_check(args) -> int:
    spec, settings = _inputs(args)
    plan = asyncio.run(topics.plan_for(spec, settings))
    bootstrap = plan.cluster.bootstrap
    differences = plan.differences
    if args.json:
        print(json.dumps({"in_sync": not differences, "bootstrap": bootstrap, "topics_file": str(spec.source),
                          "differences": list(differences)}, indent=2))
        return 1 if differences else 0
    if not differences:
        print(f"in sync: the {len(spec.topics)} topics of {spec.source} match the cluster at {bootstrap}")
        return 0
    for line in differences:
        print(line)
    print(f"{len(differences)} difference{'s' if len(differences) != 1 else ''} between {spec.source} and the "
          f"cluster at {bootstrap}; `failoverd topics apply` fixes all but partition decreases and replication "
          "factor changes")
    return 1
