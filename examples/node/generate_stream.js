#!/usr/bin/env node
// Streams a generation from a textgen server: node generate_stream.js [--target host:port]
// [--max-new-tokens N] [--temperature T] [--chat] [--choice A --choice B ...] [--tls] [--tls-ca-file ca.pem]
// [--tls-cert-file client.pem --tls-key-file client-key.pem] [--api-key KEY] "prompt"
// Prints the text as it arrives on stdout and one summary line on stderr. --choice makes the output one of
// the given strings (structured output's response_format). The API key defaults to
// $TEXTGEN_API_KEY and travels as `authorization: Bearer <key>` metadata.
"use strict";

const fs = require("node:fs");
const { parseArgs } = require("node:util");
const grpc = require("@grpc/grpc-js");
const { loadService } = require("./textgen");

function buildRequest(options, prompt) {
  const request = {
    stopping: { max_new_tokens: Number(options["max-new-tokens"]) },
    sampling: {},
  };
  if (options.temperature !== undefined) {
    request.sampling.temperature = Number(options.temperature);
  }
  if (options.choice !== undefined) {
    request.response_format = { choice: { choices: options.choice } };
  }
  if (options.chat) {
    request.chat = { messages: [{ role: "user", content: prompt }] };
  } else {
    request.prompt = prompt;
  }
  return request;
}

// TLS when asked for (--tls, or a CA or client certificate given), else plaintext.
function channelCredentials(options) {
  const read = (file) => (file === undefined ? null : fs.readFileSync(file));
  if (!options.tls && !options["tls-ca-file"] && !options["tls-cert-file"]) {
    return grpc.credentials.createInsecure();
  }
  return grpc.credentials.createSsl(
    read(options["tls-ca-file"]),
    read(options["tls-key-file"]),
    read(options["tls-cert-file"]),
  );
}

function callMetadata(apiKey) {
  const metadata = new grpc.Metadata();
  if (apiKey) {
    metadata.set("authorization", `Bearer ${apiKey}`);
  }
  return metadata;
}

function main() {
  const { values, positionals } = parseArgs({
    options: {
      target: { type: "string", default: "localhost:50051" },
      "max-new-tokens": { type: "string", default: "0" },
      temperature: { type: "string" },
      chat: { type: "boolean", default: false },
      choice: { type: "string", multiple: true },
      "timeout-s": { type: "string", default: "60" },
      tls: { type: "boolean", default: false },
      "tls-ca-file": { type: "string" },
      "tls-cert-file": { type: "string" },
      "tls-key-file": { type: "string" },
      "api-key": { type: "string", default: process.env.TEXTGEN_API_KEY },
    },
    allowPositionals: true,
  });
  if (positionals.length !== 1) {
    console.error('usage: node generate_stream.js [--target host:port] [--max-new-tokens N] "prompt"');
    process.exit(2);
  }
  const Service = loadService();
  const client = new Service(values.target, channelCredentials(values));
  const deadline = new Date(Date.now() + Number(values["timeout-s"]) * 1000);
  const request = buildRequest(values, positionals[0]);
  const call = client.GenerateStream(request, callMetadata(values["api-key"]), { deadline });

  call.on("data", (message) => {
    process.stdout.write(message.text);
    if (message.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
      const { prompt_tokens, completion_tokens, cached_prompt_tokens } = message.usage;
      // Prompt tokens the server's prefix cache already held (send the same long prompt twice to see it).
      const cached = cached_prompt_tokens > 0 ? ` (${cached_prompt_tokens} cached)` : "";
      console.error(`\n[${message.finish_reason}] ${prompt_tokens} prompt${cached} + ${completion_tokens} completion tokens`);
    }
  });
  call.on("error", (error) => {
    console.error(`\nerror: ${grpc.status[error.code]}: ${error.details}`);
    process.exitCode = 1;
  });
  call.on("end", () => client.close());
}

main();
