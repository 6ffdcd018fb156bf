"""The textgen.v1 front: the gRPC servicer and its proto translation."""
