"""Hostile releases: a release misbehaves on the batches that hold a record marked "fault".

The hostile model runs as the active (a good standby behind it), as the standby (behind a good
active), or on both channels. What each misbehaviour must cost (DESIGN.md, "the release
boundary"; issue 11):
- ``failover``: the release is at fault (it crashed, hung, wrote on the protocol channel): the good
  standby takes over at the last checkpoint and answers every record, the fault records included.
- ``dead_letter``: one record is at fault (its batch fails only because of it): the batch is split
  until the record is isolated, and it alone becomes a dead letter with the given reason; the
  release stays active and every other record is an output.
- ``clean``: nothing the pipeline should notice (noise, stray children, a stubborn close(), a
  standby that cannot load or dies in shadow).

Every case also checks: every input once under read_committed, each output answers its own input,
the group commits to the end of the input on its own with the daemon alive all along, SIGTERM exits
0, and no process of the daemon's (its workers, their children) outlives it.
"""

from __future__ import annotations

import dataclasses
import textwrap
import uuid

import pytest

from tests.hostile import harness as h

TOTAL = 1000
FIRST = 400
"""Inputs produced (and committed by the hostile release) before any fault record exists."""
FAULTS = (520, 810)
"""Indexes of the records marked "fault" (one batch each, far apart)."""


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    on_fault: str = "pass"
    expect: str = "failover"  # failover | dead_letter | clean
    reasons: frozenset = frozenset()
    """dead_letter: the reasons a fault record's dead letter may carry."""
    failover_reason: str | None = None
    init: str = "pass"
    close: str = "pass"
    on_batch: str = "pass"
    child: bool = False
    """The model starts ``sleep MARKER`` children: none may survive the run."""
    pickle_marker: bool = False
    hostile: str = "active"
    """Which channel runs the hostile model; the other runs the good one. "standby": the hostile
    standby must never block or cost the (good) active anything."""
    mode: str = "warm"
    max_dead: int = 0
    """failover: how many records may be dead-lettered (model_exception) before the release is failed
    over as a whole (``failover.isolate_max_records``)."""
    detail: str = ""
    """dead_letter: text the dead letter's detail must contain (the model's exception)."""
    secret: bool = False
    """The daemon runs with a secret in its environment: no output may carry it."""


EXC = frozenset({"model_exception"})
ENCODE = frozenset({"model_exception", "output_schema"})

IGNORE_SIGNALS = """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
"""


def _replace_fault_outputs(output: str, state: str = "{'count': 1}") -> str:
    return f"""
    for i in faulty:
        r = batch[i]
        results[i] = Prediction(dict({{'card_id': r.value['card_id'], 'count': 1, 'seq': r.value.get('seq'),
                                      'score': 0.5}}, **{output}), {state})
    """


CASES = [
    # -- the release is at fault: a good standby takes over -----------------------------------------
    Case("os_exit", "os._exit(3)", failover_reason="worker_crashed"),
    Case("sigkill_self", "os.kill(os.getpid(), signal.SIGKILL)", failover_reason="worker_crashed"),
    Case("sigsegv", "ctypes.string_at(0)", failover_reason="worker_crashed"),
    Case("system_exit", "raise SystemExit(4)"),
    Case("keyboard_interrupt", "raise KeyboardInterrupt()"),
    Case("hang", "time.sleep(10**6)", failover_reason="predict_timeout"),
    Case("ignore_sigterm_hang", "time.sleep(10**6)", init=IGNORE_SIGNALS, failover_reason="predict_timeout"),
    Case("protocol_garbage", "protocol_out().write(b'garbage!' * 64)"),
    Case("protocol_pickle", """
        import pickle, struct
        class Evil:
            def __reduce__(self):
                return (os.mkdir, (MARKER_DIR,))
        body = pickle.dumps(("error", "exception", Evil()))
        protocol_out().write(struct.pack(">I", len(body)) + body)
        os._exit(3)
        """, pickle_marker=True),
    Case("protocol_short_reply", """
        import pickle, struct
        body = pickle.dumps(("result", [], {}))  # plain data: an answer with no result at all
        protocol_out().write(struct.pack(">I", len(body)) + body)
        """),
    Case("child_then_exit", """
        subprocess.Popen(["sleep", MARKER])
        os._exit(3)
        """, child=True, failover_reason="worker_crashed"),
    Case("close_protocol_fd", "os.close(protocol_out().fileno())"),
    Case("os_exit_hot", "os._exit(3)", mode="hot", failover_reason="worker_crashed"),
    Case("raise_always_once_faulted", """
        self.broken = True
        raise RuntimeError("this release is broken for good")
        """, init="self.broken = False", on_batch="""
        if getattr(self, "broken", False):
            raise RuntimeError("this release is broken for good")
        """, max_dead=10),
    # -- one record is at fault: it alone is dead-lettered ------------------------------------------
    Case("raise_in_predict", "raise ValueError('poison record ' + str(batch[faulty[0]].value['seq']))",
         expect="dead_letter", reasons=EXC, detail="poison record"),
    Case("too_few_results", "return results[:-1]", expect="dead_letter", reasons=EXC),
    Case("too_many_results", "return results + results[:1]", expect="dead_letter", reasons=EXC),
    Case("none_result", "return None", expect="dead_letter", reasons=EXC),
    Case("none_item", "for i in faulty: results[i] = None", expect="dead_letter", reasons=EXC),
    Case("nan_output", _replace_fault_outputs("{'score': float('nan')}"), expect="dead_letter", reasons=ENCODE),
    Case("inf_output", _replace_fault_outputs("{'score': float('inf')}"), expect="dead_letter", reasons=ENCODE),
    Case("set_output", _replace_fault_outputs("{'tags': {1, 2}}"), expect="dead_letter", reasons=ENCODE),
    Case("bytes_output", _replace_fault_outputs("{'blob': b'\\x00\\xff'}"), expect="dead_letter", reasons=ENCODE),
    Case("object_output", _replace_fault_outputs("{'obj': object()}"), expect="dead_letter", reasons=ENCODE),
    Case("set_state", _replace_fault_outputs("{}", "{'count': 1, 'seen': {1}}"), expect="dead_letter",
         reasons=EXC),
    Case("bytes_state", _replace_fault_outputs("{}", "{'count': 1, 'raw': b'\\x00'}"), expect="dead_letter",
         reasons=EXC),
    Case("oversized_output", _replace_fault_outputs("{'pad': 'x' * 2_000_000}"), expect="dead_letter",
         reasons=frozenset({"output_oversized"}), detail="bytes"),
    # -- nothing the pipeline should notice ---------------------------------------------------------
    Case("stderr_flood_and_fd1", expect="clean", on_batch="""
        sys.stderr.write("flood " * 350_000 + "\\n")
        os.write(1, b"garbage on fd 1\\n" * 1000)
        print("a print from the model")
        """),
    Case("child_process", "subprocess.Popen(['sleep', MARKER])", expect="clean", child=True),
    # stdin was the protocol's request pipe: a read took the next request's bytes (or blocked)
    Case("reads_stdin", expect="clean", on_batch="""
        sys.stdin.buffer.read(1 << 16)
        subprocess.run(["head", "-c", "1"], check=True)
        """),
    Case("stubborn_close", expect="clean", init=IGNORE_SIGNALS, close="time.sleep(10**6)"),
    Case("environment_secret", expect="clean", secret=True, on_batch="""
        for p in results:
            p.output["env"] = os.environ.get("HOSTILE_SUITE_SECRET", "")
        """),
    # -- a record that kills every release (both channels run the model): it alone may be lost to a
    #    dead letter (DESIGN: "a bad record costs at most a dead letter"), the pipeline goes on
    Case("record_kills_every_release", "os._exit(3)", expect="dead_letter", hostile="both",
         reasons=frozenset(h.H.DLQ_REASONS)),
    # -- the standby is hostile: the good active must not notice -----------------------------------
    Case("standby_init_raises", expect="clean", hostile="standby", init="raise RuntimeError('standby refuses')"),
    Case("standby_hangs_in_hot_shadow", "time.sleep(10**6)", expect="clean", hostile="standby", mode="hot"),
    Case("standby_exits_in_hot_shadow", "os._exit(3)", expect="clean", hostile="standby", mode="hot"),
]


def _records() -> list:
    records = h.transactions(TOTAL, seed=23)
    for i in FAULTS:
        records[i] = h.with_fault(records[i])
    return records


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_release(kafka_bootstrap, tmp_path, good_bundle, case: Case):
    marker = str(7_000_000 + uuid.uuid4().int % 1_000_000)  # the `sleep` children's argument
    marker_dir = tmp_path / "pickle-ran-in-the-daemon"
    prelude = f"MARKER = {marker!r}\nMARKER_DIR = {str(marker_dir)!r}\n"
    source = h.model_source(prelude + textwrap.dedent(case.on_fault).strip(), init=case.init, close=case.close,
                            on_batch=case.on_batch)
    hostile = h.build_bundle(tmp_path, name="counter", version=h.HOSTILE_VERSION if case.hostile == "active"
                             else h.GOOD_VERSION, source=source)
    if case.hostile == "active":
        active, standby = hostile, good_bundle
    elif case.hostile == "both":
        active = h.build_bundle(tmp_path, name="counter", version=h.HOSTILE_VERSION, source=source)
        standby = hostile
    else:
        active = h.build_bundle(tmp_path, name="counter", version=h.HOSTILE_VERSION, source=h.model_source())
        standby = hostile
    secret = f"hostile-secret-{uuid.uuid4().hex}"
    records = _records()
    labels = [f"fault-{i}" if i in FAULTS else None for i in range(TOTAL)]
    checks = h.Checks()
    run = await h.start(kafka_bootstrap, tmp_path, active=active, standby=standby, prefix=f"hr-{case.id[:12]}",
                        failover={"standby_mode": case.mode}, env={"HOSTILE_SUITE_SECRET": secret})
    d = run.daemon
    try:
        await h.produce(kafka_bootstrap, run.names["input"], records[:FIRST], run.sent)
        await run.wait_committed(timeout=60)  # the hostile release answers the first records
        if case.hostile == "active":
            await run.wait_standby_ready()  # the good standby is there to fail over to
        if case.init.startswith("raise") and case.hostile == "standby":
            await checks("/status reports the standby as not ready", _standby_not_ready, d)
        await h.produce(kafka_bootstrap, run.names["input"], records[FIRST:], run.sent, labels=labels[FIRST:])
        outputs, dead = await checks.every_run(run)
        await checks(f"expected: {case.expect}", _expectation, case, run, outputs, dead)
        await checks("per-card state carried exactly once (counts 1, 2, 3...)", h.streams.assert_counts_chain,
                     outputs)
        if d.alive():
            await checks("SIGTERM: exit 0, no process of the daemon left", run.stop)
        if case.child:
            await checks("no child a model started survives", _no_children, marker)
        if case.secret:
            await checks("the model does not see the daemon's environment", _no_secret, secret, outputs)
        if case.pickle_marker:
            await checks("nothing the worker sends is executed in the daemon", _not_executed, marker_dir)
    finally:
        if d.alive():
            d.kill9()
        h.kill_pids(h.processes_matching(f"sleep {marker}"))
    checks.raise_if_any(d.log())


async def _standby_not_ready(d) -> None:
    import json

    code, body = d.get("/status")
    assert code == 200, f"/status answered {code}"
    doc = json.loads(body)
    assert doc.get("standby_ready") is False, f"standby_ready={doc.get('standby_ready')!r}"


def _expectation(case: Case, run: h.Run, outputs: list, dead: list) -> None:
    log = run.daemon.log()
    fo = h.failovers(log)
    by_pos = {h.streams.source_position(r): r for r in outputs + dead}
    faults = {label: pos for label, pos in run.sent.labels.items()}
    if case.expect == "failover":
        assert fo, "no failover happened"
        if case.failover_reason:
            assert any(f"reason={case.failover_reason}" in line for line in fo), \
                f"failover reason is not {case.failover_reason}: {fo}"
        h.assert_switched_once(outputs)
        isolated = [r for r in dead if h.reason_of(r) == "model_exception"]
        for label, pos in faults.items():
            r = by_pos.get(pos)
            assert r is not None and (r in isolated or r in outputs and h.release_of(r) == h.GOOD_VERSION), \
                f"{label}: expected an output of the standby, got {_describe(r)}"
        assert len(isolated) == len(dead) <= case.max_dead, \
            f"{len(dead)} dead letters (at most {case.max_dead} expected), e.g. {[_describe(r) for r in dead[:3]]}"
    elif case.expect == "dead_letter":
        problems = []
        for label, pos in faults.items():
            r = by_pos.get(pos)
            if r is None or r not in dead or h.reason_of(r) not in case.reasons:
                problems.append(f"{label}: expected a dead letter with reason in {sorted(case.reasons)}, "
                                f"got {_describe(r)}")
            elif case.detail not in h.detail_of(r):
                problems.append(f"{label}: the dead letter's detail lacks {case.detail!r}: {_describe(r)}")
        innocent = [r for r in dead if h.streams.source_position(r) not in faults.values()]
        if innocent:
            problems.append(f"{len(innocent)} records without a fault were dead-lettered, e.g. "
                            f"{[_describe(r) for r in innocent[:3]]}")
        if fo and case.hostile != "both":
            problems.append(f"the release failed over instead of dead-lettering the record: {fo[:2]}")
        versions = {h.release_of(r) for r in outputs}
        if versions != {h.HOSTILE_VERSION} and case.hostile != "both":
            problems.append(f"outputs came from {sorted(versions)}, expected only {h.HOSTILE_VERSION}")
        assert not problems, "; ".join(problems)
    else:
        assert not fo, f"unexpected failover: {fo[:2]}"
        assert not dead, f"{len(dead)} unexpected dead letters, e.g. {[_describe(r) for r in dead[:3]]}"
        versions = {h.release_of(r) for r in outputs}
        assert versions == {h.HOSTILE_VERSION}, f"outputs came from {sorted(versions)}"


def _describe(r) -> str:
    if r is None:
        return "nothing"
    hd = h.H.as_dict(r.headers)
    if h.H.H_DLQ_REASON in hd:
        return f"dead letter reason={h.reason_of(r)} detail={h.detail_of(r)[:200]!r}"
    return f"output of {h.release_of(r)}"


def _no_children(marker: str) -> None:
    left = h.processes_matching(f"sleep {marker}")
    assert not left, f"`sleep {marker}` started by the model still runs after the daemon exited: pids {left}"


def _no_secret(secret: str, outputs: list) -> None:
    leaked = [h.streams.source_position(r) for r in outputs if secret.encode() in r.value]
    assert not leaked, (f"{len(leaked)} outputs carry a secret of the daemon's environment (HOSTILE_SUITE_SECRET): "
                        "the model worker inherits os.environ (daemon/engine/worker.py start)")


def _not_executed(marker_dir) -> None:
    assert not marker_dir.exists(), (f"a pickle frame written by the model ran os.mkdir({marker_dir}) in the daemon: "
                                     "frames from the worker are unpickled (daemon/engine/framing.py read_async)")


async def test_sigterm_while_the_model_hangs(kafka_bootstrap, tmp_path, good_bundle):
    """SIGTERM while ``predict`` hangs in a worker that ignores SIGTERM (and the predict timeout is far
    off): the daemon exits 0 within systemd's 30 s, leaves no process behind and commits nothing of
    the hung interval; restarted on the good release, it finishes the input, every input once."""
    hanging = tmp_path / "model-is-hanging"
    source = h.model_source(f"open({str(hanging)!r}, 'w').close()\ntime.sleep(10**6)", init=IGNORE_SIGNALS)
    active = h.build_bundle(tmp_path, name="counter", version=h.HOSTILE_VERSION, source=source)
    records = _records()
    checks = h.Checks()
    run = await h.start(kafka_bootstrap, tmp_path, active=active, standby=good_bundle, prefix="hr-sigterm-hang",
                        worker={"predict_timeout_ms": 60000})
    first, second = run.daemon, None
    try:
        await h.produce(kafka_bootstrap, run.names["input"], records[:FIRST], run.sent)
        await run.wait_committed(timeout=60)
        await h.produce(kafka_bootstrap, run.names["input"], records[FIRST:], run.sent)
        await h.kafkatools.wait_for(lambda: first.check() and hanging.exists(), timeout=30,
                                    what="the model to hang on the fault record")
        t0 = h.time.monotonic()
        await checks("SIGTERM during a hung predict: exit 0, no process left", run.stop, 30.0)
        print(f"stopped in {h.time.monotonic() - t0:.1f}s")
        second = h.DaemonProc(first.config, "--active-bundle", str(good_bundle), log=tmp_path / "daemon2.log").start()
        run.daemon = second
        await checks("restarted on the good release, the pipeline finishes", run.wait_committed, None, 40)
        outputs, dead = await h.read_results(run)
        await checks("every input once under read_committed", h.assert_each_input_once, run.sent, outputs, dead)
        await checks("every output answers its own input", h.assert_outputs_answer_their_inputs, run.sent, outputs)
        if second.alive():
            await checks("SIGTERM: exit 0, no process of the daemon left", run.stop)
    finally:
        for d in (first, second):
            if d is not None and d.alive():
                d.kill9()
    checks.raise_if_any(first.log() + (second.log() if second else ""))


@pytest.mark.parametrize("channel", ["standby", "active"])
async def test_sigterm_while_a_release_loads(kafka_bootstrap, tmp_path, good_bundle, channel):
    """SIGTERM while a release's worker is still loading (its constructor hangs and ignores
    SIGTERM): the daemon exits 0 and the loading worker goes with it, at once. The standby loads
    while the active serves (a cut-short load left its process running until it noticed its parent
    was gone); the active loads at start (the stop waited for the load, then the 27 s backstop:
    exit 1)."""
    loading = tmp_path / "release-is-loading"
    hanging = h.model_source(init=textwrap.dedent(IGNORE_SIGNALS)
                             + f"open({str(loading)!r}, 'w').close()\ntime.sleep(10**6)\n")
    if channel == "standby":
        active = h.build_bundle(tmp_path, name="counter", version=h.HOSTILE_VERSION, source=h.model_source())
        standby = h.build_bundle(tmp_path, name="counter", version=h.GOOD_VERSION, source=hanging)
    else:
        active = h.build_bundle(tmp_path, name="counter", version=h.HOSTILE_VERSION, source=hanging)
        standby = good_bundle
    checks = h.Checks()
    run = await h.start(kafka_bootstrap, tmp_path, active=active, standby=standby, prefix=f"hr-sigterm-{channel}")
    try:
        if channel == "standby":
            await h.produce(kafka_bootstrap, run.names["input"], _records()[:FIRST], run.sent)
            await run.wait_committed(timeout=60)  # the active serves while the standby loads
        await h.kafkatools.wait_for(lambda: run.daemon.check() and loading.exists(), timeout=60,
                                    what=f"the {channel}'s constructor to hang")
        await checks(f"SIGTERM while the {channel} loads: exit 0, no process left", run.stop, 30.0)
    finally:
        if run.daemon.alive():
            run.daemon.kill9()
    checks.raise_if_any(run.daemon.log())


async def test_sigterm_while_waiting_for_kafka_exits_0_at_once(tmp_path, good_bundle):
    """No broker at the bootstrap address: the daemon retries with backoff. SIGTERM then is a clean
    stop: exit 0 well within the shutdown grace, no model process left (it used to exit with the
    connection error, after the rest of its backoff)."""
    from tests.daemonproc import DaemonProc, free_port, write_config

    names = {r: f"nowhere-{r}" for r in ("input", "output", "dlq", "changelog", "checkpoint", "control")}
    cfg = write_config(tmp_path / "f.toml", bootstrap=f"127.0.0.1:{free_port()}", names=names,
                       state_dir=tmp_path / "state", group="g-nowhere", app="app-nowhere")
    d = DaemonProc(cfg, "--active-bundle", str(good_bundle), log=tmp_path / "daemon.log").start()
    try:
        await h.kafkatools.wait_for(lambda: "Kafka not reachable; retrying" in d.log(), timeout=60,
                                    what="the daemon to retry the broker")
        workers = d.worker_pids_in_session()
        t0 = h.time.monotonic()
        code = d.terminate(timeout=15)
        assert code == 0, f"exit {code} on SIGTERM while waiting for Kafka; log:\n{d.log()[-2000:]}"
        assert h.time.monotonic() - t0 < 6, "the stop waited out the backoff"
        left = [p for w in workers for p in h.session_processes(w, include_leader=True)]
        assert not left, f"processes left: {left}"
    finally:
        if d.alive():
            d.kill9()
