"""`failoverd dlq list|replay` against dead letters the real daemon wrote."""

from __future__ import annotations

import json
import subprocess
import sys

import orjson

from daemon.engine import headers as H
from daemon.engine.headers import H_REPLAYED_FROM
from tests import kafkatools, streams
from tests.daemonproc import DaemonProc, make_topics, write_config

ROOT_CMD = [sys.executable, "-m", "daemon"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ROOT_CMD, *args], capture_output=True, text=True, timeout=120)


async def test_dead_letters_are_listed_and_replayed_with_their_original_key_value_and_headers(
        kafka_bootstrap, tmp_path, example_bundles):
    names = await make_topics(kafka_bootstrap, "dlq", partitions=2)
    fixed = kafkatools.unique("dlq-fixed")
    await kafkatools.create_topics(kafka_bootstrap, {fixed: 1})
    good = streams.transactions(200, seed=3)
    schema_bad = [(f"card-s{i}".encode(), orjson.dumps({"card_id": f"card-s{i}", "amount": "ten", "features": [0] * 8}))
                  for i in range(3)]
    refused = [(b"card-m1", orjson.dumps({"card_id": "card-m1", "amount": -5.0, "features": [0.1] * 8}))]
    oversized = [(b"card-o1", b'{"card_id": "card-o1", "pad": "' + b"x" * 5000 + b'"}')]
    poison = schema_bad + refused + oversized
    await kafkatools.produce(kafka_bootstrap, names["input"], good[:100] + schema_bad, partition=0,
                             headers=[("trace-id", b"abc")])
    await kafkatools.produce(kafka_bootstrap, names["input"], refused + oversized + good[100:], partition=1)
    cfg = write_config(tmp_path / "f.toml", bootstrap=kafka_bootstrap, names=names, state_dir=tmp_path / "state",
                       group=kafkatools.unique("g"), app=kafkatools.unique("app"))
    daemon = DaemonProc(cfg, "--active-bundle", str(example_bundles["v1"]), log=tmp_path / "daemon.log").start()
    try:
        await kafkatools.wait_for(
            lambda: daemon.check() and _dead_letters(kafka_bootstrap, names["dlq"], len(poison)), timeout=90,
            what="every poison record dead-lettered")
        assert daemon.terminate() == 0, daemon.log()[-3000:]
    finally:
        if daemon.alive():
            daemon.kill9()

    listed = _cli("dlq", "list", "--config", str(cfg), "--json")
    assert listed.returncode == 0, listed.stderr
    doc = json.loads(listed.stdout)
    by_reason = {(c["reason"], c["source"]): c["count"] for c in doc["by_reason_and_source"]}
    assert by_reason == {("schema", f"{names['input']}:0"): 3, ("model_error", f"{names['input']}:1"): 1,
                         ("oversized", f"{names['input']}:1"): 1}
    text = _cli("dlq", "list", "--config", str(cfg), "--show", "1")
    assert text.returncode == 0 and text.stdout.startswith(f"5 dead letter(s) in {names['dlq']}\n"), text.stdout
    assert "... 4 more" in text.stdout and "key=card-" in text.stdout, text.stdout
    only_schema = json.loads(_cli("dlq", "list", "--config", str(cfg), "--json", "--reason", "schema").stdout)
    assert only_schema["count"] == 3

    # a dry run sends nothing
    dry = _cli("dlq", "replay", "--config", str(cfg), "--reason", "schema", "--to", fixed, "--dry-run")
    assert dry.returncode == 0 and "would replay 3 of 3" in dry.stdout, dry.stdout + dry.stderr
    assert await kafkatools.read_committed(kafka_bootstrap, fixed, idle=0.5) == []

    # replayed elsewhere: the original key, value and headers, plus where each came from
    done = _cli("dlq", "replay", "--config", str(cfg), "--reason", "schema", "--to", fixed)
    assert done.returncode == 0 and "replayed 3 of 3" in done.stdout, done.stdout + done.stderr
    got = await kafkatools.read_committed(kafka_bootstrap, fixed, expect=3)
    assert sorted((r.key, r.value) for r in got) == sorted(schema_bad)
    for r in got:
        hs = list(r.headers)
        assert hs[0] == ("trace-id", b"abc") and hs[-1][0] == H_REPLAYED_FROM, hs
        assert not any(k.startswith(("fd.dlq.", "fd.source.", "fd.release.")) for k, _ in hs)
        assert hs[-1][1].startswith(f"{names['dlq']}/0/".encode())

    # replayed to the source: back into the partition it came from; a truncated one cannot be
    before = len(await kafkatools.read_committed(kafka_bootstrap, names["input"]))
    back = _cli("dlq", "replay", "--config", str(cfg), "--reason", "model_error", "--reason", "oversized")
    assert back.returncode == 3, back.stdout + back.stderr  # something could not be replayed
    assert "replayed 1 of 2" in back.stdout and "skipped 1: truncated" in back.stdout, back.stdout
    after = await kafkatools.read_committed(kafka_bootstrap, names["input"], expect=before + 1)
    new = [r for r in after if H_REPLAYED_FROM in H.as_dict(r.headers)]
    assert [(r.partition, r.key, r.value) for r in new] == [(1, refused[0][0], refused[0][1])]


async def _dead_letters(bootstrap: str, topic: str, n: int) -> bool:
    return len(await kafkatools.read_committed(bootstrap, topic, idle=0.3)) >= n


def test_bad_filters_name_the_flag_and_the_fix(tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text('[kafka]\nbootstrap_servers = ["127.0.0.1:1"]\ngroup_id = "g"\n[app]\nname = "a"\n'
                   '[inputs]\ntopics = ["in"]\n[output]\ntopic = "out"\n[dead_letter]\ntopic = "dlq"\n')
    r = _cli("dlq", "list", "--config", str(cfg), "--since", "yesterday")
    assert r.returncode == 2 and "--since 'yesterday'" in r.stderr and "ISO 8601" in r.stderr, r.stderr
    r = _cli("dlq", "replay", "--config", str(cfg), "--reason", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr
