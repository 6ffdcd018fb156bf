#!/usr/bin/env node
// Steady load over many replicas from one channel: node replica_load.js --target
// ipv4:127.0.0.1:P1,127.0.0.1:P2 [--concurrency 4] [--max-new-tokens 8] [--timeout-s 60]
// Keeps `concurrency` streams in flight until its standard input closes, then lets them end and exits.
// Prints one JSON line per request: {start_ms, code, tokens, ttft_ms} (code "OK" or a status name).
// Any target works: `dns:///textgen-headless.default.svc.cluster.local:50051` in Kubernetes.
"use strict";

const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const { loadService } = require("./textgen");

// grpc-js's own round robin over every address of the target, and its retry policy: a call refused
// UNAVAILABLE (a draining replica, or one that just went away) is tried again, on the next replica.
const SERVICE_CONFIG = {
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [
    {
      name: [{ service: "textgen.v1.TextGenerationService" }],
      retryPolicy: {
        maxAttempts: 5,
        initialBackoff: "0.1s",
        maxBackoff: "1s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
};

function oneCall(client, options) {
  return new Promise((resolve) => {
    const start = Date.now();
    const record = { start_ms: start, code: "OK", tokens: 0, ttft_ms: null };
    const deadline = new Date(start + Number(options["timeout-s"]) * 1000);
    const request = {
      prompt: "Once upon a time",
      stopping: { max_new_tokens: Number(options["max-new-tokens"]), ignore_eos: true },
    };
    const call = client.GenerateStream(request, new grpc.Metadata(), { deadline });
    call.on("data", (message) => {
      if (record.ttft_ms === null) {
        record.ttft_ms = Date.now() - start;
      }
      record.tokens += message.tokens.length;
    });
    call.on("error", (error) => {
      record.code = grpc.status[error.code];
    });
    call.on("close", () => resolve(record));
  });
}

async function caller(client, options, stopping) {
  while (!stopping.done) {
    const record = await oneCall(client, options);
    process.stdout.write(`${JSON.stringify(record)}\n`);
  }
}

async function main() {
  const { values } = parseArgs({
    options: {
      target: { type: "string" },
      concurrency: { type: "string", default: "4" },
      "max-new-tokens": { type: "string", default: "8" },
      "timeout-s": { type: "string", default: "60" },
    },
  });
  const Service = loadService();
  const client = new Service(values.target, grpc.credentials.createInsecure(), {
    "grpc.service_config": JSON.stringify(SERVICE_CONFIG),
    "grpc.max_reconnect_backoff_ms": 1000, // a replica that comes back is used within a second
  });
  const stopping = { done: false };
  process.stdin.on("end", () => {
    stopping.done = true;
  });
  process.stdin.resume();
  const callers = Array.from({ length: Number(values.concurrency) }, () => caller(client, values, stopping));
  await Promise.all(callers);
  client.close();
}

main();
