"""``failoverd config check FILE [--json]``: validate a configuration and print the effective values."""

from __future__ import annotations

import json
from typing import Any

from daemon import config


def register(sub) -> None:
    p = sub.add_parser("config", help="validate a configuration file and show the effective values",
                       description="Validate a failoverd TOML configuration, with FAILOVERD_<SECTION>__<KEY> "
                                   "environment overrides applied, and print the effective configuration "
                                   "(secrets masked). Exit 0 when valid, 2 with every problem listed when not.")
    actions = p.add_subparsers(dest="config_action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate FILE and print the effective configuration")
    check.add_argument("file", metavar="FILE", help="configuration file, e.g. config/failoverd.toml")
    check.add_argument("--json", action="store_true", help="print the effective configuration as JSON")
    check.set_defaults(func=run_check)


def run_check(args) -> int:
    settings = config.load(args.file)  # ConfigError -> exit 2 through daemon.cli
    if args.json:
        print(json.dumps(settings.to_dict(), indent=2))
        return 0
    print(f"# {settings.source}: valid")
    for var in settings.env_overrides:
        print(f"# overridden by the environment: {var}")
    print("# effective configuration (defaults filled in, paths resolved, secrets masked)")
    print(to_toml(settings.to_dict()))
    return 0


def to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """TOML text of ``Settings.to_dict()``; unset optional keys appear as comments."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} is not set")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic-string escapes
