"""Prepare the local broker and registry for the example faust app (examples/faust_app/README.md).

Builds the example bundles, promotes fraud-scorer 2.0.0 to active and 1.0.0 to standby in the
registry the configuration names (skipped when they are already there), and creates the topics
it names (skipped when they exist).

    .venv/bin/python examples/faust_app/setup.py [--config examples/faust_app/failoverd.toml] [--partitions 2]
"""

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402

from daemon.bundle import build  # noqa: E402
from daemon.config import load  # noqa: E402
from daemon.registry import Registry  # noqa: E402


def releases(settings) -> None:
    out = Path(settings.state.directory) / "built"
    out.mkdir(parents=True, exist_ok=True)
    registry = Registry(settings.registry.path)
    status = registry.status()
    for version, channel in (("v2", "active"), ("v1", "standby")):
        archive = build(ROOT / "examples" / "bundles" / f"fraud-{version}", out).path
        digest = registry.add(archive)
        if status.get(channel) is None or status[channel].digest != digest:
            registry.promote(digest, channel, "examples/faust_app/setup.py")
    for channel, rel in registry.status().items():
        print(f"{channel:8} {rel.ref if rel else '-'}")


async def topics(settings, partitions: int) -> None:
    admin = AIOKafkaAdminClient(**settings.kafka.client_kwargs())
    await admin.start()
    try:
        wanted = {**{t: partitions for t in settings.inputs.topics}, settings.output.topic: partitions,
                  settings.dead_letter.topic: 1, settings.registry.control_topic: 1}
        existing = set(await admin.list_topics())
        for name, n in wanted.items():
            if name in existing:
                print(f"exists   {name}")
                continue
            configs = {"cleanup.policy": "compact"} if name == settings.registry.control_topic else {}
            await admin.create_topics([NewTopic(name, n, 1, topic_configs=configs)])
            print(f"created  {name} ({n} partitions)")
    finally:
        await admin.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "faust_app" / "failoverd.toml"))
    ap.add_argument("--partitions", type=int, default=2)
    args = ap.parse_args()
    settings = load(args.config)
    releases(settings)
    asyncio.run(topics(settings, args.partitions))


if __name__ == "__main__":
    main()
