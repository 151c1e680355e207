"""Read character vectors out of an R package's lazy-load database without R.

Debian ships public-domain corpora as R data packages (e.g. r-cran-janeaustenr). Their texts live
in `data/Rdata.rdb` + `Rdata.rdx`: the index is a gzip-compressed serialized R list of
`(offset, length)` pairs per variable, and each variable is a zlib-compressed serialized R object
in the .rdb. Installing R (hundreds of MB) to read a few MB of text is not worth it, so this module
decodes the subset of R's XDR serialization format (R Internals, "Serialization Formats") that
such data uses: vectors, strings, pairlists, symbols and references. Anything else is refused
by name rather than guessed at.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

# SEXP type codes and the serialization's special markers (R's serialize.c).
_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP = 0, 1, 2, 9, 10
_INTSXP, _REALSXP, _STRSXP, _VECSXP = 13, 14, 16, 19
_REFSXP, _NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV = 255, 254, 242, 241, 253
_ATTRLISTSXP = 239
_NA_INT = -(2**31)


class RDataError(ValueError):
    """The file is not an R lazy-load database this reader understands."""


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where
        self.refs: list = []

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise RDataError(f"{self.where}: truncated serialized object at byte {self.pos}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def header(self) -> None:
        if self._take(2) != b"X\n":
            raise RDataError(f"{self.where}: not XDR-serialized R data (only format 'X' is read)")
        version = self.int()
        self.int(), self.int()  # writer's and minimal reader's R versions
        if version == 3:
            self._take(self.int())  # native encoding name
        elif version != 2:
            raise RDataError(f"{self.where}: serialization version {version} (2 or 3 expected)")

    def item(self):
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _NILSXP):
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind in (_LISTSXP, _ATTRLISTSXP):
            return self._pairlist(has_attr, has_tag)
        if kind == _CHARSXP:
            n = self.int()
            return None if n == -1 else self._take(n).decode("utf-8", errors="replace")
        if kind in (_LGLSXP, _INTSXP, _REALSXP, _STRSXP, _VECSXP):
            value = self._vector(kind)
            attrs = self.item() if has_attr else None
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind == _VECSXP and isinstance(names, list) and len(names) == len(value):
                return dict(zip(names, value))  # a named list
            return value
        raise RDataError(f"{self.where}: R object type {kind} is not supported (only vectors, strings, "
                         "pairlists and symbols)")

    def _vector(self, kind: int) -> list:
        n = self.int()
        if n == -1:  # long vector: length in two words
            n = (self.int() << 32) + self.int()
        if kind in (_LGLSXP, _INTSXP):
            return [None if v == _NA_INT else v for v in struct.unpack(f">{n}i", self._take(4 * n))]
        if kind == _REALSXP:
            return list(struct.unpack(f">{n}d", self._take(8 * n)))
        return [self.item() for _ in range(n)]

    def _pairlist(self, has_attr: bool, has_tag: bool) -> dict:
        out: dict = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            out[tag if tag is not None else len(out)] = self.item()
            flags = self.int()
            kind = flags & 0xFF
            if kind == _NILVALUE:
                return out
            if kind not in (_LISTSXP, _ATTRLISTSXP):
                raise RDataError(f"{self.where}: pairlist continues with type {kind}")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))


def unserialize(data: bytes, where: str = "<bytes>"):
    """One serialized R object as Python values (vectors as lists, pairlists as dicts)."""
    reader = _Reader(data, where)
    reader.header()
    return reader.item()


def read_lazyload(rdb: str | Path) -> dict[str, object]:
    """Every variable of `<name>.rdb` (with its `<name>.rdx` beside it), decoded."""
    rdb = Path(rdb)
    rdx = rdb.with_suffix(".rdx")
    for p in (rdb, rdx):
        if not p.is_file():
            raise FileNotFoundError(f"no such file: {p} (an R lazy-load database is a .rdb/.rdx pair)")
    raw = rdx.read_bytes()
    index_bytes = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else zlib.decompress(raw[4:])
    index = unserialize(index_bytes, str(rdx))
    variables = index.get("variables") if isinstance(index, dict) else None
    if not isinstance(variables, dict):
        raise RDataError(f"{rdx}: not a lazy-load index (no named `variables` list)")
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in variables.items():
        chunk = blob[offset:offset + length]
        size = struct.unpack(">I", chunk[:4])[0]
        body = chunk[4:]
        data = zlib.decompress(body) if body[:1] == b"x" else _decompress_typed(body, f"{rdb}:{name}")
        if len(data) != size:
            raise RDataError(f"{rdb}:{name}: {len(data)} bytes decompressed, {size} recorded")
        out[name] = unserialize(data, f"{rdb}:{name}")
    return out


def _decompress_typed(body: bytes, where: str) -> bytes:
    """R >= 2.10 may prefix the stream with its compression type: Z (zlib), 2 (bzip2), X (xz), 0."""
    import bz2
    import lzma

    kind, rest = body[:1], body[1:]
    if kind == b"Z":
        return zlib.decompress(rest)
    if kind == b"2":
        return bz2.decompress(rest)
    if kind == b"X":
        return lzma.decompress(rest)
    if kind == b"0":
        return rest
    raise RDataError(f"{where}: unknown compression type {kind!r}")
