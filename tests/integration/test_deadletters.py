"""`failoverd dlq list|replay` against dead letters the real daemon wrote."""

from __future__ import annotations

import asyncio
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

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


# ---- idempotent replay (issue #11 point 7: replaying twice sent 10 dead letters back as 24) ----

def _dead_letter(i: int, source: str, reason: str = "schema", partition: int = 0) -> tuple:
    """A dead letter as the engine writes it (the same header builder)."""
    provenance = (H.release_headers({"name": "fraud", "version": "1.0.0", "digest": "d" * 64})
                  + H.source_headers(source.encode(), str(partition).encode(), 100 + i))
    return (f"card-{i}".encode(), orjson.dumps({"card_id": f"card-{i}", "n": i}),
            H.dead_letter_headers([("trace-id", f"t{i}".encode())], reason, "amount: 'ten' is not a number",
                                  provenance))


async def _dlq_setup(bootstrap: str, tmp_path, n: int = 10) -> tuple[Path, dict, list]:
    names = {r: kafkatools.unique(f"dlqre-{r}") for r in ("input", "dlq")}
    await kafkatools.create_topics(bootstrap, {names["input"]: 2, names["dlq"]: 2})
    letters = [_dead_letter(i, names["input"], partition=i % 2) for i in range(n)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for i, (k, v, hs) in enumerate(letters):
            await (await producer.send(names["dlq"], v, key=k, partition=i % 2, headers=hs))
    finally:
        await producer.stop()
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'[kafka]\nbootstrap_servers = ["{bootstrap}"]\ngroup_id = "g"\n[app]\nname = "a"\n'
                   f'[inputs]\ntopics = ["{names["input"]}"]\n[output]\ntopic = "out"\n'
                   f'[dead_letter]\ntopic = "{names["dlq"]}"\n')
    return cfg, names, letters


def _replayed_copies(records) -> collections.Counter:
    return collections.Counter(H.as_dict(r.headers)[H_REPLAYED_FROM] for r in records
                               if H_REPLAYED_FROM in H.as_dict(r.headers))


async def test_replaying_twice_sends_each_dead_letter_once_and_force_sends_again(kafka_bootstrap, tmp_path):
    cfg, names, letters = await _dlq_setup(kafka_bootstrap, tmp_path, n=10)
    first = _cli("dlq", "replay", "--config", str(cfg))
    assert first.returncode == 0 and "replayed 10 of 10" in first.stdout, first.stdout + first.stderr
    second = _cli("dlq", "replay", "--config", str(cfg), "--json")
    assert second.returncode == 0, second.stdout + second.stderr
    doc = json.loads(second.stdout)
    assert doc["replayed"] == [] and len(doc["already_replayed"]) == 10 and doc["selected"] == 10
    got = await kafkatools.read_committed(kafka_bootstrap, names["input"], expect=10)
    # the replay has exited, its transactions are committed: read to the end, nothing more is there
    got = await kafkatools.read_committed(kafka_bootstrap, names["input"], idle=0.5)
    copies = _replayed_copies(got)
    assert len(got) == 10 and len(copies) == 10 and set(copies.values()) == {1}, copies
    assert sorted((r.partition, r.key, r.value) for r in got) == sorted(
        (i % 2, k, v) for i, (k, v, _) in enumerate(letters))

    # list: the markers are not dead letters; each dead letter says it was replayed
    listed = json.loads(_cli("dlq", "list", "--config", str(cfg), "--json").stdout)
    assert listed["count"] == 10 and listed["replayed"] == 10
    assert all(len(d["replayed"]) == 1 and d["replayed"][0]["to"] == f"{names['input']}:{d['dlq_partition']}"
               for d in listed["dead_letters"])
    text = _cli("dlq", "list", "--config", str(cfg))
    assert text.stdout.startswith(f"10 dead letter(s) in {names['dlq']}, 10 of them replayed\n"), text.stdout
    assert text.stdout.count(" REPLAYED ") == 10

    forced = _cli("dlq", "replay", "--config", str(cfg), "--force", "--limit", "3")
    assert forced.returncode == 0 and "replayed 3 of 3" in forced.stdout, forced.stdout + forced.stderr
    got = await kafkatools.read_committed(kafka_bootstrap, names["input"], expect=13)
    assert sorted(_replayed_copies(got).values()) == [1] * 7 + [2] * 3
    listed = json.loads(_cli("dlq", "list", "--config", str(cfg), "--json").stdout)
    assert sorted(len(d["replayed"]) for d in listed["dead_letters"]) == [1] * 7 + [2] * 3


CRASHING_REPLAY = """
import asyncio, os, sys
from aiokafka import AIOKafkaProducer
from daemon import deadletters

async def main(bootstrap, dlq, source):
    kafka = {"bootstrap_servers": bootstrap}
    letters = await deadletters.read(kafka, dlq, deadletters.Selection())
    producer = AIOKafkaProducer(transactional_id=deadletters.transactional_id(dlq), **kafka)
    await producer.start()
    await producer.begin_transaction()
    d = letters[0]
    await (await producer.send(source, d.value, key=d.key, partition=d.source_partition))
    k, v, hs = deadletters.marker(d, source, forced=False)
    await (await producer.send(dlq, v, key=k, partition=d.partition, headers=hs))
    print("sent, not committed", flush=True)
    await asyncio.sleep(600)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_replay_that_crashed_mid_transaction_neither_duplicates_nor_loses(kafka_bootstrap, tmp_path):
    cfg, names, letters = await _dlq_setup(kafka_bootstrap, tmp_path, n=3)
    crashing = subprocess.Popen([*ROOT_CMD[:1], "-c", CRASHING_REPLAY, kafka_bootstrap, names["dlq"], names["input"]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = await asyncio.to_thread(crashing.stdout.readline)
        assert line.startswith("sent, not committed"), line + crashing.stderr.read()
    finally:
        crashing.kill()  # SIGKILL: the transaction stays open on the broker
        crashing.wait(10)
    done = _cli("dlq", "replay", "--config", str(cfg))
    assert done.returncode == 0 and "replayed 3 of 3" in done.stdout, done.stdout + done.stderr
    got = await kafkatools.read_committed(kafka_bootstrap, names["input"], expect=3)
    # the replay has exited, its transactions are committed: read to the end, nothing more is there
    got = await kafkatools.read_committed(kafka_bootstrap, names["input"], idle=0.5)
    assert len(got) == 3 and sorted(_replayed_copies(got).values()) == [1, 1, 1]  # the aborted one is not visible


@pytest.mark.parametrize("command", [["dlq", "list"], ["dlq", "replay", "--dry-run"], ["dlq", "replay"],
                                     ["release", "sync", "--registry", "{tmp}/registry"]])
def test_an_unreachable_broker_is_one_line_exit_1_and_fast(tmp_path, command):
    from tests.daemonproc import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'[kafka]\nbootstrap_servers = ["{address}"]\ngroup_id = "g"\n[app]\nname = "a"\n'
                   '[inputs]\ntopics = ["in"]\n[output]\ntopic = "out"\n[dead_letter]\ntopic = "dlq"\n'
                   f'[registry]\npath = "{tmp_path}/registry"\ncontrol_topic = "ctl"\n')
    started = time.monotonic()
    r = _cli(*[c.format(tmp=tmp_path) for c in command], "--config", str(cfg))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "Unclosed" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("failoverd: error: "), r.stderr
    assert f"broker unreachable at {address}" in lines[0], lines
    assert "fix:" in lines[0] and time.monotonic() - started < 20


def test_a_missing_topic_names_the_key_and_timeouts_are_one_line_errors(kafka_bootstrap, tmp_path):
    cfg = tmp_path / "f.toml"
    cfg.write_text(f'[kafka]\nbootstrap_servers = ["{kafka_bootstrap}"]\ngroup_id = "g"\n[app]\nname = "a"\n'
                   '[inputs]\ntopics = ["in"]\n[output]\ntopic = "out"\n'
                   f'[dead_letter]\ntopic = "{kafkatools.unique("absent-dlq")}"\n')
    for command in (["list"], ["replay", "--dry-run"], ["replay"]):
        r = _cli("dlq", *command, "--config", str(cfg))
        assert r.returncode == 2 and "does not exist" in r.stderr and "[dead_letter] topic" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("dlq", "list", "--config", str(cfg), "--timeout", "0")
    assert r.returncode == 2 and "--timeout 0: must be more than 0" in r.stderr, r.stderr
    for command in (["list"], ["replay", "--dry-run"]):  # too short to read anything: a timeout, said in one line
        r = _cli("dlq", *command, "--config", str(cfg), "--timeout", "0.0001")
        assert r.returncode == 1 and "within 0.0001s; fix: allow more time (--timeout SECONDS)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _on_a_terminal(*args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout a pipe, as `| less` would have it)."""
    import os
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*ROOT_CMD, *args], stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        seen = bytearray()
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's last writer exited
                break
            if not chunk:
                break
            seen += chunk
        out = proc.communicate(timeout=120)[0]
    finally:
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), seen.decode(errors="replace")


async def test_replay_shows_progress_on_a_terminal_and_nothing_extra_in_a_pipe(kafka_bootstrap, tmp_path):
    cfg, names, letters = await _dlq_setup(kafka_bootstrap, tmp_path, n=6)
    piped = _cli("dlq", "replay", "--config", str(cfg), "--dry-run")
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    done, terminal = _on_a_terminal("dlq", "replay", "--config", str(cfg))
    assert done.returncode == 0 and "replayed 6 of 6" in done.stdout, done.stdout + terminal
    assert "dlq replay: reading" in terminal and "records read" in terminal, terminal
    assert "dlq replay: replaying 6 dead letter(s)" in terminal and "6/6 replayed" in terminal, terminal
    assert "dlq replay" not in done.stdout  # progress never mixes into the result
