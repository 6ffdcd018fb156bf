"""Benchmarks: a seeded workload, an online gRPC load generator, and offline engine throughput."""
