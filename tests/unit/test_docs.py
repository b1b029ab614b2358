"""The docs name only things that exist: commands and flags, metrics, configuration keys.

README.md and docs/*.md are read as a user reads them; what they name is looked up in the code,
never in a list kept here (others add metrics and keys all the time):

- ``failoverd <command> ... --flag`` in code spans and code blocks: the argparse tree of
  daemon/cli.py (every subcommand on the way, every flag of the parsers reached);
- ``failoverd_*`` metric names: daemon/metrics.py's REGISTRY (with the ``_total``, ``_bucket``,
  ``_sum``, ``_count`` sample suffixes of their types);
- configuration keys written ``section.key``, ``[section] key``, ``FAILOVERD_<SECTION>__<KEY>``,
  or as failoverd configuration in a TOML code block: daemon/config.py's SECTIONS.

Each failure names the file and line, so a wrong doc is fixed where it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from daemon import config
from daemon.cli import build_parser
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FILE_SUFFIXES = {"py", "md", "toml", "json", "jsonl", "yml", "yaml", "service", "log", "txt", "csv", "lock", "sh",
                 "fdb", "sqlite", "properties", "xml", "html", "png", "cfg", "ini"}
# A line that shows a mistake on purpose (an error message quoting the user's typo).
SHOWS_A_MISTAKE = re.compile(r"unknown key|unknown section|did you mean|is unknown")


@dataclasses.dataclass(frozen=True)
class Snippet:
    """Code from a doc: one code span, or one logical line of a fenced block (continuations joined)."""

    where: str  # file:line
    text: str
    lang: str  # the fence's language; "span" for a code span


def snippets(path: Path) -> list[Snippet]:
    out: list[Snippet] = []
    lines = path.read_text().splitlines()
    rel = path.relative_to(ROOT)
    fence, lang, pending, start = None, "", "", 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if fence is None and stripped.startswith("```"):
            fence, lang = stripped[:3], stripped[3:].strip() or "text"
            continue
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
                continue
            if not pending:
                start = number
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append(Snippet(f"{rel}:{start}", pending + line, lang))
            pending = ""
            continue
        for i, part in enumerate(line.split("`")):
            if i % 2 == 1:
                out.append(Snippet(f"{rel}:{number}", part.replace("\\|", "|"), "span"))
    return out


def toml_blocks(path: Path) -> list[tuple[str, str]]:
    """(file:line, text) of each ```toml block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if current is None and line.strip() == "```toml":
            current, start = [], number
        elif current is not None and line.strip().startswith("```"):
            blocks.append((f"{path.relative_to(ROOT)}:{start}", "\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


# ---- commands and flags ------------------------------------------------------------------------

# `failoverd` as the command word: at the start of a code span or of a line of a code block, after
# an optional prompt, `sudo -u USER`, environment assignments, a path (.venv/bin/, /opt/failoverd/bin/).
INVOCATION = re.compile(r"^\s*(?:\$\s+)?(?:sudo\s+(?:-u\s+\S+\s+)?)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
                        r"(?:ExecStart=)?(?:[\w./-]*/)?failoverd\s+(.*)$")


def invocations() -> list[tuple[str, str]]:
    """(file:line, argument text) of every ``failoverd ...`` in code, up to a comment, pipe or `;`."""
    found = []
    for path in DOCS:
        for s in snippets(path):
            if s.lang not in ("span", "sh", "bash", "console", "shell", "text"):
                continue
            if m := INVOCATION.match(s.text):
                rest = re.split(r"\s#|\s\|\s|\s&&\s|;|\s\|\|\s|\$\(|\)", m.group(1))[0]
                found.append((s.where, rest))
    return found


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


def check_invocation(root: argparse.ArgumentParser, text: str) -> list[str]:
    """What in ``failoverd <text>`` does not exist, as messages (empty when everything does)."""
    try:
        tokens = shlex.split(text.replace("[", " ").replace("]", " "))
    except ValueError:
        tokens = text.replace("[", " ").replace("]", " ").split()
    if not tokens or not re.fullmatch(r"-{1,2}[a-z][\w-]*(=.*)?|[a-z][a-z-]*(\|[a-z][a-z-]*)*", tokens[0]):
        return []  # `failoverd ...`, `failoverd: error`, a path: not an invocation
    problems: list[str] = []
    level = [root]  # the parsers reached (alternatives `a|b` reach several)
    options = dict(_options(root))
    skip_value = False
    for token in tokens:
        if skip_value:
            skip_value = False
            continue
        if token.startswith("-") and len(token) > 1 and token not in ("-", "--"):
            flag = token.split("=", 1)[0]
            if flag not in options:
                problems.append(f"no flag {flag} (known here: {', '.join(sorted(o for o in options if o.startswith('--')))})")
                continue
            action = options[flag]
            skip_value = "=" not in token and action.nargs != 0
            continue
        subs = {name: sub for p in level for name, sub in _subparsers(p).items()}
        if not subs:
            continue  # a positional value (FILE, NAME@VERSION, up|down|status) of the parsers reached
        names = token.split("|")
        if not all(re.fullmatch(r"[a-z][a-z-]*", n) for n in names):
            problems.append(f"{token!r} is not a command here (commands: {', '.join(sorted(subs))})")
            break
        unknown = [n for n in names if n not in subs]
        if unknown:
            problems.append(f"no command {' '.join(unknown)} (commands here: {', '.join(sorted(subs))})")
            break
        level = [subs[n] for n in names]
        for p in level:
            options.update(_options(p))
    return problems


def test_every_failoverd_command_and_flag_in_the_docs_exists():
    root = build_parser()
    found = invocations()
    assert len(found) > 50, "the docs should be full of failoverd commands; is the parser of this test broken?"
    problems = [f"{where}: `failoverd {text.strip()}`: {p}"
                for where, text in found for p in check_invocation(root, text)]
    assert not problems, "\n".join(problems)


def test_the_command_checker_catches_what_does_not_exist():
    root = build_parser()
    assert check_invocation(root, "kafka up|down|status --port N --json") == []
    assert check_invocation(root, "ctl status|failover --url URL") == []
    assert check_invocation(root, "--log-format json run --config F") == []
    assert check_invocation(root, "bundle vrify PATH")
    assert check_invocation(root, "bundle build SRC --outdir D")
    assert check_invocation(root, "release status --json --frob")
    assert check_invocation(root, "dlq list|purge")


# ---- metrics -----------------------------------------------------------------------------------

SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("_sum", "_count", "_created"), "info": ("_info",), "gauge": (), "stateset": (),
            "enum": (), "gaugehistogram": ("_bucket", "_gsum", "_gcount"), "unknown": ()}


def metric_names() -> set[str]:
    from daemon.metrics import REGISTRY

    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


def test_every_metric_named_in_the_docs_exists():
    known = metric_names()
    assert "failoverd_records_in_total" in known
    problems = []
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in re.findall(r"(?<![\w-])failoverd_[a-z0-9_]*[a-z0-9]", line):
                if name not in known:
                    problems.append(f"{path.relative_to(ROOT)}:{number}: metric {name} is not in "
                                    "daemon/metrics.py's REGISTRY")
    assert not problems, "\n".join(problems)


# ---- configuration keys ------------------------------------------------------------------------

def keys_of(section: str) -> set[str]:
    return {f.name for f in dataclasses.fields(config.SECTIONS[section])}


def config_key_problems(path: Path) -> list[str]:
    sections = list(config.SECTIONS)
    dotted = re.compile(r"(?<![\w.$/-])(" + "|".join(sections) + r")\.([a-z_][a-z0-9_]*)\b(?![(/-]|\.\w)")
    bracketed = re.compile(r"^\[(" + "|".join(sections) + r")\]\s+([a-z_][a-z0-9_]*)")
    env = re.compile(r"\bFAILOVERD_([A-Z][A-Z_]*?)__([A-Z][A-Z0-9_]*)\b")
    rel = path.relative_to(ROOT)
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if SHOWS_A_MISTAKE.search(line):
            continue
        named = [(m.group(1), m.group(2)) for m in dotted.finditer(line) if m.group(2) not in FILE_SUFFIXES]
        for i, part in enumerate(line.split("`")):
            if i % 2 == 1 and (m := bracketed.match(part.strip())):
                named.append((m.group(1), m.group(2)))
        for m in env.finditer(line):
            section = m.group(1).lower()
            if section not in config.SECTIONS:
                if section.upper() not in ("SECTION",):
                    problems.append(f"{rel}:{number}: FAILOVERD_{m.group(1)}__{m.group(2)}: no section [{section}]")
                continue
            if m.group(2) != "KEY":
                named.append((section, m.group(2).lower()))
        for section, key in named:
            if key not in keys_of(section):
                problems.append(f"{rel}:{number}: {section}.{key}: [{section}] has no key {key} "
                                f"(keys: {', '.join(sorted(keys_of(section)))})")
    for where, text in toml_blocks(path):
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue  # an excerpt with "..." in it
        if not any(name in config.SECTIONS for name in doc):
            continue  # bundle.toml, topics.toml, pyproject
        for name, table in doc.items():
            if name not in config.SECTIONS:
                problems.append(f"{where}: [{name}] is not a configuration section")
            elif isinstance(table, dict):
                problems += [f"{where}: [{name}] {key}: no such key" for key in table if key not in keys_of(name)]
    return problems


def test_every_configuration_key_named_in_the_docs_exists():
    problems = [p for path in DOCS for p in config_key_problems(path)]
    assert not problems, "\n".join(problems)


def test_the_key_checker_catches_a_key_that_does_not_exist(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("Set `checkpoint.interval_msec`, `[kafka] bootstrap` and FAILOVERD_STATE__DIR.\n"
                   "```toml\n[kafka]\nbootstrap_servers = [\"h:1\"]\nretries = 3\n```\n"
                   "but `checkpoint.interval_ms`, `[kafka] bootstrap_servers`, app.py are fine.\n")
    monkeypatch.setattr("tests.unit.test_docs.ROOT", tmp_path)
    problems = config_key_problems(doc)
    assert [p.split(": ")[1] for p in problems] == ["checkpoint.interval_msec", "kafka.bootstrap", "state.dir",
                                                    "[kafka] retries"], problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_doc_is_read_by_these_checks(doc):
    assert snippets(doc), f"{doc} has no code at all?"
