"""SMG's vLLM worker protocol on the gRPC port, and what a gateway reads from an HTTP worker."""
