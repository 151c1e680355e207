"""Small helpers shared by the benchmarks: where results go, BENCHMARKS.md sections, and the
paired timings of the comparisons with the peer toolkits.

Timings on a shared machine drift, so every comparison is made of pairs measured next to each other
(ours and the peer's, in alternating order) and reported as the median of the per-pair ratios.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
RESULTS = ROOT / "benchmarks" / "results"  # each benchmark's JSON file of raw figures
PEER_PACKAGES = ("dictionary-learning", "sae-lens", "eai-sparsify", "transformer-lens")


def stamped_log():
    """print with the seconds since this call, flushed (long runs are watched through a pipe)."""
    import time

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)
    return log


def write_section(path: Path, name: str, body: str) -> None:
    """Replace this benchmark's section of BENCHMARKS.md, keeping the others."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `make bench`.\n"
    block = f"{begin}\n{body}{end}\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def peers_missing(error: Exception, script: str) -> str:
    """The message a peer benchmark (`script`: its module name under benchmarks) exits with when
    run outside the peers' environment."""
    return (f"a peer toolkit is not importable ({error}); run with the peers' environment:\n"
            f"  bash benchmarks/peer_env.sh && .venv-peers/bin/python -m benchmarks.{script}")


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over pairs of num[i] / den[i]: both sides of a pair ran next to each other."""
    if len(num) != len(den) or not num:
        raise ValueError(f"need two equally long, non-empty series, got {len(num)} and {len(den)}")
    return statistics.median(a / b for a, b in zip(num, den))


def alternating(names: Sequence[str], repeats: int) -> Iterator[tuple[int, list[str]]]:
    """(repeat, order) with the order reversed every other repeat, so that neither side always
    runs first (warm caches, a neighbour's load that comes and goes)."""
    for rep in range(repeats):
        yield rep, list(names) if rep % 2 == 0 else list(reversed(names))


def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call. CPU time counts every thread of the
    process and not the time spent waiting for a core: the steadier figure on a shared machine."""
    import time

    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return time.perf_counter() - w0, time.process_time() - c0, out


def agreement(ours: float, peer: float, *, rel: float, abs_: float = 0.0) -> bool:
    """|ours - peer| <= max(abs_, rel * |peer|): the tolerance stated next to each compared metric."""
    if not (math.isfinite(ours) and math.isfinite(peer)):
        return False
    return abs(ours - peer) <= max(abs_, rel * abs(peer))


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of every regular file under `path` (what the cache takes on disk, metadata included)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def files_under(*paths: str | os.PathLike) -> list[str]:
    return [str(p) for root in paths for p in Path(root).rglob("*") if p.is_file()]


def drop_page_cache(files: Sequence[str]) -> None:
    """Evict these files' pages (POSIX_FADV_DONTNEED after a sync), as for data larger than RAM.

    Only these files: a system-wide drop_caches would also stall the other jobs on a shared machine.
    """
    os.sync()
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def package_versions(names: Sequence[str] = ("torch", "numpy", "zarr", "transformers", "datasets",
                                             *PEER_PACKAGES)) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "not installed"
    return out


def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "commit": git_commit(), "versions": package_versions()}


def machine_line(m: dict) -> str:
    """One line for a BENCHMARKS.md section: where, with what."""
    v = m["versions"]
    where = m["gpu"] or f"CPU, {m['cpu_count']} cores, {m['torch_threads']} torch threads"
    peers = ", ".join(f"{n} {v[n]}" for n in PEER_PACKAGES if v.get(n, "not installed") != "not installed")
    return (f"Machine: {where}; {m['platform']}; Python {m['python']}, torch {v['torch']}, "
            f"transformers {v['transformers']}, datasets {v['datasets']}, zarr {v['zarr']}; "
            f"peers (in `.venv-peers`): {peers}; ours at commit `{m['commit']}`.")


def load_line(before: Sequence[float], after: Sequence[float]) -> str:
    return (f"Load average (1 min) {before[0]:.1f} before, {after[0]:.1f} after: other jobs shared the "
            f"cores, so absolute speeds drift; the ratios come from pairs measured side by side.")


def gpu_note(m: dict, sizes: str) -> str:
    """The line saying that the GPU-sized table is missing, on a machine without a GPU."""
    if m["gpu"]:
        return ""
    return (f"GPU table (d_model 2048, 16,384 latents): not measured, no GPU was available. The "
            f"script takes the sizes as arguments (`{sizes}`); it places everything on the CPU as "
            f"written, so a GPU run also needs its device switched.\n")


def git_commit() -> str:
    """The commit measured, with '+' when the working tree differs from it (read-only git calls)."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  check=False, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "pipeline", "trainer", "evals")
    return commit + ("+" if dirty else "")
