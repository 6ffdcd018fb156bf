"""The gRPC front end: `textgen.v1` over grpc.aio, translating between the proto and the engine."""
