"""`failoverd topics apply|check` against the real local broker.

Every test writes its own failoverd.toml and topics.toml with topic names unique to the test, runs
the CLI in-process, and verifies the cluster with a plain aiokafka admin client (not failoverd's
code). The topics are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from daemon import cli, config, topics
from tests import kafkatools

INPUT_RETENTION = "604800000"  # 7 days
ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Setup:
    tmp: Path
    bootstrap: str
    prefix: str

    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    @property
    def names(self) -> list[str]:
        return [self.name(r) for r in ("input", "output", "dlq", "changelog", "checkpoints", "control")]

    def write(self, *, input_retention: str = INPUT_RETENTION, changelog_policy: str = "compact",
              output_replication: int = 1, dlq_config: str = "", changelog_partitions: int = 4) -> None:
        (self.tmp / "failoverd.toml").write_text(f"""
[kafka]
bootstrap_servers = "{self.bootstrap}"
[inputs]
topics = ["{self.name('input')}"]
[output]
topic = "{self.name('output')}"
[dead_letter]
topic = "{self.name('dlq')}"
[checkpoint]
interval_ms = 100
topic = "{self.name('checkpoints')}"
[state]
changelog_topic = "{self.name('changelog')}"
[registry]
control_topic = "{self.name('control')}"
""")
        (self.tmp / "topics.toml").write_text(f"""
[safety]
input_retention_checkpoint_multiple = 1000
min_input_retention_ms = 3600000

[[topic]]
name = "{self.name('input')}"
role = "input"
partitions = 4
replication_factor = 1
config = {{ "cleanup.policy" = "delete", "retention.ms" = "{input_retention}" }}

[[topic]]
name = "{self.name('output')}"
role = "output"
partitions = 2
replication_factor = {output_replication}
config = {{ "retention.ms" = "86400000", "min.insync.replicas" = "1" }}

[[topic]]
name = "{self.name('dlq')}"
role = "dead_letter"
partitions = 1
replication_factor = 1
config = {{ {dlq_config} }}

[[topic]]
name = "{self.name('changelog')}"
role = "changelog"
partitions = {changelog_partitions}
replication_factor = 1
config = {{ "cleanup.policy" = "{changelog_policy}" }}

[[topic]]
name = "{self.name('checkpoints')}"
role = "checkpoint"
partitions = 1
replication_factor = 1
config = {{ "cleanup.policy" = "compact" }}

[[topic]]
name = "{self.name('control')}"
role = "control"
partitions = 1
replication_factor = 1
config = {{ "cleanup.policy" = "compact" }}
""")

    def args(self, action: str, *extra: str) -> list[str]:
        return ["topics", action, "--topics", str(self.tmp / "topics.toml"),
                "--config", str(self.tmp / "failoverd.toml"), *extra]


@pytest.fixture
def setup(tmp_path, kafka_bootstrap, unique_name):
    s = Setup(tmp=tmp_path, bootstrap=kafka_bootstrap, prefix=unique_name("tp"))
    s.write()
    yield s
    asyncio.run(_delete(kafka_bootstrap, s.names))


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---- independent look at the cluster (plain aiokafka) --------------------------------------------

async def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    return admin


async def _existing(bootstrap: str, names: list[str]) -> dict[str, int]:
    """name -> partition count, for those of ``names`` that exist."""
    admin = await _admin(bootstrap)
    try:
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics() if t["topic"] in names}
    finally:
        await admin.close()


async def _configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = await _admin(bootstrap)
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        [(error, _msg, _type, _name, entries)] = response.resources
        assert error == 0
        return {e[0]: e[1] for e in entries}
    finally:
        await admin.close()


async def _alter(bootstrap: str, topic: str, configs: dict[str, str]) -> None:
    admin = await _admin(bootstrap)
    try:
        [response] = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs)])
        assert [r[0] for r in response.resources] == [0]
    finally:
        await admin.close()


async def _delete(bootstrap: str, names: list[str]) -> None:
    existing = await _existing(bootstrap, names)
    if existing:
        admin = await _admin(bootstrap)
        try:
            await admin.delete_topics(list(existing))
        finally:
            await admin.close()


async def _config_is(bootstrap: str, topic: str, key: str, value: str) -> bool:
    return (await _configs(bootstrap, topic)).get(key) == value


def existing(setup: Setup) -> dict[str, int]:
    return asyncio.run(_existing(setup.bootstrap, setup.names))


def configs(setup: Setup, topic: str) -> dict[str, str]:
    return asyncio.run(_configs(setup.bootstrap, topic))


# ---- tests -------------------------------------------------------------------------------------------

def test_apply_creates_everything_then_is_a_no_op_and_check_passes(setup, capsys):
    code, out, err = run(capsys, setup.args("apply"))
    assert code == 0, err
    for name in setup.names:
        assert f"create {name}:" in out
    assert "applied 6 changes" in out

    assert existing(setup) == {setup.name("input"): 4, setup.name("output"): 2, setup.name("dlq"): 1,
                               setup.name("changelog"): 4, setup.name("checkpoints"): 1,
                               setup.name("control"): 1}
    assert configs(setup, setup.name("input"))["retention.ms"] == INPUT_RETENTION
    assert configs(setup, setup.name("output"))["retention.ms"] == "86400000"
    for role in ("changelog", "checkpoints", "control"):
        assert configs(setup, setup.name(role))["cleanup.policy"] == "compact"

    code, out, err = run(capsys, setup.args("apply"))
    assert code == 0, err
    assert out.startswith("nothing to do")
    assert len(out.splitlines()) == 1

    code, out, err = run(capsys, setup.args("check"))
    assert code == 0, err
    assert out.startswith("in sync: the 6 topics")


def test_check_lists_missing_topics_and_dry_run_changes_nothing(setup, capsys):
    code, out, _ = run(capsys, setup.args("check"))
    assert code == 1
    for name in setup.names:
        assert f"{name}: missing from the cluster" in out
    assert "6 differences" in out

    code, out, err = run(capsys, setup.args("apply", "--dry-run"))
    assert code == 0, err
    assert f"create {setup.name('input')}: 4 partitions" in out
    assert "dry run: nothing changed (6 changes planned)" in out
    assert existing(setup) == {}


def test_partition_drift_is_detected_and_fixed(setup, capsys):
    topic = setup.name("input")
    asyncio.run(kafkatools.create_topics(setup.bootstrap, {topic: 2}, {topic: {"retention.ms": INPUT_RETENTION}}))

    code, out, _ = run(capsys, setup.args("check"))
    assert code == 1
    assert f"{topic}: partitions: file 4, cluster 2" in out.splitlines()
    assert f"{topic}: missing" not in out
    assert "6 differences" in out  # the partition count + 5 missing topics

    code, out, err = run(capsys, setup.args("apply"))
    assert code == 0, err
    assert f"increase partitions of {topic} from 2 to 4" in out
    assert f"note: adding partitions to {topic} (role input) moves keys" in out
    assert existing(setup)[topic] == 4
    assert run(capsys, setup.args("check"))[0] == 0


def test_config_drift_is_detected_and_fixed_keeping_undeclared_overrides(setup, capsys):
    assert run(capsys, setup.args("apply"))[0] == 0
    topic = setup.name("input")
    # An operator changes retention.ms by hand and adds an override the file does not declare.
    asyncio.run(_alter(setup.bootstrap, topic, {"cleanup.policy": "delete", "retention.ms": "86400000",
                                                "segment.ms": "7200000"}))
    asyncio.run(kafkatools.wait_for(lambda: _config_is(setup.bootstrap, topic, "retention.ms", "86400000"),
                                    timeout=30, what="retention.ms drift visible"))

    code, out, _ = run(capsys, setup.args("check"))
    assert code == 1
    assert out.splitlines() == [
        f"{topic}: config retention.ms: file {INPUT_RETENTION}, cluster 86400000",
        out.splitlines()[-1],
    ]
    assert out.splitlines()[-1].startswith("1 difference ")

    code, out, err = run(capsys, setup.args("apply"))
    assert code == 0, err
    assert f"alter config of {topic}: retention.ms: 86400000 -> {INPUT_RETENTION}" in out
    after = configs(setup, topic)
    assert after["retention.ms"] == INPUT_RETENTION
    assert after["segment.ms"] == "7200000"  # not declared, so left alone
    assert run(capsys, setup.args("check"))[0] == 0


def test_dry_run_leaves_config_drift_in_place(setup, capsys):
    assert run(capsys, setup.args("apply"))[0] == 0
    topic = setup.name("output")
    asyncio.run(_alter(setup.bootstrap, topic, {"retention.ms": "3600000", "min.insync.replicas": "1"}))
    asyncio.run(kafkatools.wait_for(lambda: _config_is(setup.bootstrap, topic, "retention.ms", "3600000"),
                                    timeout=30, what="retention.ms drift visible"))
    code, out, err = run(capsys, setup.args("apply", "--dry-run"))
    assert code == 0, err
    assert f"alter config of {topic}: retention.ms: 3600000 -> 86400000" in out
    assert "dry run: nothing changed" in out
    assert configs(setup, topic)["retention.ms"] == "3600000"
    assert run(capsys, setup.args("check"))[0] == 1


@pytest.mark.parametrize("action", ["apply", "check"])
def test_refuses_input_retention_shorter_than_the_replay_window(setup, capsys, action):
    setup.write(input_retention="60000")
    code, out, err = run(capsys, setup.args(action))
    assert code == 1
    assert "nothing was changed" in err
    assert (f'"{setup.name("input")}" (role input): retention.ms = 60000 is shorter than the replay window '
            "safety limit of 3600000 ms") in err
    assert "replays the input from the last checkpoint" in err
    assert existing(setup) == {}


def test_infinite_input_retention_is_fine(setup, capsys):
    setup.write(input_retention="-1")
    code, out, err = run(capsys, setup.args("apply"))
    assert code == 0, err
    assert configs(setup, setup.name("input"))["retention.ms"] == "-1"


@pytest.mark.parametrize("action", ["apply", "check"])
def test_refuses_a_changelog_that_is_not_compacted(setup, capsys, action):
    setup.write(changelog_policy="delete")
    code, out, err = run(capsys, setup.args(action))
    assert code == 1
    assert (f'"{setup.name("changelog")}" (role changelog): cleanup.policy = "delete"; changelog topics must be '
            'cleanup.policy = "compact"') in err
    assert existing(setup) == {}


def test_refuses_a_changelog_narrower_than_the_inputs(setup, capsys):
    setup.write(changelog_partitions=2)
    code, out, err = run(capsys, setup.args("apply"))
    assert code == 1
    assert (f'"{setup.name("changelog")}" (role changelog) has 2 partitions but an input topic has 4') in err
    assert existing(setup) == {}


def test_refuses_a_replication_factor_above_the_broker_count(setup, capsys):
    setup.write(output_replication=3)
    code, out, err = run(capsys, setup.args("apply"))
    assert code == 1
    assert f"{setup.name('output')}: replication_factor = 3 but the cluster has 1 broker(s)" in err
    assert "nothing was changed" in err
    assert existing(setup) == {}

    code, out, _ = run(capsys, setup.args("check"))
    assert code == 1
    assert f"{setup.name('output')}: replication_factor = 3 but the cluster has 1 broker(s)" in out


def test_refuses_to_decrease_partitions_and_changes_nothing(setup, capsys):
    asyncio.run(kafkatools.create_topics(setup.bootstrap, {setup.name("changelog"): 8},
                                         {setup.name("changelog"): {"cleanup.policy": "compact"}}))
    # the broker answers CreateTopics before its metadata lists the topic: apply must find it
    async def listed() -> bool:
        return (await _existing(setup.bootstrap, setup.names)).get(setup.name("changelog")) == 8

    asyncio.run(kafkatools.wait_for(listed, timeout=30, interval=0.1, what="the changelog topic in the metadata"))
    code, out, err = run(capsys, setup.args("apply"))
    assert code == 1
    assert f"{setup.name('changelog')}: partitions: file 4, cluster 8; Kafka cannot decrease partitions" in err
    assert existing(setup) == {setup.name("changelog"): 8}

    code, out, _ = run(capsys, setup.args("check"))
    assert code == 1
    assert f"{setup.name('changelog')}: partitions: file 4, cluster 8" in out


def test_bootstrap_flag_overrides_the_config(setup, capsys):
    text = (setup.tmp / "failoverd.toml").read_text().replace(setup.bootstrap, "127.0.0.1:1")
    (setup.tmp / "failoverd.toml").write_text(text)
    code, _, err = run(capsys, setup.args("check"))
    assert code == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in err
    code, out, err = run(capsys, setup.args("apply", "--bootstrap", setup.bootstrap))
    assert code == 0, err
    assert len(existing(setup)) == 6


def test_a_config_value_the_broker_rejects_changes_nothing(setup, capsys):
    setup.write(dlq_config='"cleanup.policy" = "bogus"')
    code, out, err = run(capsys, setup.args("apply"))
    assert code == 1
    assert f"{setup.name('dlq')}: InvalidConfigurationError" in err
    assert "nothing was changed" in err
    assert existing(setup) == {}


def test_a_topic_of_the_config_missing_from_the_file_is_refused(setup, capsys):
    text = (setup.tmp / "topics.toml").read_text()
    (setup.tmp / "topics.toml").write_text(text.replace(f'name = "{setup.name("control")}"',
                                                        'name = "someone-elses-control"'))
    code, _, err = run(capsys, setup.args("apply"))
    assert code == 1
    assert (f'"{setup.name("control")}" is the daemon\'s control topic (registry.control_topic in '
            f'{setup.tmp / "failoverd.toml"}) but {setup.tmp / "topics.toml"} does not declare it') in err
    assert existing(setup) == {}


def test_a_malformed_topics_file_is_a_config_error(setup, capsys):
    text = (setup.tmp / "topics.toml").read_text()
    (setup.tmp / "topics.toml").write_text(text.replace("partitions = 4", "partition = 4", 1))
    code, _, err = run(capsys, setup.args("check"))
    assert code == 2
    path = setup.tmp / "topics.toml"
    assert f'{path}: topic "{setup.name("input")}".partition is an unknown key (did you mean partitions?)' in err
    assert f'{path}: topic "{setup.name("input")}".partitions is missing' in err


def test_the_example_topics_file_matches_the_example_config():
    settings = config.load(ROOT / "config" / "failoverd.toml", env={})
    spec = topics.load_topics(ROOT / "config" / "topics.toml")
    assert topics.unsafe_reasons(spec, settings) == []
    declared = {t.name for t in spec.topics}
    assert declared == {name for names in settings.topics_by_role().values() for name in names}
