"""Validate rendered Kubernetes manifests offline: `python deploy/k8s/validate.py rendered.yaml`.

Built-in kinds are checked strictly against the Kubernetes 1.37 schemas kubernetes-validate ships; custom
resources (cert-manager's Certificate), which it does not know and would only warn about, against the
schemas in schemas/ (`<kind>-<apiVersion with / as ->.json`). A kind with neither fails, so nothing goes
unchecked.
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


def problems(document: dict) -> list[str]:
    """What is wrong with one resource; empty when it is valid."""
    kind, api_version = document.get("kind", "?"), document.get("apiVersion", "?")
    name = f"{kind} {document.get('metadata', {}).get('name', '?')}"
    schema_file = SCHEMAS / f"{kind.lower()}-{api_version.replace('/', '-')}.json"
    if schema_file.exists():
        validator = jsonschema.Draft202012Validator(json.loads(schema_file.read_text()))
        return [f"{name}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in
                validator.iter_errors(document)]  # fmt: skip
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{name}: no schema for {api_version} {kind}: add one to {SCHEMAS}"]
    except kubernetes_validate.ValidationError as error:
        return [f"{name}: {'.'.join(map(str, error.path)) or '(root)'}: {error.message}"]
    return []


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
