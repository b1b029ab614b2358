"""``release promote``'s check of an Avro output schema against the schema registry.

A release whose output schema is an ``.avsc`` and whose daemon writes Avro (``[output] format =
"avro"``) will register that schema under the output topic's value subject ``<topic>-value`` at
its first batch. Promotion asks the registry first (``POST /compatibility/subjects/<subject>/
versions/latest``) and refuses a schema the subject's consumers could not read, with the
registry's reason. The level is ``[schema_registry] compatibility`` (BACKWARD by default, as in
Confluent Schema Registry; Apicurio's own default is NONE): failoverd sets it on the subject
before asking, so the registry enforces the same rule on every other writer of the subject.
``"REGISTRY"`` leaves the subject's level as the registry has it; ``"NONE"`` skips the check.
"""

from __future__ import annotations


from daemon.errors import RegistryError

LEVELS = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE", "NONE",
          "REGISTRY")


def check_output_schema(settings, bundle) -> str | None:
    """Raise RegistryError when ``bundle``'s Avro output schema is incompatible with the output
    subject (or the registry cannot say); a one-line note of what was checked, or None when
    nothing applies (JSON output, a JSON Schema, no settings)."""
    from daemon.formats.avro import schema_text
    from daemon.formats.registry import RegistryClient
    from daemon.formats.registry import RegistryError as SRError
    from daemon.formats.registry import RegistryUnavailable

    if settings is None or getattr(settings.output, "format", "json") != "avro":
        return None
    if not bundle.manifest["schemas"]["output"].endswith(".avsc"):
        return None
    sr = settings.schema_registry
    level = sr.compatibility
    subject = f"{settings.output.topic}-value"
    if level == "NONE":
        return f"output schema not checked against {subject} ([schema_registry] compatibility = NONE)"
    client = RegistryClient(sr.url, username=sr.username or "", password=sr.password or "",
                            timeout=sr.timeout_ms / 1000)
    text = schema_text(bundle.output_schema)
    fix = ("fix: keep the output schema compatible (docs/bundles.md#avro-schemas), or promote with "
           "--allow-incompatible-schema once the subject's consumers have been migrated")
    try:
        if level != "REGISTRY" and client.compatibility(subject) != level:
            client.set_compatibility(level, subject)
        ok, messages = client.check_compatibility(subject, text)
    except (RegistryUnavailable, SRError) as exc:
        raise RegistryError(f"refusing to promote {bundle.ref}: cannot check its output schema against subject "
                            f"{subject!r}: {exc}; fix: start the schema registry ([schema_registry] url), or "
                            f"promote with --allow-incompatible-schema") from None
    if not ok:
        detail = "; ".join(messages) if messages else "the registry gave no details"
        raise RegistryError(f"refusing to promote {bundle.ref}: its output schema is not {level} compatible with "
                            f"the latest schema of subject {subject!r} in {sr.url} ({detail})\n{fix}")
    return f"output schema is {level} compatible with subject {subject!r}"
