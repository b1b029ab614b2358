"""Loading: a TOML file, then ``FAILOVERD_<SECTION>__<KEY>`` overrides, into checked :class:`Settings`.

Every problem of a file is collected and reported at once, one per line, each naming the file,
the key, the bad value, what was expected and, for an override, the environment variable.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from daemon.config.fields import (
    ENV_PREFIX, ENV_SEPARATOR, MASK, NO_VALUE, Problem, Section, closest, expected, field_problems, kind,
    problems_of, show, type_name,
)
from daemon.config.sections import SECTIONS
from daemon.config.settings import TOPIC_ROLES, Settings, topic_role_problems
from daemon.errors import ConfigError


def env_var(section: str, key: str) -> str:
    """The environment variable that overrides ``section.key``."""
    return f"{ENV_PREFIX}{section.upper()}{ENV_SEPARATOR}{key.upper()}"


def load(path: str | Path, env: Mapping[str, str] = os.environ) -> Settings:
    """Read, override from ``env`` and validate one configuration file."""
    path = Path(path)
    shown = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{shown}: configuration file not found (working directory {Path.cwd()}); "
                          "pass the path of an existing file, e.g. config/failoverd.toml") from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory, expected a TOML configuration file") from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read the configuration file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: not valid UTF-8 at byte {exc.start}; TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown}: not valid TOML: {exc}") from None
    return parse(data, env=env, source=path.absolute(), where=shown)


def parse(data: Mapping[str, Any], *, env: Mapping[str, str] = os.environ, source: Path | None = None,
          where: str | None = None) -> Settings:
    """Build :class:`Settings` from already-parsed TOML data (``load`` without the file)."""
    where = where if where is not None else (str(source) if source else "<config>")
    problems: list[tuple[Problem, str]] = []  # (problem, origin note)

    def report(problem: Problem, origin: str = "") -> None:
        problems.append((problem, origin))

    # 1. unknown sections and keys, sections that are not tables
    tables: dict[str, dict[str, Any]] = {}
    bindings: dict[str, Path] = {}
    for name, value in data.items():
        if name == BINDINGS:
            bindings = _bindings(value, report)
        elif name not in SECTIONS:
            report(Problem(f"[{name}]", NO_VALUE, _unknown_help(name, SECTIONS, "section", "[", "]"),
                           "is an unknown section"))
        elif not isinstance(value, dict):
            report(Problem(name, value, f"expected a table ([{name}]), got {type_name(value)}", "has the wrong type"))
        else:
            tables[name] = dict(value)
            keys = [f.name for f in dataclasses.fields(SECTIONS[name])]
            for key in value:
                if key not in keys:
                    report(Problem(f"{name}.{key}", NO_VALUE, _unknown_help(key, keys, f"key of [{name}]"),
                                   "is an unknown key"))

    # 2. environment overrides: FAILOVERD_<SECTION>__<KEY>
    overrides: dict[tuple[str, str], tuple[str, str]] = {}  # (section, key) -> (variable, text)
    env_sections = {s.upper(): s for s in SECTIONS}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or ENV_SEPARATOR not in var[len(ENV_PREFIX):]:
            continue
        sec_part, _, key_part = var[len(ENV_PREFIX):].partition(ENV_SEPARATOR)
        if sec_part == BINDINGS.upper():
            _binding_from_env(var, key_part, env[var], bindings, report)
            overrides[(BINDINGS, var)] = (var, env[var])
            continue
        section = env_sections.get(sec_part)
        if section is None:
            close = closest(sec_part, env_sections)
            hint = (f"did you mean {ENV_PREFIX}{close}{ENV_SEPARATOR}{key_part}?" if close else
                    f"overrides are {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>, sections: {', '.join(SECTIONS)}")
            report(Problem(f"environment variable {var}", NO_VALUE,
                           f"there is no section [{sec_part.lower()}]; {hint}", "is unknown"))
            continue
        env_keys = {f.name.upper(): f.name for f in dataclasses.fields(SECTIONS[section])}
        key = env_keys.get(key_part)
        if key is None:
            close = closest(key_part, env_keys)
            hint = (f"did you mean {env_var(section, close)}?" if close else
                    f"keys of [{section}] are: {', '.join(env_keys.values())}")
            report(Problem(f"environment variable {var}", NO_VALUE,
                           f"[{section}] has no key {key_part.lower()}; {hint}", "is unknown"))
            continue
        overrides[(section, key)] = (var, env[var])

    # 3. typed values per section, then section checks
    built: dict[str, Section] = {}
    origins: dict[str, str] = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        table = tables.get(name, {})
        kwargs: dict[str, Any] = {}
        complete = True
        first_problem = len(problems)
        for f in dataclasses.fields(cls):
            field_path = f"{name}.{f.name}"
            base, optional = kind(hints[f.name])
            if (name, f.name) in overrides:
                var, text = overrides[(name, f.name)]
                origin = f" (from environment variable {var})"
                origins[field_path] = origin
                value, problem = _from_env(field_path, text, base, optional, f.metadata)
            elif f.name in table:
                origin = ""
                value, problem = _from_toml(field_path, table[f.name], base, optional, f.metadata)
            else:
                if isinstance(f.default, Path):  # relative default paths resolve at load time too
                    kwargs[f.name] = _resolve(str(f.default))
                if f.default is dataclasses.MISSING:
                    example = f.metadata.get("example")
                    report(Problem(field_path, NO_VALUE,
                                   f"expected {expected(base, f.metadata)}, e.g. {f.name} = {show(example)} "
                                   f"under [{name}] (or set {env_var(name, f.name)})", "is missing"))
                    complete = False
                continue
            if problem is not None:
                report(problem, origin)
                complete = False
                continue
            if value is None and not optional:
                continue  # the default applies
            found = field_problems(name, f, hints[f.name], value)
            for p in found:
                report(p, origin)
            complete = complete and not found
            kwargs[f.name] = value
        if not complete:
            # Every problem at once: the cross-field checks still run on the keys that are valid.
            bad = {p.field.split("[")[0] for p, _ in problems[first_problem:]}
            for p in _partial_cross_problems(cls, kwargs, bad):
                report(p, origins.get(p.field.split("[")[0], ""))
            continue
        try:
            built[name] = cls(**kwargs)
        except ConfigError as exc:
            for p in problems_of(exc):
                report(p, origins.get(p.field.split("[")[0], ""))
    if problems:
        if all(role.section in built for role in TOPIC_ROLES):  # topic roles are checkable too
            for p in topic_role_problems(types.SimpleNamespace(**built)):
                report(p, origins.get(p.field.split("[")[0], ""))
        raise ConfigError("\n".join(f"{where}: {p.render(origin)}" for p, origin in problems))
    sections: dict[str, Any] = dict(built)  # each its own Section subclass, as Settings declares
    try:
        return Settings(source=source, env_overrides=tuple(var for var, _ in overrides.values()), bindings=bindings,
                        **sections)
    except ConfigError as exc:
        raise ConfigError("\n".join(f"{where}: {p.render(origins.get(p.field.split('[')[0], ''))}"
                                    for p in problems_of(exc))) from None


BINDINGS = "bindings"
"""The free-form table of per-environment bindings (name -> file or directory; docs/bundles.md#bindings)."""


def _bindings(table: Any, report: Any) -> dict[str, Path]:
    """``[bindings]`` of the file: every name valid (daemon.bundle.bindings.NAME_RE), every value a path."""
    from daemon.bundle.bindings import NAME_RE, NAME_TEXT

    if not isinstance(table, dict):
        report(Problem(BINDINGS, table, f"expected a table ([bindings]) of name = \"path\", got {type_name(table)}",
                       "has the wrong type"))
        return {}
    out = {}
    for name, value in table.items():
        field = f"{BINDINGS}.{name}"
        if not NAME_RE.match(name):
            report(Problem(field, NO_VALUE, f"a binding name is {NAME_TEXT}", "is not a valid binding name"))
        elif not isinstance(value, str) or not value.strip():
            report(Problem(field, value, "expected the path of a file or directory, e.g. "
                                         f"{name} = \"/etc/fraud/merchants.csv\"", "has the wrong type"))
        else:
            out[name] = _resolve(value)
    return out


def _binding_from_env(var: str, key: str, text: str, bindings: dict[str, Path], report: Any) -> None:
    """``FAILOVERD_BINDINGS__<NAME>``: binds (or, empty, unbinds) the binding whose name upper-cases to
    ``<NAME>`` in the file, else the lower-case name."""
    from daemon.bundle.bindings import NAME_RE, NAME_TEXT

    name = next((n for n in bindings if n.upper() == key), key.lower())
    if not NAME_RE.match(name):
        report(Problem(f"environment variable {var}", NO_VALUE, f"a binding name is {NAME_TEXT}",
                       "is not a valid binding name"))
    elif not text.strip():
        bindings.pop(name, None)
    else:
        bindings[name] = _resolve(text.strip())


def _partial_cross_problems(cls: type[Section], kwargs: dict[str, Any], bad: set[str]) -> list[Problem]:
    """The cross-field problems of a section some of whose keys are invalid (``bad``: their paths).

    Invalid keys take their defaults; a problem on an invalid key, or whose message names one (the
    check then compared against a value the user did not write), is left out.
    """
    section = object.__new__(cls)  # no __post_init__: the field checks already reported
    for f in dataclasses.fields(cls):
        path = f"{cls.SECTION}.{f.name}"
        if f.name in kwargs and path not in bad:
            value = kwargs[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        object.__setattr__(section, f.name, value)
    try:
        found = section._cross_problems()
    except Exception:  # a check that cannot run on a partial section says nothing
        return []
    return [p for p in found if p.field.split("[")[0] not in bad and not any(b in p.render() for b in bad)]


def _unknown_help(word: str, options: Iterable[str], what: str, pre: str = "", post: str = "") -> str:
    options = list(options)
    close = closest(word, options)
    if close:
        return f"did you mean {pre}{close}{post}?"
    return f"valid {what}s are: {', '.join(options)}" if len(options) <= 20 else f"not a valid {what}"


def _resolve(value: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(value)))


def _from_toml(path: str, value: Any, base: type, optional: bool, meta: Mapping[str, Any]) -> tuple[Any, Problem | None]:
    """A TOML value converted to the field's type, or the problem with it."""
    shown = MASK if meta["secret"] else value

    def wrong() -> tuple[None, Problem]:
        return None, Problem(path, shown, f"expected {expected(base, meta)}, got {type_name(value)}",
                             "has the wrong type")

    if base is bool:
        return (value, None) if isinstance(value, bool) else wrong()
    if base is int:
        return (value, None) if isinstance(value, int) and not isinstance(value, bool) else wrong()
    if base is float:
        return (float(value), None) if isinstance(value, (int, float)) and not isinstance(value, bool) else wrong()
    if base is tuple:
        if isinstance(value, str):
            return _split(path, value, meta)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(v.strip() for v in value), None
        return wrong()
    if not isinstance(value, str):
        return wrong()
    if optional and value == "":
        return None, None
    if base is Path or meta["path"]:
        if value == "":
            return None, Problem(path, value, f"expected {expected(base, meta)}")
        resolved = _resolve(value)
        return (resolved if base is Path else str(resolved)), None
    return value, None


def _split(path: str, text: str, meta: Mapping[str, Any]) -> tuple[Any, Problem | None]:
    items = [item.strip() for item in text.split(",")]
    if text.strip() and any(not item for item in items):
        return None, Problem(path, text, "expected comma-separated non-empty entries, e.g. \"a,b\"")
    return tuple(item for item in items if item), None


def _from_env(path: str, text: str, base: type, optional: bool, meta: Mapping[str, Any]) -> tuple[Any, Problem | None]:
    """An environment variable's text converted to the field's type, or the problem with it."""
    shown = MASK if meta["secret"] else text
    stripped = text.strip()
    if optional and stripped == "":
        return None, None
    try:
        if base is bool:
            lowered = stripped.lower()
            if lowered in ("true", "1"):
                return True, None
            if lowered in ("false", "0"):
                return False, None
            return None, Problem(path, shown, "expected true, false, 1 or 0")
        if base is int:
            return int(stripped), None
        if base is float:
            return float(stripped), None
    except ValueError:
        return None, Problem(path, shown, f"expected {expected(base, meta)}")
    if base is tuple:
        return _split(path, text, meta)
    return _from_toml(path, text, base, optional, meta)
