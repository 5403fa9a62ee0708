"""Rebuild cotune's built-in datasets from Debian packages.

Usage (from the repository root; needs apt-get and dpkg, network to a Debian mirror)::

    apt-get update                      # once
    .venv/bin/python scripts/build_datasets.py
    # or, with the .deb files already downloaded:
    .venv/bin/python scripts/build_datasets.py --deb-dir /tmp/debs

It downloads ``fortunes`` and ``r-cran-janeaustenr`` with ``apt-get download``, extracts them
with ``dpkg -x``, parses them and writes, deterministically (sorted input, seeded subsampling,
gzip with mtime 0), into ``src/cotune/data/builtin/``:

- ``fortunes.jsonl.gz``: one ``{"text", "label"}`` record per quote, label = category file.
- ``austen.jsonl.gz``: ``{"text", "novel"}`` passages of consecutive lines from the six novels.
- ``LICENSES.md``: the packages' ``/usr/share/doc/*/copyright`` files, verbatim.

Every ``.jsonl.gz`` starts with one ``{"_meta": {...}}`` line (sizes, label names, source
package and version) that ``cotune datasets`` reads without decompressing the rest.

The janeaustenr texts are R lazy-load data (``data/Rdata.rdb`` / ``.rdx``); a small decoder for
R's XDR serialization below reads them, so neither R nor an R-reading library is needed.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parents[1] / "src" / "cotune" / "data" / "builtin"
PACKAGES = ("fortunes", "r-cran-janeaustenr")

FORTUNE_MAX_CHARS = 600  # longer quotes are dropped, not truncated
FORTUNE_MIN_PER_LABEL = 20  # tiny categories (pratchett: 2 quotes) make useless classes
FORTUNE_SKIP = {"ascii-art"}  # pictures, not text: whitespace normalisation would destroy them
AUSTEN_TARGET_CHARS = 300  # a passage is flushed once it reaches this length
AUSTEN_PER_NOVEL = 1500  # seeded subsample per novel keeps the file small and classes balanced
SEED = 1811

NOVELS = {
    "emma": "Emma",
    "mansfieldpark": "Mansfield Park",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}


# ---------------------------------------------------------------- Debian packages


def fetch_packages(deb_dir: Path | None, work: Path) -> dict[str, tuple[Path, str]]:
    """Return package -> (extracted root, version), downloading the .debs unless given."""
    if deb_dir is None:
        deb_dir = work / "debs"
        deb_dir.mkdir()
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=deb_dir, check=True)
    out = {}
    for pkg in PACKAGES:
        debs = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        if not debs:
            sys.exit(f"no {pkg}_*.deb in {deb_dir}")
        root = work / pkg
        subprocess.run(["dpkg", "-x", str(debs[-1]), str(root)], check=True)
        version = subprocess.run(
            ["dpkg-deb", "-f", str(debs[-1]), "Version"], capture_output=True, text=True, check=True
        ).stdout.strip()
        out[pkg] = (root, version)
    return out


# ---------------------------------------------------------------- fortunes


def clean_quote(raw: str) -> str:
    raw = re.sub(r".\x08", "", raw)  # overstrike (x BS x) was the old way to print bold
    raw = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", raw.replace("\t", " "))
    lines = [re.sub(r" {2,}", " ", ln).strip() for ln in raw.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()  # at most one blank line in a row


def build_fortunes(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    folder = root / "usr/share/games/fortunes"
    seen: dict[str, set[str]] = {}
    per_label: dict[str, list[str]] = {}
    dropped_long = 0
    for path in sorted(folder.iterdir()):
        if path.suffix in (".dat", ".u8") or path.is_symlink() or path.name in FORTUNE_SKIP:
            continue
        quotes = path.read_text(encoding="utf-8", errors="replace").split("\n%\n")
        for q in quotes:
            text = clean_quote(q.removesuffix("%"))
            if not text:
                continue
            if len(text) > FORTUNE_MAX_CHARS:
                dropped_long += 1
                continue
            seen.setdefault(text, set()).add(path.name)
            per_label.setdefault(path.name, []).append(text)
    # A quote filed under two categories would be a contradictory label: drop it everywhere.
    ambiguous = {t for t, labels in seen.items() if len(labels) > 1}
    records = []
    for label in sorted(per_label):
        texts = list(dict.fromkeys(t for t in per_label[label] if t not in ambiguous))
        if len(texts) < FORTUNE_MIN_PER_LABEL:
            continue
        records += [{"text": t, "label": label} for t in texts]
    meta = {
        "max_chars": FORTUNE_MAX_CHARS,
        "dropped_too_long": dropped_long,
        "dropped_ambiguous": len(ambiguous),
        "min_per_label": FORTUNE_MIN_PER_LABEL,
        "skipped_categories": sorted(FORTUNE_SKIP),
    }
    return records, meta


# ---------------------------------------------------------------- R serialization (XDR)


class RVector(list):
    """An R vector with attributes (``names`` above all)."""

    attrs: dict[str, Any]


class RReader:
    """Decodes the subset of R's serialization format that R data packages use."""

    def __init__(self, data: bytes) -> None:
        self.b, self.p, self.refs = data, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def read(self) -> Any:
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self._int()
        self.p += 8  # writer and minimal reader versions
        if version == 3:
            n = self._int()  # length of the native encoding name, then the name
            self.p += n
        return self._item()

    def _item(self) -> Any:
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 512, flags & 1024
        if kind in (254, 253, 242, 251, 252, 247):  # NULL, environments, missing arg, ...
            return None
        if kind == 255:  # reference to an earlier symbol
            idx = flags >> 8 or self._int()
            return self.refs[idx - 1]
        if kind == 1:  # symbol
            sym = ("sym", self._item())
            self.refs.append(sym)
            return sym
        if kind == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            raw = self.b[self.p : self.p + n]
            self.p += n
            latin1 = (flags >> 12) & 4
            return raw.decode("latin-1" if latin1 else "utf-8", errors="replace")
        if kind == 2:  # pairlist: attr?, tag?, car, cdr
            if has_attr:
                self._item()
            tag = self._item() if has_tag else None
            car = self._item()
            return [(tag, car), *(self._item() or [])]
        n = self._int()
        if kind in (16, 19, 20):  # character vector, list, expression
            value: Any = [self._item() for _ in range(n)]
        elif kind in (10, 13):  # logical, integer
            value = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif kind == 14:  # double
            value = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        else:
            raise ValueError(f"unsupported R type {kind}")
        if has_attr:  # attributes are a pairlist of (symbol, value); keep them by name
            value = RVector(value)
            value.attrs = {tag[1]: v for tag, v in self._item() if tag is not None}
        return value


def read_lazyload_db(base: Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database (``base.rdx`` index + ``base.rdb``)."""
    index = RReader(gzip.decompress(base.with_suffix(".rdx").read_bytes())).read()
    # index = list(variables=<named list of (offset, length)>, references, compressed)
    variables = index[index.attrs["names"].index("variables")]
    db = base.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in zip(variables.attrs["names"], variables, strict=True):
        chunk = db[offset : offset + length]
        out[name] = RReader(zlib.decompress(chunk[4:])).read()  # 4-byte length, then zlib
    return out


# ---------------------------------------------------------------- austen

HEADING = re.compile(r"^(chapter|volume)\b", re.IGNORECASE)


def paragraphs(lines: list[str]) -> list[str]:
    """Whitespace-normalised paragraphs from the first chapter heading on, headings dropped."""
    out: list[str] = []
    cur: list[str] = []
    started = False
    for raw in [*lines, ""]:
        line = (raw or "").strip()
        if HEADING.match(line):
            started = True
        elif started and line:
            cur.append(line)
            continue
        if cur:
            out.append(" ".join(" ".join(cur).split()))
            cur = []
    return out


def passages(lines: list[str], target: int = AUSTEN_TARGET_CHARS) -> list[str]:
    """Pack sentences of consecutive paragraphs into passages of about ``target`` chars.

    A passage ends at a sentence end once it reaches ``target``; short paragraphs run on into
    the next one (joined by a line break); a passage never exceeds ``2 * target``.
    """
    out: list[str] = []
    cur = ""
    for para in paragraphs(lines):
        pieces: list[str] = []
        for sent in re.split(r"(?<=[.!?;:])\s+", para):
            while len(sent) > 2 * target:  # an enormous sentence: cut at a word boundary
                cut = sent.rfind(" ", 0, 2 * target)
                cut = cut if cut > 0 else 2 * target
                pieces.append(sent[:cut])
                sent = sent[cut:].strip()
            pieces.append(sent)
        sep = "\n"
        for piece in pieces:
            if cur and len(cur) + 1 + len(piece) > 2 * target:
                out.append(cur)
                cur = ""
            cur = f"{cur}{sep}{piece}" if cur else piece
            sep = " "
            if len(cur) >= target:
                out.append(cur)
                cur = ""
    if len(cur) >= 40:  # a trailing fragment ("THE END") is no use
        out.append(cur)
    return out


def build_austen(root: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    base = root / "usr/lib/R/site-library/janeaustenr/data/Rdata"
    books = read_lazyload_db(base)
    rng = random.Random(SEED)
    records, totals = [], {}
    for key in sorted(NOVELS):
        ps = passages(books[key])
        totals[NOVELS[key]] = len(ps)
        keep = sorted(rng.sample(range(len(ps)), min(AUSTEN_PER_NOVEL, len(ps))))
        records += [{"text": ps[i], "novel": NOVELS[key]} for i in keep]
    meta = {"target_chars": AUSTEN_TARGET_CHARS, "passages_before_subsample": totals}
    meta["subsample_per_novel"] = AUSTEN_PER_NOVEL
    return records, meta


# ---------------------------------------------------------------- output


def write_jsonl_gz(path: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> None:
    buf = io.BytesIO()
    # mtime=0 and no file name in the header make the bytes reproducible.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for rec in [{"_meta": meta}, *records]:
            gz.write((json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n").encode())
    path.write_bytes(buf.getvalue())


def label_counts(records: list[dict[str, Any]], field: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r[field]] = counts.get(r[field], 0) + 1
    return dict(sorted(counts.items()))


def write_licenses(pkgs: dict[str, tuple[Path, str]], path: Path) -> None:
    parts = [
        "# Licences of the built-in datasets\n",
        "The files in this folder are derived from Debian packages by `scripts/build_datasets.py`.\n",
        "- `fortunes.jsonl.gz`: Debian package `fortunes` "
        f"{pkgs['fortunes'][1]} (fortune-mod data files; BSD licence, see below).",
        "- `austen.jsonl.gz`: Debian package `r-cran-janeaustenr` "
        f"{pkgs['r-cran-janeaustenr'][1]} (MIT; the novels themselves are public domain).\n",
        "Changes: quotes and passages were re-segmented, whitespace-normalised, filtered and "
        "subsampled as described in the build script.\n",
    ]
    for pkg, (root, version) in pkgs.items():
        text = (root / f"usr/share/doc/{pkg}/copyright").read_text(encoding="utf-8")
        parts.append(
            f"## {pkg} {version}: /usr/share/doc/{pkg}/copyright\n\n```\n{text.rstrip()}\n```\n"
        )
    path.write_text("\n".join(parts), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deb-dir", type=Path, help="use these .deb files instead of apt-get download")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = fetch_packages(args.deb_dir, Path(tmp))
        fort, fmeta = build_fortunes(pkgs["fortunes"][0])
        aus, ameta = build_austen(pkgs["r-cran-janeaustenr"][0])
        fmeta |= {"source": f"fortunes {pkgs['fortunes'][1]}", "size": len(fort)}
        fmeta["label_counts"] = label_counts(fort, "label")
        ameta |= {"source": f"r-cran-janeaustenr {pkgs['r-cran-janeaustenr'][1]}"}
        ameta |= {"size": len(aus), "label_counts": label_counts(aus, "novel")}
        write_jsonl_gz(args.out / "fortunes.jsonl.gz", fmeta, fort)
        write_jsonl_gz(args.out / "austen.jsonl.gz", ameta, aus)
        write_licenses(pkgs, args.out / "LICENSES.md")
    for name in ("fortunes.jsonl.gz", "austen.jsonl.gz", "LICENSES.md"):
        print(f"{name}: {(args.out / name).stat().st_size} bytes")
    print(f"fortunes: {len(fort)} quotes, {len(fmeta['label_counts'])} labels")
    print(f"austen: {len(aus)} passages, {len(ameta['label_counts'])} novels")


if __name__ == "__main__":
    main()
