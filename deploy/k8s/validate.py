"""Validate rendered Kubernetes manifests offline: `python deploy/k8s/validate.py rendered.yaml`.

Built-in kinds are checked strictly against the Kubernetes 1.37 schemas kubernetes-validate ships; custom
resources (cert-manager's Certificate, the Inference Extension's InferencePool), which it does not know and
would only warn about, against the
schemas in schemas/ (`<kind>-<apiVersion with / as ->.json`). A kind with neither fails, so nothing goes
unchecked. A ConfigMap entry that is itself a versioned configuration file (`apiVersion` and `kind`, such
as the endpoint picker's EndpointPickerConfig) is checked against its schema in schemas/ too, when there is
one, and an EndpointPickerConfig's plugin references must name its plugins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_VERSION = "1.37.0"
SCHEMAS = Path(__file__).resolve().parent / "schemas"


def schema_problems(document: dict, name: str) -> list[str] | None:
    """What the schema in schemas/ for the document's kind finds wrong; None when there is no such schema."""
    kind, api_version = str(document.get("kind", "?")), str(document.get("apiVersion", "?"))
    schema_file = SCHEMAS / f"{kind.lower()}-{api_version.replace('/', '-')}.json"
    if not schema_file.exists():
        return None
    validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
    return [f"{name}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in
            validator.iter_errors(document)]  # fmt: skip


def plugin_reference_problems(config: dict, name: str) -> list[str]:
    """EndpointPickerConfig references that name no plugin (a plugin's name defaults to its type), which
    the endpoint picker refuses at start."""
    defined = {p.get("name") or p.get("type") for p in config.get("plugins", [])}
    references = [("schedulingProfiles", p["pluginRef"]) for s in config.get("schedulingProfiles", [])
                  for p in s.get("plugins", [])]  # fmt: skip
    for source in (config.get("dataLayer") or {}).get("sources", []):
        references.append(("dataLayer", source["pluginRef"]))
        references += [("dataLayer", e["pluginRef"]) for e in source.get("extractors", [])]
    for section in ("parser", "saturationDetector"):
        if (config.get(section) or {}).get("pluginRef"):
            references.append((section, config[section]["pluginRef"]))
    return [f"{name}: {section}: pluginRef {ref!r} names no plugin" for section, ref in references
            if ref not in defined]  # fmt: skip


def config_file_problems(config_map: dict, name: str) -> list[str]:
    """Problems of the versioned configuration files a ConfigMap holds (entries with apiVersion and kind)."""
    found = []
    for key, text in (config_map.get("data") or {}).items():
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as error:
            found.append(f"{name}: data.{key}: not YAML: {error}")
            continue
        if not (isinstance(config, dict) and "apiVersion" in config and "kind" in config):
            continue
        where = f"{name}: data.{key} ({config['kind']})"
        shape = schema_problems(config, where)
        if config["kind"] == "EndpointPickerConfig":  # the endpoint picker's, never left unchecked
            if shape is None:
                found.append(f"{where}: no schema for {config['apiVersion']}: add one to {SCHEMAS}")
            elif not shape:  # references are read from a valid shape
                found += plugin_reference_problems(config, where)
        found += shape or []
    return found


def problems(document: dict) -> list[str]:
    """What is wrong with one resource; empty when it is valid."""
    kind, api_version = document.get("kind", "?"), document.get("apiVersion", "?")
    name = f"{kind} {document.get('metadata', {}).get('name', '?')}"
    custom = schema_problems(document, name)
    if custom is not None:
        return custom
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{name}: no schema for {api_version} {kind}: add one to {SCHEMAS}"]
    except kubernetes_validate.ValidationError as error:
        return [f"{name}: {'.'.join(map(str, error.path)) or '(root)'}: {error.message}"]
    return config_file_problems(document, name) if kind == "ConfigMap" else []


def main(paths: list[str]) -> int:
    found = []
    for path in paths:
        for document in yaml.safe_load_all(Path(path).read_text()):
            if document:
                found += problems(document)
    for problem in found:
        print(problem, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
