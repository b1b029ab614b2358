"""Fields and their checks: what a settings key may hold, and the :class:`Problem` when it does not.

A section (daemon/config/sections.py) is a frozen dataclass whose fields are made by :func:`key`:
the annotation says how a value is parsed, the metadata which values are valid. :class:`Section`
runs the same checks on construction, so a section built in code is checked like one loaded from
a file. :func:`closest` is the one "did you mean" of the configuration and topics files.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

ENV_PREFIX = "FAILOVERD_"
ENV_SEPARATOR = "__"
MASK = "***"

TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")
APP_NAME = re.compile(r"[a-zA-Z0-9._-]+")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "OAUTHBEARER")


# ---- problems ------------------------------------------------------------------------------

NO_VALUE: Any = object()


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration.

    ``field`` is the dotted path (``checkpoint.interval_ms``, ``inputs.topics[1]``); ``value`` the
    offending value (already masked when secret) or ``NO_VALUE``; ``expected`` what would be valid.
    """

    field: str
    value: Any
    expected: str
    verb: str = "is invalid"

    def render(self, origin: str = "") -> str:
        if self.value is NO_VALUE:
            return f"{self.field}{origin} {self.verb}: {self.expected}"
        return f"{self.field} = {show(self.value)}{origin} {self.verb}: {self.expected}"


def show(value: Any) -> str:
    """A value as it would be written in TOML (strings quoted), for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def invalid(problems: list[Problem], where: str = "") -> ConfigError:
    """One ConfigError for ``problems``, one per line; :func:`problems_of` gives them back."""
    prefix = f"{where}: " if where else ""
    exc = ConfigError("\n".join(prefix + p.render() for p in problems))
    setattr(exc, "problems", problems)  # noqa: B010 - ConfigError stays the one exception users see
    return exc


def problems_of(exc: ConfigError) -> list[Problem]:
    """The problems an :func:`invalid` error carries (none for other ConfigErrors)."""
    problems: list[Problem] = getattr(exc, "problems", [])
    return problems


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def closest(word: str, options: Iterable[str], *, ignore_case: bool = False) -> str | None:
    """The option most like ``word`` ("did you mean"), or None; ``ignore_case`` tries lower case too."""
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    if not close and ignore_case:
        lowered = difflib.get_close_matches(word.lower(), [o.lower() for o in options], n=1, cutoff=0.6)
        close = [o for o in options if o.lower() in lowered]
    return close[0] if close else None


# ---- field metadata and checks ---------------------------------------------------------------

def key(default: Any = dataclasses.MISSING, *, min: float | None = None, max: float | None = None,
        gt: float | None = None, choices: tuple[str, ...] | None = None, pattern: re.Pattern[str] | None = None,
        pattern_text: str = "", check: Callable[[Any], str | None] | None = None, secret: bool = False,
        path: bool = False, example: Any = None) -> Any:
    """A settings field: ``default`` plus what makes a value valid.

    ``min``/``max`` inclusive, ``gt`` exclusive lower bound; ``choices`` an enum; ``pattern`` a
    full-match regex (also applied to each element of a tuple); ``check`` returns an error text or
    None; ``secret`` masks the value in :meth:`Settings.to_dict` and messages; ``path`` resolves a
    ``str`` field as a path; ``example`` is shown when a required key is missing.
    """
    meta = {"min": min, "max": max, "gt": gt, "choices": choices, "pattern": pattern,
            "pattern_text": pattern_text, "check": check, "secret": secret, "path": path,
            "example": example}
    return dataclasses.field(default=default, metadata=meta)


def kind(hint: Any) -> tuple[type, bool]:
    """(base type, optional) of an annotation: ``str | None`` -> (str, True); tuple[str, ...] -> (tuple, False)."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is tuple:
        return tuple, optional
    return hint, optional


def expected(base: type, meta: Mapping[str, Any]) -> str:
    """What a valid value of this field looks like, in words."""
    if meta["choices"]:
        return "one of " + ", ".join(meta["choices"])
    if base is bool:
        return "true or false"
    if base in (int, float):
        noun = "an integer" if base is int else "a number"
        bounds = []
        if meta["gt"] is not None:
            bounds.append(f"> {meta['gt']}")
        if meta["min"] is not None:
            bounds.append(f">= {meta['min']}")
        if meta["max"] is not None:
            bounds.append(f"<= {meta['max']}")
        return noun + (" " + " and ".join(bounds) if bounds else "")
    if base is tuple:
        what = f" ({meta['pattern_text']})" if meta["pattern_text"] else ""
        return f"a non-empty list of strings{what}, or one comma-separated string"
    if base is Path or meta["path"]:
        return "a file system path (string)"
    if meta["pattern_text"]:
        return str(meta["pattern_text"])
    return "a non-empty string"


def check_value(name: str, value: Any, base: type, meta: Mapping[str, Any]) -> list[Problem]:
    """Range/enum/pattern checks of an already typed value."""
    shown = MASK if meta["secret"] else value
    wanted = expected(base, meta)
    if base in (int, float):
        if (meta["min"] is not None and value < meta["min"]) or (meta["max"] is not None and value > meta["max"]) \
                or (meta["gt"] is not None and value <= meta["gt"]):
            return [Problem(name, shown, f"expected {wanted}", "is out of range")]
        return []
    if base is str:
        if value == "":
            return [Problem(name, shown, f"expected {wanted}")]
        if meta["choices"] and value not in meta["choices"]:
            close = closest(value, meta["choices"], ignore_case=True)
            hint = f" (did you mean {show(close)}?)" if close else ""
            return [Problem(name, shown, f"expected {wanted}{hint}")]
        if meta["pattern"] is not None and not meta["pattern"].fullmatch(value):
            return [Problem(name, shown, f"expected {wanted}")]
    if base is tuple:
        if not value:
            return [Problem(name, value, f"expected {wanted}")]
        out = []
        for i, item in enumerate(value):
            if meta["pattern"] is not None and not meta["pattern"].fullmatch(item):
                out.append(Problem(f"{name}[{i}]", item, f"expected {meta['pattern_text']}"))
        if len(set(value)) != len(value):
            dupes = sorted({v for v in value if value.count(v) > 1})
            out.append(Problem(name, value, f"expected each entry once, {show(dupes[0])} is repeated"))
        if out:
            return out
        if meta["check"] is not None:
            for i, item in enumerate(value):
                err = meta["check"](item)
                if err:
                    out.append(Problem(f"{name}[{i}]", item, f"expected {err}"))
            return out
        return []
    if meta["check"] is not None:
        err = meta["check"](value)
        if err:
            return [Problem(name, shown, f"expected {err}")]
    return []


def host_port(value: str) -> str | None:
    """None when ``value`` is host:port with port 0-65535 (IPv6 as [::1]:9092)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "host:port with a port number 0-65535, e.g. \"127.0.0.1:9092\""
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return "host:port; write IPv6 addresses in brackets, e.g. \"[::1]:9092\""
    return None


def topic_name(value: str) -> str | None:
    if value in (".", ".."):
        return "a Kafka topic name other than \".\" or \"..\""
    return None


# The checks of every field that names a topic: ``key(..., **TOPIC)``.
TOPIC: dict[str, Any] = dict(pattern=TOPIC_NAME,
                             pattern_text="a Kafka topic name: 1-249 characters of a-z A-Z 0-9 . _ -",
                             check=topic_name)


@dataclasses.dataclass(frozen=True)
class Section:
    """Checks shared by every settings section (run on construction); each section is a frozen
    dataclass of its own fields (the base has none)."""

    SECTION: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        problems = self._field_problems() + self._cross_problems()
        if problems:
            raise invalid(problems)

    def _field_problems(self) -> list[Problem]:
        hints = typing.get_type_hints(type(self))
        problems: list[Problem] = []
        for f in dataclasses.fields(self):
            problems += field_problems(self.SECTION, f, hints[f.name], getattr(self, f.name))
        return problems

    def _cross_problems(self) -> list[Problem]:
        return []


def field_problems(section: str, f: dataclasses.Field[Any], hint: Any, value: Any) -> list[Problem]:
    """Type and range problems of one field's value."""
    base, optional = kind(hint)
    name = f"{section}.{f.name}"
    if value is None:
        if optional:
            return []
        return [Problem(name, NO_VALUE, f"expected {expected(base, f.metadata)}", "is missing")]
    if not _isinstance(value, base):
        return [Problem(name, MASK if f.metadata.get("secret") else value,
                        f"expected {expected(base, f.metadata)}, got {type_name(value)}", "has the wrong type")]
    return check_value(name, value, base, f.metadata)


def _isinstance(value: Any, base: type) -> bool:
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return isinstance(value, base)
