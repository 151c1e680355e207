"""What can go wrong with a store, and how a failed write is told.

Every store failure is a StoreError, so the commands catch one class and print its message; the
subclasses let callers tell an incomplete array from a newer format or a full disk. Object
stores fail with their own exception classes (botocore, aiohttp: not OSErrors), so a lost
connection and a full device are recognized here, once, for every writer and reader.
"""

from __future__ import annotations

import contextlib
import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.store.root import StoreRoot


class StoreError(RuntimeError):
    pass


class IncompleteError(StoreError):
    """Something was read that has not been completely written."""


class StoreFormatError(StoreError):
    pass


class StoreMismatchError(StoreError):
    """An existing array was made with other parameters than the ones asked for now."""


class StoreWriteError(StoreError):
    """A write to the store failed; nothing of what it was writing was recorded."""


class StoreFullError(StoreWriteError):
    """The store's device ran out of space (ENOSPC or a quota)."""


class CorruptChunkError(StoreError):
    """A chunk of a complete array reads back wrong: missing, truncated, or checksum mismatch."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


_CONNECTION_ERRORS = {"EndpointConnectionError", "ConnectionClosedError", "ClientConnectionError",
                      "ServerDisconnectedError", "ReadTimeoutError", "ConnectTimeoutError"}


def is_connection_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a lost or refused connection: an object store's
    botocore/aiohttp errors are not OSErrors, so they are recognized by class name."""
    while exc is not None:
        if isinstance(exc, (ConnectionError, TimeoutError)) or any(
                c.__name__ in _CONNECTION_ERRORS for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the device is full. Libraries written in Rust or C
    (safetensors) raise their own types and say it only in the message."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def write_errors(what: str, nbytes: int, root: StoreRoot):
    """Turn a failed write into one StoreWriteError that says what was being written and why.

    A full device becomes a StoreFullError that says how much the write needed; connection
    errors of object stores (botocore, aiohttp: not OSErrors) become StoreWriteError. The caller
    records nothing after a failure, so the rerun redoes exactly what failed.
    """
    try:
        yield
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend's failure becomes one clear error
        cause = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        resume = "rerun the job: it resumes after what is recorded (nothing of this write is)."
        if is_no_space(e):
            free = root.free_bytes()
            free_text = f", {human_bytes(free)} free" if free is not None else ""
            raise StoreFullError(
                f"no space left on the store's device writing {what} (needs "
                f"{human_bytes(nbytes)}{free_text}; {cause}). Free space on that device or move "
                f"the store, then {resume}"
            ) from e
        raise StoreWriteError(f"could not write {what} ({cause}). Once the store is reachable "
                              f"again, {resume}") from e
