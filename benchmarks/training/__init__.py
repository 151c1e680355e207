"""The parts of `benchmarks.bench_train`: the timed training-step cases (ours and the peers') and the
rendering of its BENCHMARKS.md section."""
