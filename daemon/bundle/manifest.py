"""``bundle.toml`` (what the data scientist writes) and ``MANIFEST.json`` (what the build records).

``bundle.toml``::

    [bundle]
    name = "fraud-scorer"                # letters, digits, . _ -
    version = "1.0.0"
    entrypoint = "model:FraudScorer"     # module:Class, module found under code/
    python = "3.11"                      # the Python (major.minor) the lock was made for
    state_schema_version = 1             # bump when the shape of per-key state changes
    # code = "code"                      # optional: the directory added to sys.path

    [schemas]                            # JSON Schema files (any draft; latest when no $schema), or Avro (.avsc)
    input = "schemas/input.json"
    output = "schemas/output.json"

    [data]                               # name -> file; the model gets absolute paths by name
    weights = "data/weights.json"

    [dependencies]
    lock = "requirements.lock"           # exact name==version pins (may be empty of packages)

    [bindings]                           # optional: per-environment inputs, name -> description;
    reference_table = "merchant CSV"     # each environment binds them (daemon/bundle/bindings.py)

    [metadata]                           # free-form: author, description, training run, ...

``MANIFEST.json`` is the parsed ``bundle.toml`` plus ``format`` and ``files`` (every file's
``sha256`` and ``size``, ``bundle.toml`` included), written as canonical JSON: sorted keys,
no whitespace, UTF-8. The bundle digest is the sha256 of those bytes, so it covers every file.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from daemon.bundle import files as bfiles
from daemon.bundle.bindings import NAME_RE as BINDING_NAME_RE
from daemon.bundle.bindings import NAME_TEXT as BINDING_NAME_TEXT
from daemon.bundle.lock import parse_lock
from daemon.errors import BundleError, IntegrityError

FORMAT = 1
TOML_NAME = "bundle.toml"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$")
ENTRYPOINT_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
PYTHON_RE = re.compile(r"^\d+\.\d+$")
DATA_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

_SECTIONS = {
    "bundle": ({"name", "version", "entrypoint", "python", "state_schema_version"}, {"code"}),
    "schemas": ({"input", "output"}, set()),
    "dependencies": ({"lock"}, set()),
}
_OPTIONAL_SECTIONS = {"data", "metadata", "bindings"}


def canonical_json(obj: Any) -> bytes:
    """The one byte encoding of a JSON value: sorted keys, no whitespace, UTF-8."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def _jsonable(value: Any, where: str, errors: list[str]) -> Any:
    """TOML values as JSON values (dates become ISO strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}", errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        errors.append(f"{where} = {value}: not representable in JSON; write it as a string")
        return None
    return value


class _Checker:
    """Collects every problem of one bundle.toml, so the author fixes them in one go."""

    def __init__(self, root: Path, label: str) -> None:
        self.root = root
        self.label = label
        self.errors: list[str] = []

    def fail(self, msg: str) -> None:
        self.errors.append(msg)

    def string(self, table: dict[str, Any], section: str, key: str, pattern: re.Pattern[str] | None, example: str) -> str | None:
        value = table.get(key)
        if not isinstance(value, str) or not value:
            self.fail(f"[{section}] {key} must be a non-empty string (got {value!r}); e.g. {key} = {example}")
            return None
        if pattern and not pattern.match(value):
            self.fail(f"[{section}] {key} = {value!r} is malformed; e.g. {key} = {example}")
            return None
        return value

    def relpath(self, value: Any, field: str, *, is_dir: bool = False) -> str | None:
        if not isinstance(value, str) or not value:
            self.fail(f"{field} must be a relative path string (got {value!r})")
            return None
        p = PurePosixPath(value)
        if "\\" in value or p.is_absolute() or ".." in p.parts:
            self.fail(f"{field} = {value!r} must be a relative path inside the bundle (no '..', no leading '/')")
            return None
        rel = p.as_posix()
        if rel in (".", bfiles.MANIFEST_NAME) or bfiles.is_ignored(rel):
            self.fail(f"{field} = {value!r} names a file that cannot be part of a bundle")
            return None
        full = self.root / rel
        if full.is_symlink():
            self.fail(f"{field} = {value!r} is a symlink; fix: put the real file in the bundle")
        elif is_dir and not full.is_dir():
            self.fail(f"{field} = {value!r}: directory {full} does not exist")
        elif not is_dir and not full.is_file():
            self.fail(f"{field} = {value!r}: file {full} does not exist; fix: add it or correct the path")
        else:
            return rel
        return None

    def schema(self, rel: str, field: str) -> None:
        if rel.endswith(".avsc"):
            self.avro_schema(rel, field)
            return
        try:
            from jsonschema.exceptions import SchemaError
            from jsonschema.validators import validator_for
        except ImportError:  # a worker in a release environment has only the compiled validator
            validator_for = None  # type: ignore[assignment]

        path = self.root / rel
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            self.fail(f"{field} = {rel!r}: {path} is not JSON: {exc}")
            return
        if not isinstance(schema, dict):
            self.fail(f"{field} = {rel!r}: a JSON Schema must be an object, got {type(schema).__name__}")
            return
        if validator_for is None:
            import jsonschema_rs

            try:
                jsonschema_rs.meta.validate(schema)
            except jsonschema_rs.ValidationError as exc:
                at = "/".join(str(p) for p in exc.instance_path) or "(root)"
                self.fail(f"{field} = {rel!r}: not a valid JSON Schema at {at}: {exc.message}")
            return
        try:
            validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            at = "/".join(str(p) for p in exc.path) or "(root)"
            self.fail(f"{field} = {rel!r}: not a valid JSON Schema at {at}: {exc.message}")

    def avro_schema(self, rel: str, field: str) -> None:
        """An ``.avsc``: JSON that fastavro parses as an Avro record schema (values are records: the
        model sees each as a dict). Named types it references must be defined in the same file."""
        from daemon.formats.avro import parse

        path = self.root / rel
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, OSError) as exc:
            self.fail(f"{field} = {rel!r}: {path} is not JSON: {exc}")
            return
        if not isinstance(schema, dict) or schema.get("type") != "record":
            self.fail(f"{field} = {rel!r}: an Avro schema for record values must be a record "
                      f"({{\"type\": \"record\", \"name\": ..., \"fields\": [...]}}), got {str(schema)[:80]}")
            return
        try:
            parse(schema)
        except Exception as exc:  # noqa: BLE001 - fastavro raises several kinds for a bad schema
            self.fail(f"{field} = {rel!r}: not a valid Avro schema: {type(exc).__name__}: {exc}"[:500])

    def entrypoint(self, entrypoint: str, code: str) -> None:
        module = entrypoint.split(":", 1)[0]
        base = self.root / code / Path(*module.split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()):
            rel = f"{code}/{module.replace('.', '/')}"
            self.fail(f"[bundle] entrypoint = {entrypoint!r}: module {module!r} not found: "
                      f"expected {rel}.py or {rel}/__init__.py")


def load_spec(root: Path) -> dict[str, Any]:
    """Parse and check ``root/bundle.toml``; the manifest without ``files``/``format``.

    Raises BundleError naming the bundle, ``bundle.toml`` and every problem with its fix.
    """
    root = Path(root)
    toml_path = root / TOML_NAME
    label = f"bundle at {root}"
    if not toml_path.is_file():
        raise BundleError(f"{label}: no {TOML_NAME}; fix: write one (see docs/bundles.md)")
    try:
        doc = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{label}: {toml_path} is not valid TOML: {exc}; fix the syntax "
                          f"(see docs/bundles.md for an example)") from None
    name = doc.get("bundle", {}).get("name") if isinstance(doc.get("bundle"), dict) else None
    if isinstance(name, str) and name:
        label = f"bundle {name} ({toml_path})"
    else:
        label = f"bundle at {root} ({toml_path})"
    c = _Checker(root, label)

    for key in doc:
        if key not in _SECTIONS and key not in _OPTIONAL_SECTIONS:
            c.fail(f"unknown section [{key}]; known: " + ", ".join(sorted([*_SECTIONS, *_OPTIONAL_SECTIONS])))
    tables: dict[str, dict[str, Any]] = {}
    for section, (required, optional) in _SECTIONS.items():
        table = doc.get(section)
        if not isinstance(table, dict):
            c.fail(f"missing section [{section}] with " + ", ".join(sorted(required)))
            tables[section] = {}
            continue
        tables[section] = table
        for key in sorted(required - table.keys()):
            c.fail(f"[{section}] {key} is missing")
        for key in sorted(table.keys() - required - optional):
            c.fail(f"[{section}] unknown key {key!r}; known: " + ", ".join(sorted(required | optional)))

    b = tables["bundle"]
    spec_bundle: dict[str, Any] = {}
    if "name" in b:
        spec_bundle["name"] = c.string(b, "bundle", "name", NAME_RE, '"fraud-scorer"')
    if "version" in b:
        spec_bundle["version"] = c.string(b, "bundle", "version", VERSION_RE, '"1.0.0"')
    if "entrypoint" in b:
        spec_bundle["entrypoint"] = c.string(b, "bundle", "entrypoint", ENTRYPOINT_RE,
                                             '"model:FraudScorer" (module:Class)')
    if "python" in b:
        spec_bundle["python"] = c.string(b, "bundle", "python", PYTHON_RE, '"3.11"')
    if "state_schema_version" in b:
        ssv = b["state_schema_version"]
        if isinstance(ssv, bool) or not isinstance(ssv, int) or ssv < 1:
            c.fail(f"[bundle] state_schema_version must be an integer >= 1 (got {ssv!r})")
        spec_bundle["state_schema_version"] = ssv
    code = c.relpath(b.get("code", "code"), "[bundle] code", is_dir=True)
    spec_bundle["code"] = code
    if code and spec_bundle.get("entrypoint"):
        c.entrypoint(spec_bundle["entrypoint"], code)

    schemas = {}
    for key in ("input", "output"):
        if key in tables["schemas"]:
            rel = c.relpath(tables["schemas"][key], f"[schemas] {key}")
            if rel:
                c.schema(rel, f"[schemas] {key}")
            schemas[key] = rel

    data = {}
    raw_data = doc.get("data", {})
    if not isinstance(raw_data, dict):
        c.fail("[data] must be a table of name = \"path\"")
        raw_data = {}
    for key, value in raw_data.items():
        if not DATA_NAME_RE.match(key):
            c.fail(f"[data] name {key!r} is malformed; use letters, digits and _ . -")
        data[key] = c.relpath(value, f"[data] {key}")

    deps = {}
    if "lock" in tables["dependencies"]:
        rel = c.relpath(tables["dependencies"]["lock"], "[dependencies] lock")
        if rel:
            try:
                parse_lock(root / rel, label)
            except BundleError as exc:
                c.fail(str(exc).removeprefix(label + ": "))
        deps["lock"] = rel

    bindings: dict[str, str] = {}
    raw_bindings = doc.get("bindings", {})
    if not isinstance(raw_bindings, dict):
        c.fail("[bindings] must be a table of name = \"description\"")
        raw_bindings = {}
    for key, value in raw_bindings.items():
        if not BINDING_NAME_RE.match(key):
            c.fail(f"[bindings] name {key!r} is malformed; use {BINDING_NAME_TEXT}")
        if not isinstance(value, str):
            c.fail(f"[bindings] {key} must be a string describing the input (got {value!r}); "
                   f"e.g. {key} = \"merchant reference table (CSV)\"")
        bindings[key] = value

    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        c.fail("[metadata] must be a table")
        metadata = {}
    metadata = _jsonable(metadata, "[metadata]", c.errors)

    if c.errors:
        raise BundleError(f"{label} is invalid:\n  " + "\n  ".join(c.errors)
                          + "\nfix: correct bundle.toml (format: docs/bundles.md)")
    spec = {"bundle": spec_bundle, "schemas": schemas, "data": data, "dependencies": deps, "metadata": metadata}
    if bindings:  # absent when none are declared: manifests (and digests) of other bundles stay as they were
        spec["bindings"] = bindings
    return spec


def read_manifest(root: Path, label: str | None = None) -> tuple[dict[str, Any], str, bytes]:
    """(manifest, digest, raw bytes) of ``root/MANIFEST.json``; errors if absent or not canonical."""
    path = Path(root) / bfiles.MANIFEST_NAME
    label = label or f"bundle at {root}"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{label}: {bfiles.MANIFEST_NAME} is missing, so this is not a built bundle; "
                             f"fix: build it with `failoverd bundle build SRC --out DIR`") from None
    return parse_manifest(raw, label) + (raw,)


def parse_manifest(raw: bytes, label: str) -> tuple[dict[str, Any], str]:
    """(manifest, digest) from MANIFEST.json bytes."""
    try:
        manifest = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise IntegrityError(f"{label}: {bfiles.MANIFEST_NAME} is not JSON ({exc}); fix: rebuild the bundle") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or not isinstance(manifest.get("files"), dict)):
        raise IntegrityError(f"{label}: {bfiles.MANIFEST_NAME} is not a format-{FORMAT} bundle manifest; "
                             f"fix: rebuild the bundle with this failoverd")
    if canonical_json(manifest) != raw:
        raise IntegrityError(f"{label}: {bfiles.MANIFEST_NAME} is not in canonical form (it was edited); "
                             f"fix: rebuild the bundle")
    for rel, entry in manifest["files"].items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or not isinstance(entry.get("size"), int)):
            raise IntegrityError(f"{label}: {bfiles.MANIFEST_NAME} entry for {rel!r} lacks sha256/size; "
                                 f"fix: rebuild the bundle")
    return manifest, bfiles.digest_bytes(raw)


def spec_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest that comes from bundle.toml (for the consistency check)."""
    deps = {k: v for k, v in manifest.get("dependencies", {}).items() if k != "wheels"}
    spec = {"bundle": manifest.get("bundle"), "schemas": manifest.get("schemas"), "data": manifest.get("data"),
            "dependencies": deps, "metadata": manifest.get("metadata")}
    if "bindings" in manifest:
        spec["bindings"] = manifest["bindings"]
    return spec
