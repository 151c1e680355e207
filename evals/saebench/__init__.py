"""SAEBench-class evaluations, offline: core metrics in SAEBench's schema, first-letter absorption,
sparse probing, and a study over every dictionary of an experiment (`mdiff saebench`)."""
