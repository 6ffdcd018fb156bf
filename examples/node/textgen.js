// The textgen.v1 service definition, loaded from the repository's proto at run time.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");

function loadService() {
  const definition = protoLoader.loadSync("textgen/v1/textgen.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the proto: max_new_tokens, finish_reason
    longs: String, // uint64 seed
    enums: String, // finish_reason as "FINISH_REASON_EOS"
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).textgen.v1.TextGenerationService;
}

module.exports = { loadService };
