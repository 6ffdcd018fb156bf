"""Chat tools and reasoning, shared by the gRPC and HTTP fronts."""
