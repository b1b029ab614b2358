"""A newcomer's mistakes, command by command: one error line and the documented exit code, never a traceback.

Every case runs ``python -m daemon ...`` as a real subprocess, the way a user meets it. No misuse
case needs a broker: "no broker" is a closed port (127.0.0.1:1), where a connection is refused at
once. (The last test, marked integration, runs the demo on the local broker and then the
commands its report prints.)
The exit codes are the table of README.md ("Exit codes") and daemon/cli.py:

    0 ok · 1 failed · 2 usage (bad flags, missing files, invalid configuration)
    3 broker down (`kafka status`) / some dead letters not replayable · 141 stdout closed early
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daemon.bundle import build
from tests.conftest import ROOT

NO_BROKER = "127.0.0.1:1"
TIMEOUT = 60
# argparse's own usage errors: "usage: ..." lines, then "failoverd <command>: error: ..."
ARGPARSE_ERROR = re.compile(r"^failoverd( [a-z-]+)*: error: .+")


def failoverd(*args: str, stdin: str | None = None, stdout=subprocess.PIPE, cwd: Path = ROOT):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVERD_")}
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=TIMEOUT, env=env)


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, str]:
    """Files for the cases: a real bundle, a config whose broker is a closed port, bad inputs."""
    d = tmp_path_factory.mktemp("misuse")
    bundle = build(ROOT / "examples" / "bundles" / "fraud-v1", d / "dist").path
    (d / "a-file").write_text("not a directory\n")
    (d / "not-a-bundle.fdb").write_text("hello\n")
    (d / "bad.toml").write_text("[kafka\n")
    samples = (ROOT / "examples" / "bundles" / "fraud-v1" / "samples.jsonl").read_text().splitlines()
    (d / "bad-lines.jsonl").write_text("\n".join([samples[0], "{this is not json", samples[1], "[1,"]) + "\n")
    (d / "registry").mkdir()
    return {"bundle": str(bundle), "dir": str(d), "file": str(d / "a-file"), "missing": str(d / "missing"),
            "not_bundle": str(d / "not-a-bundle.fdb"), "bad_toml": str(d / "bad.toml"),
            "bad_lines": str(d / "bad-lines.jsonl"), "registry": str(d / "registry"),
            "no_broker_config": _no_broker_config(d)}


def _no_broker_config(d: Path) -> str:
    """config/failoverd.toml with its broker replaced by a closed port (same topics as config/topics.toml)."""
    text = (ROOT / "config" / "failoverd.toml").read_text()
    text, n = re.subn(r'(?m)^bootstrap_servers\s*=.*$', f'bootstrap_servers = ["{NO_BROKER}"]', text)
    assert n == 1, "config/failoverd.toml has no bootstrap_servers line to replace"
    text = re.sub(r'(?m)^(path|directory)\s*=\s*"[^"]*"', lambda m: f'{m.group(1)} = "{d / m.group(1)}"', text)
    path = d / "no-broker.toml"
    path.write_text(text)
    return str(path)


# (id, argv with {placeholders}, expected exit code, a word the error line must contain)
CASES = [
    # bad flags and arguments (argparse)
    ("unknown-flag", ["--no-such-flag"], 2, "unrecognized arguments"),
    ("unknown-command", ["frobnicate"], 2, "invalid choice"),
    ("bundle-no-action", ["bundle"], 2, "required"),
    ("build-no-out", ["bundle", "build", "{dir}"], 2, "--out"),
    ("promote-bad-channel", ["release", "promote", "x@1", "--channel", "live", "--reason", "r"], 2, "invalid choice"),
    ("ctl-timeout-not-a-number", ["ctl", "status", "--timeout", "soon"], 2, "invalid float"),
    ("demo-records-not-a-number", ["demo", "--records", "many"], 2, "--records"),
    ("kafka-port-not-a-number", ["kafka", "status", "--port", "x"], 2, "invalid int"),
    # missing files, wrong kinds of paths
    ("verify-missing", ["bundle", "verify", "{missing}"], 2, "no such file"),
    ("verify-check-env-missing", ["bundle", "verify", "{missing}", "--check-env"], 2, "no such file"),
    ("inspect-missing", ["bundle", "inspect", "{missing}"], 2, "no such file"),
    ("inspect-not-a-bundle", ["bundle", "inspect", "{not_bundle}"], 1, "not a bundle archive"),
    ("verify-not-a-bundle", ["bundle", "verify", "{not_bundle}"], 1, "not a bundle archive"),
    ("try-missing-bundle", ["bundle", "try", "{missing}"], 2, "no such file"),
    ("try-missing-input", ["bundle", "try", "{bundle}", "--input", "{missing}"], 2, "--input"),
    ("try-input-is-a-dir", ["bundle", "try", "{bundle}", "--input", "{dir}"], 2, "directory"),
    ("build-missing-source", ["bundle", "build", "{missing}", "--out", "{dir}/out"], 2, "no such file"),
    ("build-out-is-a-file", ["bundle", "build", "examples/bundles/fraud-v1", "--out", "{file}"], 2,
     "not a directory"),
    ("config-missing", ["config", "check", "{missing}"], 2, "not found"),
    ("config-is-a-dir", ["config", "check", "{dir}"], 2, "directory"),
    ("config-not-toml", ["config", "check", "{bad_toml}"], 2, "not valid TOML"),
    ("run-missing-config", ["run", "--config", "{missing}"], 2, "not found"),
    ("run-missing-bundle", ["run", "--active-bundle", "{missing}"], 2, "--active-bundle"),
    ("status-missing-registry", ["release", "status", "--registry", "{missing}"], 2, "does not exist"),
    ("history-missing-registry", ["release", "history", "--registry", "{missing}"], 2, "does not exist"),
    ("status-registry-is-a-file", ["release", "status", "--registry", "{file}"], 2, "not a directory"),
    ("history-bad-time", ["release", "history", "--at", "yesterday", "--registry", "{registry}"], 1, "ISO 8601"),
    ("status-missing-config", ["release", "status", "--config", "{missing}"], 2, "does not exist"),
    ("promote-missing-bundle", ["release", "promote", "fraud-scorer@1.0.0", "--channel", "active", "--reason",
                                "r", "--registry", "{registry}", "--bundle", "{missing}"], 2, "--bundle"),
    ("promote-unknown-release", ["release", "promote", "nope@9", "--channel", "active", "--reason", "r",
                                 "--registry", "{registry}", "--no-publish"], 1, "nope@9"),
    ("rollback-nothing", ["release", "rollback", "--reason", "r", "--registry", "{registry}", "--no-publish"], 1,
     ""),
    ("dlq-missing-config", ["dlq", "list", "--config", "{missing}"], 2, "not found"),
    ("dlq-bad-since", ["dlq", "list", "--config", "{no_broker_config}", "--since", "last week"], 2, "ISO 8601"),
    ("ctl-token-file-missing", ["ctl", "failover", "--url", f"http://{NO_BROKER}", "--token-file", "{missing}"],
     2, "--token-file"),
    # no broker, no daemon
    ("kafka-status-down", ["kafka", "status", "--port", "1"], 3, None),
    ("topics-check-no-broker", ["topics", "check", "--config", "{no_broker_config}"], 1, "127.0.0.1:1"),
    ("topics-apply-no-broker", ["topics", "apply", "--dry-run", "--config", "{no_broker_config}"], 1, "127.0.0.1:1"),
    ("failover-no-broker", ["failover", "--reason", "drill", "--config", "{no_broker_config}"], 1, "127.0.0.1:1"),
    ("sync-no-broker", ["release", "sync", "--registry", "{registry}", "--bootstrap", NO_BROKER,
                        "--control-topic", "ctl"], 1, "127.0.0.1:1"),
    ("dlq-list-no-broker", ["dlq", "list", "--config", "{no_broker_config}"], 1, "127.0.0.1:1"),
    ("dlq-replay-no-broker", ["dlq", "replay", "--dry-run", "--config", "{no_broker_config}"], 1, "127.0.0.1:1"),
    ("ctl-no-daemon", ["ctl", "status", "--url", f"http://{NO_BROKER}"], 1, "cannot reach"),
    ("demo-no-broker", ["demo", "--bootstrap", NO_BROKER], 1, "failoverd kafka up"),
]


def _argv(args: list[str], w: dict[str, str]) -> list[str]:
    return [a.format(**w) for a in args]


@pytest.fixture(scope="module")
def results(w):
    """Every case at once (in threads: each is a subprocess), so the matrix costs seconds, not a minute."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {case[0]: pool.submit(failoverd, *_argv(case[1], w)) for case in CASES}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name,args,code,word", CASES, ids=[c[0] for c in CASES])
def test_misuse_gives_one_error_line_and_the_documented_exit_code(results, name, args, code, word):
    proc = results[name]
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode == code, out
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if word is None:  # a status, not an error: one line on stdout
        assert proc.stderr == "" and len(proc.stdout.splitlines()) == 1, out
        return
    if code == 2 and lines and lines[0].startswith("usage:"):  # argparse: usage, then its error line
        assert ARGPARSE_ERROR.match(lines[-1]), out
        assert sum("error:" in line for line in lines) == 1, out
    else:
        assert len(lines) == 1 and lines[0].startswith("failoverd: error: "), out
    assert word in lines[-1], out


def test_bundle_try_reports_a_line_that_is_not_json_and_goes_on(w):
    proc = failoverd("bundle", "try", w["bundle"], "--input", w["bad_lines"])
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == 1, proc.stderr  # a bad input line is a failure of the try, as a schema error
    import json

    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["line"] for d in docs] == [1, 2, 3, 4]
    assert "output" in docs[0] and "output" in docs[2]  # the good lines around the bad ones still ran
    assert docs[1]["input_error"][0].startswith("not JSON") and docs[3]["input_error"][0].startswith("not JSON")
    assert docs[2]["state"]["count"] == 2  # state carried across the bad line


@pytest.mark.parametrize("args", [
    ["bundle", "inspect", "{bundle}", "--json"],
    ["bundle", "inspect", "{bundle}"],
    ["config", "check", "config/failoverd.toml"],
    ["config", "check", "config/failoverd.toml", "--json"],
    ["release", "history", "--registry", "{registry}"],
    ["bundle", "try", "{bundle}", "--input", "{bad_lines}"],
    ["kafka", "status", "--port", "1"],
], ids=lambda a: " ".join(a))
def test_a_closed_stdout_ends_quietly_with_141(w, args):
    """`failoverd ... | head`: the reader is gone before we write; no traceback, exit 141 (128 + SIGPIPE).

    (argparse's --help ignores write errors itself: it exits 0, quietly too.)
    """
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE, deterministically
    try:
        proc = failoverd(*_argv(args, w), stdout=write_end)
    finally:
        os.close(write_end)
    assert proc.stderr == "", proc.stderr
    assert proc.returncode == 141


def test_config_check_lists_the_cross_key_problem_with_the_others(tmp_path):
    """heartbeat >= session timeout is reported even when another [kafka] key is invalid too."""
    cfg = tmp_path / "f.toml"
    cfg.write_text('[kafka]\nheartbeat_interval_ms = 5000\nsession_timeout_ms = 3000\nsecurity_protocol = "TLS"\n'
                   '[inputs]\ntopics = ["in"]\n[output]\ntopic = "in"\n[dead_letter]\ntopic = "dlq"\n'
                   '[failover]\nmin_samples = 500\nerror_window = 100\ncooldown_ms = -1\n')
    proc = failoverd("config", "check", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    for needle in ("kafka.security_protocol", "kafka.heartbeat_interval_ms = 5000",
                   "failover.cooldown_ms", "failover.min_samples = 500", "output.topic"):
        assert sum(needle in line for line in lines) == 1, (needle, proc.stderr)
    # a cross check that involves the invalid key itself is left out: it would compare with a default
    cfg.write_text('[kafka]\nheartbeat_interval_ms = 50000\nsession_timeout_ms = "x"\n')
    proc = failoverd("config", "check", str(cfg))
    assert "kafka.session_timeout_ms" in proc.stderr and "heartbeat_interval_ms" not in proc.stderr, proc.stderr


# ---- what a modern CLI has: help on every argument, --json, completion ------------------------

def _leaves(parser, path=("failoverd",)):
    """(command path, parser) of every parser with no subcommands below it, and of every parser."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaves(sub, (*path, name))


def _all_parsers(parser, path=("failoverd",)):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*path, name))


def test_every_argument_of_every_command_has_help():
    import argparse

    from daemon.cli import build_parser

    missing = [f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}"
               for path, p in _all_parsers(build_parser()) for a in p._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and (not a.help or a.help == argparse.SUPPRESS) and a.default != argparse.SUPPRESS]
    assert not missing, "arguments without help text:\n" + "\n".join(missing)


# Commands that print results but have no --json, and why.
NO_JSON = {
    ("failoverd", "run"): "the daemon: logs, not results (--log-format json)",
    ("failoverd", "demo"): "a human report; the facts are in its topics and its daemon's /status",
    ("failoverd", "topics", "apply"): "prints the plan as it applies it; `topics check --json` says the result",
    ("failoverd", "bundle", "try"): "always prints JSON lines",
    ("failoverd", "completion"): "prints a shell script",
    **{("failoverd", "ctl", a): "always prints the admin API's JSON" for a in ("status", "failover", "promote",
                                                                              "rollback")},
}


def test_every_command_that_prints_results_has_json():
    from daemon.cli import build_parser

    lacking = [" ".join(path) for path, p in _leaves(build_parser())
               if path not in NO_JSON and "--json" not in {o for a in p._actions for o in a.option_strings}]
    assert not lacking, "commands without --json (add it, or say why not in NO_JSON): " + ", ".join(lacking)


def test_bash_completion_completes_commands_flags_and_choices(tmp_path):
    proc = failoverd("completion", "bash")
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "failoverd.bash"
    script.write_text(proc.stdout)
    probe = r'''
source "$1"
complete_line() {
  local line="$1"; read -ra COMP_WORDS <<< "$line"; [[ "$line" == *" " ]] && COMP_WORDS+=("")
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMP_LINE="$line"; COMP_POINT=${#line}; COMPREPLY=()
  _shtab_failoverd; echo "${COMPREPLY[*]}"
}
complete_line "failoverd bundle ve"
complete_line "failoverd kafka "
complete_line "failoverd release promote x --channel "
complete_line "failoverd dlq replay --dry"
'''
    out = subprocess.run(["bash", "-c", probe, "probe", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["verify", "up down status token", "active standby", "--dry-run"], out.stdout


# ---- the demo's report ends with commands that work as printed ----------------------------------

@pytest.mark.integration
def test_the_demo_report_ends_with_commands_that_work_as_printed(kafka_bootstrap):
    """`failoverd demo` runs with its own configuration under .local/demo/<run>/; the commands it
    prints at the end show its release history and dead letters, not config/failoverd.toml's."""
    import shlex

    demo = failoverd("demo", "--records", "1500", "--bootstrap", kafka_bootstrap)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    tail = demo.stdout.split("== look at what it did", 1)[1].splitlines()[1:]
    commands = [shlex.split(line) for line in tail if line.strip()]
    assert [c[1:3] for c in commands[:3]] == [["release", "history"], ["dlq", "list"], ["config", "check"]], tail
    config_file = Path(commands[0][-1])
    assert config_file.is_file() and ".local/demo/" in str(config_file)
    assert commands[3][0] == "less" and Path(commands[3][1]).is_file()  # the daemon log
    outputs = {}
    for argv in commands[:3]:
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        outputs[argv[2]] = proc.stdout
    assert "failover" in outputs["history"] and "fraud-scorer@2.0.0" in outputs["history"]
    assert "bad_json" in outputs["list"]  # the demo's poison record
    assert "valid" in outputs["check"].splitlines()[0]
