"""What the benchmark scripts share: helpers (timings, BENCHMARKS.md sections, result paths), the
model fixtures and the shared parts of the peer comparisons and format checks."""
