"""The benchmarks, run as modules from the repository root (`make bench` runs them all):

    python -m benchmarks.bench_cache                     # stage one: caching vs plain forwards
    .venv-peers/bin/python -m benchmarks.bench_train     # peer comparisons: in .venv-peers (peer_env.sh)

Layout: the scripts (`bench_*.py`, the format checks `check_*.py`) at this level; what they share in
`benchmarks.common`; the parts of `bench_train` in `benchmarks.training`; each script's raw figures
in `results/<name>.json`, its table in a section of BENCHMARKS.md.
"""
