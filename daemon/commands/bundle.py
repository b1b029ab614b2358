"""``failoverd bundle build|verify|inspect|try``: package a model and check it (docs/bundles.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from daemon.commands import existing_path, input_file, output_dir

PATH_HELP = "a .fdb bundle archive (from `failoverd bundle build`) or an unpacked bundle directory"
PATH_FIX = "pass a .fdb archive from `failoverd bundle build` or an unpacked bundle directory"


def _bundle_path(path: Path) -> Path:
    return existing_path("bundle", path, PATH_FIX)


def register(sub) -> None:
    p = sub.add_parser("bundle", help="build, verify, inspect and try model bundles",
                       description="Package a model (code, data, schemas, dependency lock) as one content-addressed "
                                   "archive, check one, or run it on sample records. See docs/bundles.md.")
    bsub = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    b = bsub.add_parser("build", help="build SRC (a directory with bundle.toml) into one .fdb archive")
    b.add_argument("src", type=Path, help="bundle source directory (holds bundle.toml)")
    b.add_argument("--out", type=Path, required=True, help="output directory for the archive")
    b.add_argument("--with-wheels", action="store_true",
                   help="also pip download the lock's wheels into wheels/ (for hosts without a package index)")
    b.add_argument("--json", action="store_true", help="print {path, digest, name, version} as JSON")
    b.set_defaults(func=run_build)

    v = bsub.add_parser("verify", help="re-hash a bundle (archive or unpacked dir); name every bad file")
    v.add_argument("path", type=Path, help=PATH_HELP)
    v.add_argument("--check-env", action="store_true",
                   help="also check that this Python and its installed packages satisfy the lock")
    v.add_argument("--json", action="store_true", help="print {ok, ref, digest, files, environment_checked} as JSON")
    v.set_defaults(func=run_verify)

    i = bsub.add_parser("inspect", help="show a bundle's manifest")
    i.add_argument("path", type=Path, help=PATH_HELP)
    i.add_argument("--json", action="store_true", help="the whole manifest and digest as JSON")
    i.set_defaults(func=run_inspect)

    t = bsub.add_parser("try", help="run a bundle in this process on JSON-lines records; check both schemas",
                        description="Each input line is {\"key\": ..., \"value\": {...}} or a bare value. Inputs and "
                                    "outputs are validated against the bundle's schemas, state is carried per key. "
                                    "Prints one JSON line per record. Exit 1 if an input or output violated its "
                                    "schema, was not JSON, or predict raised (a RecordError is a dead letter, not a "
                                    "failure); a bad line is reported and the next one is read.")
    t.add_argument("path", type=Path, help=PATH_HELP)
    t.add_argument("--input", type=Path, help="JSON-lines file (default: stdin)")
    t.add_argument("--unpack-dir", type=Path, help="where archives are unpacked (default: user cache)")
    t.set_defaults(func=run_try)

    for name, helptext in (("push", "copy a stored bundle to another registry directory or an object store "
                                    "(fsspec URL), digest unchanged"),
                           ("pull", "fetch a bundle by digest from an instance's admin URL, another registry "
                                    "directory or an object store; verified by digest, source remembered")):
        q = bsub.add_parser(name, help=helptext)
        if name == "push":
            q.add_argument("ref", help="NAME@VERSION or digest in this registry")
            q.add_argument("--to", required=True, help="registry directory, or fsspec URL (s3://bucket/prefix)")
        else:
            q.add_argument("digest", help="the full digest (64 hex characters)")
            q.add_argument("--from", dest="source", required=True,
                           help="http(s):// admin URL of an instance, registry directory, or fsspec URL")
            q.add_argument("--token-file", type=Path, help="bearer token for an admin URL (admin or read token)")
        q.add_argument("--config", type=Path, default=None, help="configuration file ([registry] path)")
        q.add_argument("--registry", type=Path, help="registry directory (overrides [registry] path)")
        q.add_argument("--json", action="store_true", help="print {digest, path|to, new} as JSON")
        q.set_defaults(func=run_push if name == "push" else run_pull)


def run_push(args) -> int:
    from daemon.commands.release import _registry
    from daemon.distribution.transfer import push

    digest, new = push(_registry(args, must_exist=True), args.ref, args.to)
    doc = {"digest": digest, "to": args.to, "new": new}
    print(json.dumps(doc) if args.json else f"{'pushed' if new else 'already there:'} {digest} -> {args.to}")
    return 0


def run_pull(args) -> int:
    from daemon.admin import load_token
    from daemon.commands.release import _registry
    from daemon.distribution.transfer import pull

    token = load_token(args.token_file, None) if args.token_file else None
    path = pull(_registry(args), args.digest, args.source, token)
    doc = {"digest": args.digest, "path": str(path), "from": args.source}
    print(json.dumps(doc) if args.json else f"pulled {args.digest} from {args.source} into {path}")
    return 0


def run_build(args) -> int:
    from daemon.bundle.build import build
    from daemon.progress import Progress

    existing_path("bundle source", args.src, "pass the directory holding bundle.toml")
    with Progress(f"building {args.src}") as progress:
        built = build(args.src, output_dir("--out", args.out), with_wheels=args.with_wheels, progress=progress)
    if args.json:
        print(json.dumps({"path": str(built.path), "digest": built.digest, "name": built.manifest["bundle"]["name"],
                          "version": built.manifest["bundle"]["version"]}))
    else:
        print(f"built {built.ref} digest {built.digest}\n  {built.path} ({len(built.manifest['files'])} files)")
    return 0


def run_verify(args) -> int:
    from daemon.bundle.loader import Bundle
    from daemon.bundle.verify import verify_path

    if args.check_env:
        import tempfile

        from daemon.bundle.loader import open_bundle

        with tempfile.TemporaryDirectory(prefix="failoverd-verify-") as tmp:
            bundle: Bundle = open_bundle(_bundle_path(args.path), Path(tmp))
            bundle.check_environment()
            ref, digest, n = bundle.ref, bundle.digest, len(bundle.manifest["files"])
    else:
        v = verify_path(_bundle_path(args.path))
        ref, digest, n = v.ref, v.digest, len(v.manifest["files"])
    if args.json:
        print(json.dumps({"ok": True, "ref": ref, "digest": digest, "files": n,
                          "environment_checked": args.check_env}))
        return 0
    env = ", environment satisfies the lock" if args.check_env else ""
    print(f"ok: {ref} digest {digest}: {n} files verify{env}")
    return 0


def _read_manifest(path: Path) -> tuple[dict, str]:
    """The manifest alone (the archive's first member): inspecting is not verifying."""
    from daemon.bundle import archive
    from daemon.bundle.manifest import read_manifest

    if path.is_dir():
        manifest, digest, _ = read_manifest(path)
        return manifest, digest
    return archive.peek_manifest(path, f"bundle archive {path}")


def run_inspect(args) -> int:
    manifest, digest = _read_manifest(_bundle_path(args.path))
    if args.json:
        print(json.dumps({"digest": digest, "manifest": manifest}, indent=2, sort_keys=True))
        return 0
    b = manifest["bundle"]
    lines = [f"{b['name']}@{b['version']}  digest {digest}",
             f"  entrypoint            {b['entrypoint']}  (code dir {b['code']}/)",
             f"  python                {b['python']}",
             f"  state schema version  {b['state_schema_version']}",
             f"  input schema          {manifest['schemas']['input']}",
             f"  output schema         {manifest['schemas']['output']}",
             f"  lock                  {manifest['dependencies']['lock']}"
             + (f"  (+ wheels in {wheels}/)" if (wheels := manifest["dependencies"].get("wheels")) else "")]
    for name, rel in sorted(manifest["data"].items()):
        lines.append(f"  data {name:<16} {rel}")
    for key, value in sorted(manifest["metadata"].items()):
        lines.append(f"  meta {key:<16} {value}")
    lines.append(f"  files ({len(manifest['files'])}):")
    for rel, entry in sorted(manifest["files"].items()):
        lines.append(f"    {entry['sha256'][:16]}  {entry['size']:>9}  {rel}")
    print("\n".join(lines))
    return 0


def run_try(args) -> int:
    import orjson
    from jsonschema.validators import validator_for

    from daemon.bundle.loader import open_bundle
    from daemon.formats.avro import AvroValidator
    from daemon.model import Record, RecordError, normalize

    _bundle_path(args.path)
    if args.input is not None:
        input_file("--input", args.input)  # before the bundle is unpacked and its model loaded
    if args.unpack_dir is not None:
        output_dir("--unpack-dir", args.unpack_dir)
    bundle = open_bundle(args.path, args.unpack_dir)
    bundle.check_environment()
    model: Any = bundle.instantiate()  # a release's model: predict(); warm_up() and close() optional
    if callable(getattr(model, "warm_up", None)):
        model.warm_up()
    validate_in, validate_out = (
        AvroValidator(schema) if bundle.manifest["schemas"][side].endswith(".avsc")  # .avsc: JSON records checked
        else validator_for(schema)(schema)                                           # against the Avro schema
        for side, schema in (("input", bundle.input_schema), ("output", bundle.output_schema)))
    source = open(args.input, encoding="utf-8", errors="replace") if args.input else sys.stdin
    states: dict = {}
    failed = 0
    try:
        for number, line in enumerate(source, 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError as exc:  # the engine dead-letters it (bad_json); go on
                failed += 1
                print(json.dumps({"line": number, "input_error": [f"not JSON: {exc}"]}))
                continue
            key, value = (doc.get("key"), doc["value"]) if isinstance(doc, dict) and "value" in doc else (None, doc)
            errors = sorted(e.message for e in validate_in.iter_errors(value))
            if errors:
                failed += 1
                print(json.dumps({"line": number, "key": key, "input_error": errors}))
                continue
            try:
                result = normalize(model.predict([Record(key, value, states.get(key))])[0])
            except Exception as exc:  # the engine fails the batch and counts it against the release
                failed += 1
                print(json.dumps({"line": number, "key": key, "predict_raised": f"{type(exc).__name__}: {exc}"}))
                continue
            if isinstance(result, RecordError):  # the model's own refusal: a dead letter, not a failure
                print(json.dumps({"line": number, "key": key, "record_error": str(result)}))
                continue
            try:  # as the engine encodes them: numpy scalars and arrays become JSON numbers and lists
                output, state = _as_json(result.output), _as_json(result.state)
            except TypeError as exc:  # the engine dead-letters the record (model_exception)
                failed += 1
                print(json.dumps({"line": number, "key": key, "output_error": [f"not JSON data: {exc}"]}))
                continue
            errors = sorted(e.message for e in validate_out.iter_errors(output))
            if errors:
                failed += 1
                print(json.dumps({"line": number, "key": key, "output_error": errors, "output": output}))
                continue
            if key is not None:
                states[key] = state
            print(json.dumps({"line": number, "key": key, "output": output, "state": state}))
    finally:
        if source is not sys.stdin:
            source.close()
        if callable(getattr(model, "close", None)):
            model.close()
    return 1 if failed else 0


def _as_json(value):
    """``value`` as the plain JSON data the engine would write (daemon.engine.batch.encode_numpy)."""
    import orjson

    from daemon.engine.batch import encode_numpy

    try:
        orjson.dumps(value)
        return value
    except TypeError:
        return encode_numpy(value)[1]
