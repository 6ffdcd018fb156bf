"""Online serving benchmarks: continuous batching against its baselines, prefix caching, the rate sweep."""
