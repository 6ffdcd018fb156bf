"""The servers: the gRPC front (textgen.v1, the SMG worker protocol) and the OpenAI HTTP front, one engine."""
