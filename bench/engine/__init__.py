"""Engine benchmarks, offline: throughput, dtype and weight formats, profiles, grammar and tracing costs."""
