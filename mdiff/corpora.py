"""Real public-domain text from Debian packages, as plain-text files one document per paragraph.

The demo needs two domains that install offline from a package registry: the King James Bible
(`bible-kjv`, whose `bible` program prints it) and Jane Austen's six novels
(`r-cran-janeaustenr`, whose texts are R data, read by `mdiff.rdata` without installing R).
The novels are split in two: the first three are the "general text" the fine-tune is told to leave
unchanged (its anchor), the last three are the other domain of the analyses, never seen by the
fine-tune.
Nothing is installed system-wide: the packages are fetched with `apt-get download` and unpacked
under the cache directory, which works without root. An already installed `bible` is used as is.

Each text is written once, next to a JSON record of the package versions and the files' SHA-256,
and reused while that record matches.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mdiff.rdata import read_lazyload
from pipeline.records import atomic_write, atomic_write_text, sha256_file

FORMAT = 2  # bump when the extraction below changes: it is part of the record
KJV_PACKAGES = ("bible-kjv", "bible-kjv-text")
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_BOOKS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                "persuasion")  # publication order
ANCHOR_BOOKS = 3  # the first three novels anchor the fine-tune; the other three are analysed
FIRST_NEW_TESTAMENT_BOOK = "Matthew"
_CHAPTER = re.compile(r"^(?P<book>(?:[1-3] )?[A-Z][A-Za-z ]*?) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s+\d+\s+")  # indented: a wrapped line may start with a number


class CorpusError(RuntimeError):
    """A text could not be obtained; the message names the command that fixes it."""


@dataclass(frozen=True)
class Corpora:
    """The demo's texts: the Bible split into its two testaments, and Austen's novels."""

    kjv_old: Path  # Genesis-Malachi: the fine-tuning text
    kjv_new: Path  # Matthew-Revelation: held out from fine-tuning, used for the analyses
    austen: Path  # the other domain (the last three novels): never seen by the fine-tune
    record: dict
    anchor: Path | None = None  # general text (the first three novels) the fine-tune must not change


# ------------------------------------------------------------------------------------ parsing


def kjv_chapters(text: str) -> list[tuple[str, str]]:
    """(book, chapter text) per chapter of `bible`'s output: blocks separated by blank lines, a
    one-line "Book N" heading block before each chapter's block of verses ("  V text", wrapped
    onto unindented lines). Verse numbers are dropped; a chapter becomes one paragraph."""
    chapters: list[tuple[str, list[str]]] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        heading = _CHAPTER.match(lines[0]) if len(lines) == 1 else None
        if heading:
            chapters.append((heading["book"], []))
        elif chapters:
            chapters[-1][1].extend(_VERSE.sub("", line).strip() for line in lines)
    return [(book, " ".join(" ".join(lines).split())) for book, lines in chapters if lines]


def split_testaments(chapters: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    books = [b for b, _ in chapters]
    if FIRST_NEW_TESTAMENT_BOOK not in books:
        raise CorpusError(f"the Bible text has no book {FIRST_NEW_TESTAMENT_BOOK!r}; found "
                          f"{', '.join(dict.fromkeys(books)) or 'no chapters'}")
    cut = books.index(FIRST_NEW_TESTAMENT_BOOK)
    return [t for _, t in chapters[:cut]], [t for _, t in chapters[cut:]]


def book_paragraphs(lines: list[str | None]) -> list[str]:
    """A novel's lines (R character vector: one printed line each, "" between paragraphs) as
    paragraphs with their line breaks joined."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def austen_paragraphs(variables: dict[str, object], books: tuple[str, ...] = AUSTEN_BOOKS) -> list[str]:
    missing = [b for b in AUSTEN_BOOKS if b not in variables]
    if missing:
        raise CorpusError(f"{AUSTEN_PACKAGE}'s data lacks {', '.join(missing)} (found "
                          f"{', '.join(variables) or 'nothing'})")
    return [p for b in books for p in book_paragraphs(variables[b])]


# ------------------------------------------------------------------------------------ packages


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _install_hint(packages: tuple[str, ...]) -> str:
    return f"sudo apt-get update && sudo apt-get install -y {' '.join(packages)}"


def fetch_deb(package: str, into: Path, log=print) -> tuple[Path, str]:
    """Download `package` with `apt-get download` and unpack it under `into`; (root, version).

    Needs no root; when the package lists are missing and this process is root, it runs
    `apt-get update` once and tries again.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusError(f"the Debian package {package} is needed, but this system has no apt-get/dpkg-deb; "
                          "on Debian or Ubuntu run: " + _install_hint((package,)))
    into.mkdir(parents=True, exist_ok=True)
    got = _run(["apt-get", "download", package], cwd=into)
    if got.returncode != 0 and _is_root():
        log(f"apt-get download {package} failed; running apt-get update once")
        _run(["apt-get", "update", "-qq"])
        got = _run(["apt-get", "download", package], cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if got.returncode != 0 or not debs:
        hint = ("run: apt-get update" if _is_root() else "ask for the package lists to be updated, or run: "
                + _install_hint((package,)))
        raise CorpusError(f"apt-get download {package} failed ({' '.join(got.stderr.split())[:300]}); {hint}")
    deb = debs[-1]
    root = into / deb.stem
    if not root.is_dir():
        def unpack(tmp: Path) -> None:
            done = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
            if done.returncode != 0:
                raise CorpusError(f"dpkg-deb -x {deb} failed: {done.stderr.strip()}")

        atomic_write(root, unpack)
    version = deb.stem.split("_")[1]
    return root, version


def kjv_text(cache: Path, log=print) -> tuple[str, dict]:
    """The whole Bible as `bible` prints it, and where it came from."""
    spec = "Gen1:1-Rev22:21"
    if shutil.which("bible"):
        out = _run(["bible", spec])
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout, {"bible": "installed bible-kjv"}
    roots = {p: fetch_deb(p, cache / "debs", log) for p in KJV_PACKAGES}
    program = roots["bible-kjv"][0] / "usr" / "bin" / "bible"
    data = roots["bible-kjv-text"][0] / "usr" / "lib"
    out = _run([str(program), "-p", str(data), spec])
    if out.returncode != 0 or not out.stdout.strip():
        raise CorpusError(f"{program} -p {data} {spec} failed ({out.stderr.strip()[:300]}); "
                          f"install the package instead: {_install_hint(KJV_PACKAGES)}")
    return out.stdout, {p: v for p, (_, v) in roots.items()}


def austen_data(cache: Path, log=print) -> tuple[dict[str, object], dict]:
    root, version = fetch_deb(AUSTEN_PACKAGE, cache / "debs", log)
    found = sorted(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"))
    if not found:
        raise CorpusError(f"{AUSTEN_PACKAGE} {version} has no data/Rdata.rdb under {root}")
    return read_lazyload(found[0]), {AUSTEN_PACKAGE: version}


# ------------------------------------------------------------------------------------ entry point


def _valid(directory: Path, record: dict | None) -> bool:
    if not record or record.get("format") != FORMAT:
        return False
    files = record.get("files", {})
    return bool(files) and all((directory / n).is_file() and sha256_file(directory / n) == h
                               for n, h in files.items())


def prepare_corpora(directory: str | Path, log=print, *, kjv: str | Path | None = None,
                    other: str | Path | None = None) -> Corpora:
    """The three text files under `directory`, built on first use and reused afterwards.

    `kjv` / `other` are optional local files to use instead of the Debian packages: `kjv` in the
    format `bible` prints, `other` plain text with blank lines between paragraphs.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = {"kjv_old": "kjv-old-testament.txt", "kjv_new": "kjv-new-testament.txt", "austen": "austen.txt",
             "anchor": "anchor.txt"}
    record_path = d / "corpora.json"
    wanted = {k: [str(Path(v).resolve()), sha256_file(Path(v))] if v else "debian"
              for k, v in (("kjv", kjv), ("other", other))}  # a local file is known by its bytes too
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if _valid(d, record) and record.get("sources_wanted") == wanted:
        log(f"corpora: reusing {d} ({', '.join(f'{k} {v}' for k, v in record['packages'].items())})")
        return _corpora(d, names, record)

    if kjv:
        text, kjv_source = Path(kjv).read_text(encoding="utf-8"), {"kjv": str(kjv)}
    else:
        log("corpora: getting the King James Bible (Debian bible-kjv)")
        text, kjv_source = kjv_text(d, log)
    old, new = split_testaments(kjv_chapters(text))
    if other:
        paragraphs = [p.strip() for p in Path(other).read_text(encoding="utf-8").split("\n\n") if p.strip()]
        if len(paragraphs) < 2:
            raise CorpusError(f"{other} has {len(paragraphs)} paragraph(s); the other text needs at least two "
                              "(its first half anchors the fine-tune, its second half is analysed)")
        anchor, austen = paragraphs[:len(paragraphs) // 2], paragraphs[len(paragraphs) // 2:]
        other_source = {"other": str(other)}
    else:
        log(f"corpora: getting Jane Austen's novels (Debian {AUSTEN_PACKAGE}, read without R)")
        variables, other_source = austen_data(d, log)
        anchor = austen_paragraphs(variables, AUSTEN_BOOKS[:ANCHOR_BOOKS])
        austen = austen_paragraphs(variables, AUSTEN_BOOKS[ANCHOR_BOOKS:])
    texts = {"kjv_old": old, "kjv_new": new, "austen": austen, "anchor": anchor}
    for key, paragraphs in texts.items():
        atomic_write_text(d / names[key], "\n\n".join(paragraphs) + "\n")
    record = {"format": FORMAT, "sources_wanted": wanted, "packages": {**kjv_source, **other_source},
              "paragraphs": {k: len(v) for k, v in texts.items()},
              "files": {n: sha256_file(d / n) for n in names.values()}}
    atomic_write_text(record_path, json.dumps(record, indent=1))
    shutil.rmtree(d / "debs", ignore_errors=True)  # the texts are all that is kept
    log(f"corpora: {len(old)} + {len(new)} Bible chapters, {len(anchor)} + {len(austen)} Austen paragraphs in {d}")
    return _corpora(d, names, record)


def _corpora(d: Path, names: dict[str, str], record: dict) -> Corpora:
    return Corpora(*(d / names[k] for k in ("kjv_old", "kjv_new", "austen")), record, anchor=d / names["anchor"])
