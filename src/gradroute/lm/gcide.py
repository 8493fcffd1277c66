"""GCIDE, a real dictionary with real (partial) domain labels, as a corpus for unlearning.

The GNU Collaborative International Dictionary of English (GPL-2+) ships in Debian as
``dict-gcide``: ``apt-get install dict-gcide`` puts a dictd pair under ``/usr/share/dictd/``:
``gcide.index`` (one line per headword: ``headword<TAB>offset<TAB>length``, the numbers in
dictd's base-64 digits) and ``gcide.dict.dz`` (the entries, dictzip = gzip with a random-access
header, so plain gzip reads it).

    gradroute data gcide --out gcide.jsonl.gz                 # the dictionary as JSONL
    gradroute data gcide --domain Med --out med.jsonl         # a forget-domain corpus for --corpus

:func:`convert` writes one JSON object per entry (``headword``, ``text``: the entry with its
whitespace collapsed and source markers such as ``[1913 Webster]`` removed, ``fields``: the
lexicographers' field tags in it, e.g. ``Med`` for "(Med.)"), the distinct (offset, length)
records in index order, entries under 20 characters dropped.

:func:`domain_corpus` turns those entries into the corpus of the real-text experiment: entries
tagged with the forget field are ``"label": "forget"``, entries tagged with a related field and
not the forget field are evaluation-only topical documents (``"topic": true``, no label: the
absorption question), and ``n_other`` other entries are the rest (unlabelled). The tags are
partial: many medical entries carry none, so the "other" entries hold some unlabelled domain text,
as users' corpora do.
"""
from __future__ import annotations

import gzip
import json
import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator

from ..utils import DataMissing
from .sources import CorpusError, iter_json_lines

DICTD_DIR = Path("/usr/share/dictd")
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_VALUE = {c: i for i, c in enumerate(B64)}
MIN_CHARS = 20
# source attributions the dictionary appends to senses and entries
_MARKER = re.compile(r"\[(?:(?:\d{4} )?Webster[^\[\]]*|WordNet 1\.5[^\[\]]*|PJC|Century Dict\.[^\[\]]*|"
                     r"Chambers[^\[\]]*|AS|RDH|MW10)\]")
_FIELD = re.compile(r"\(([A-Z][A-Za-z]*(?: [A-Z][A-Za-z]*)*)\.\)")
FORGET_FIELD = "Med"
RELATED_FIELDS = ("Anat", "Physiol", "Surg", "Pathol")
N_OTHER = 16_000
INSTALL_HINT = ("the GCIDE dictionary was not found: install it with `apt-get install dict-gcide` (Debian/Ubuntu; "
                "it puts gcide.index and gcide.dict.dz under /usr/share/dictd/), then run "
                "`gradroute data gcide --out gcide.jsonl.gz`, or pass an existing entries file with --gcide PATH "
                "(or set GRADROUTE_GCIDE)")


class GcideMissing(DataMissing):
    """Neither an entries file nor the installed dictionary was found; the message says how to get it."""


def decode_number(digits: str) -> int:
    """A dictd index number: big-endian base 64 over ``B64``. Raises ``ValueError`` naming a bad digit."""
    if not digits:
        raise ValueError("empty number")
    value = 0
    for ch in digits:
        if ch not in _B64_VALUE:
            raise ValueError(f"{ch!r} is not a dictd base-64 digit")
        value = value * 64 + _B64_VALUE[ch]
    return value


def read_index(path) -> Iterator[tuple[int, str, int, int]]:
    """``(line number, headword, offset, length)`` per index line; a malformed line raises
    :class:`CorpusError` naming the file and line."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                raise CorpusError(f"{path}:{n}: expected 'headword<TAB>offset<TAB>length', got {len(parts)} "
                                  f"field(s): {line[:80]!r}")
            try:
                offset, length = decode_number(parts[1]), decode_number(parts[2])
            except ValueError as e:
                raise CorpusError(f"{path}:{n}: bad offset/length {parts[1]!r}/{parts[2]!r} ({e})") from None
            yield n, parts[0], offset, length


def clean_text(raw: str) -> str:
    """The entry's text: source markers removed, whitespace collapsed."""
    return " ".join(_MARKER.sub(" ", raw).split())


def field_tags(text: str) -> list[str]:
    """The field tags of an entry, sorted, each once: ``(Med.)`` -> ``Med``, ``(Old Chem.)`` -> ``Old Chem``."""
    return sorted(set(_FIELD.findall(text)))


def iter_entries(index_path, dict_path, min_chars: int = MIN_CHARS) -> Iterator[dict]:
    """The dictionary's entries: distinct (offset, length) records in index order, the first
    headword naming each. An index record that points outside the data raises
    :class:`CorpusError` naming the index line, the headword and the offset."""
    dict_path = Path(dict_path)
    opener = gzip.open if dict_path.suffix in (".dz", ".gz") else open
    try:
        with opener(dict_path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as e:
        raise CorpusError(f"{dict_path}: cannot read the dictionary data ({e})") from None
    seen = set()
    for n, headword, offset, length in read_index(index_path):
        if (offset, length) in seen:
            continue
        seen.add((offset, length))
        if length == 0 or offset + length > len(data):
            raise CorpusError(f"{index_path}:{n}: entry {headword!r} at offset {offset} (length {length}) lies "
                              f"outside {dict_path} ({len(data)} bytes)")
        # the dictionary is UTF-8 with a few stray Windows-1252 bytes: those become U+FFFD
        text = clean_text(data[offset:offset + length].decode("utf-8", errors="replace"))
        if len(text) >= min_chars:
            yield {"headword": headword, "text": text, "fields": field_tags(text)}


def _open_write(path: Path, gz: bool):
    path.parent.mkdir(parents=True, exist_ok=True)
    return gzip.open(path, "wt", encoding="utf-8") if gz else open(path, "w", encoding="utf-8")


def write_jsonl(rows: Iterable[dict], path) -> int:
    """Write ``rows`` as JSONL (gzip when ``path`` ends in .gz), atomically; returns the count."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    n = 0
    with _open_write(tmp, path.suffix == ".gz") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def dictd_pair(dictd_dir=DICTD_DIR, name: str = "gcide") -> tuple[Path, Path]:
    """``(<name>.index, <name>.dict.dz or .dict)`` in ``dictd_dir``; :class:`GcideMissing` if absent."""
    d = Path(dictd_dir)
    data = next((p for p in (d / f"{name}.dict.dz", d / f"{name}.dict") if p.is_file()), None)
    if not (d / f"{name}.index").is_file() or data is None:
        raise GcideMissing(f"no {name}.index and {name}.dict.dz in {d}: " + INSTALL_HINT)
    return d / f"{name}.index", data


def convert(out, dictd_dir=DICTD_DIR, name: str = "gcide") -> int:
    """Convert the dictd pair in ``dictd_dir`` to the entries JSONL ``out``; returns the number of entries."""
    return write_jsonl(iter_entries(*dictd_pair(dictd_dir, name)), out)


def read_entries(path) -> list[dict]:
    """Entries from a JSONL (or .jsonl.gz) file as :func:`convert` writes it; a bad line raises
    :class:`CorpusError` naming the file and line."""
    rows = []
    for where, r in iter_json_lines(path):
        if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not isinstance(r.get("fields"), list):
            raise CorpusError(f"{where}: an entry needs a 'text' string and a 'fields' list")
        rows.append(r)
    if not rows:
        raise CorpusError(f"{path} holds no entries")
    return rows


def domain_corpus(entries: list[dict], forget: str = FORGET_FIELD, related: Iterable[str] = RELATED_FIELDS,
                  n_other: int = N_OTHER, seed: int = 0) -> list[dict]:
    """The real-text unlearning corpus (module docstring): entries shuffled with
    ``random.Random(seed)``; forget-tagged entries labelled forget, related-tagged ones topical,
    the first ``n_other`` of the others unlabelled; mixed with ``random.Random(seed + 1)``."""
    related = set(related)
    if forget in related:
        raise ValueError(f"the forget field {forget!r} is also among the related fields")
    rows = list(entries)
    random.Random(seed).shuffle(rows)
    keep = lambda r: {"text": r["text"], "headword": r.get("headword", "")}
    med, rel, other = [], [], []
    for r in rows:
        tags = set(r["fields"])
        if forget in tags:
            med.append({**keep(r), "label": "forget"})
        elif tags & related:
            rel.append({**keep(r), "topic": True})
        else:
            other.append(keep(r))
    if not med:
        raise CorpusError(f"no entry carries the forget field {forget!r}")
    docs = med + rel + other[:n_other]
    random.Random(seed + 1).shuffle(docs)
    return docs


def find_entries(path=None) -> Path:
    """The entries file: ``path``, else ``$GRADROUTE_GCIDE``, else the cached conversion, else the
    installed dictionary converted into the cache. Raises :class:`GcideMissing` with
    :data:`INSTALL_HINT` when there is none."""
    from .tokenizer import cache_dir

    for p in (path, os.environ.get("GRADROUTE_GCIDE")):
        if p:
            if not Path(p).is_file():
                raise GcideMissing(f"{p} does not exist: " + INSTALL_HINT)
            return Path(p)
    cached = cache_dir() / "gcide" / "gcide_entries.jsonl.gz"
    if cached.is_file():
        return cached
    if (DICTD_DIR / "gcide.index").is_file():
        convert(cached, DICTD_DIR)
        return cached
    raise GcideMissing(INSTALL_HINT)


def domain_corpus_file(entries_path=None, forget: str = FORGET_FIELD, related: Iterable[str] = RELATED_FIELDS,
                       n_other: int = N_OTHER, seed: int = 0) -> Path:
    """:func:`domain_corpus` of :func:`find_entries`, written once into the cache (keyed by the
    entries file's size and time and the arguments); the path, for ``--corpus``."""
    import hashlib

    from .tokenizer import cache_dir

    src = find_entries(entries_path)
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{forget}|{sorted(related)}|{n_other}|{seed}"
                         .encode()).hexdigest()[:16]
    out = cache_dir() / "gcide" / f"{forget.lower()}-{key}.jsonl"
    if not out.is_file():
        write_jsonl(domain_corpus(read_entries(src), forget, related, n_other, seed), out)
    return out


def add_argument(parser) -> None:
    """``--gcide PATH``, for an experiment's ``--profile real``."""
    parser.add_argument("--gcide", default=None, metavar="PATH",
                        help="profile real: the GCIDE entries file (`gradroute data gcide --out PATH`; default: "
                             "$GRADROUTE_GCIDE, the cache, or the installed dict-gcide converted once)")


def use_real_corpus(args) -> None:
    """``--profile real`` of an experiment on the user-corpus path (``--corpus``, the label flags of
    :mod:`.user_corpus`): unless ``--corpus`` was given, the medical :func:`domain_corpus_file` of
    ``--gcide`` (:class:`GcideMissing`, saying how to get it, when there is none), its ``label``
    field as the forget rule and its ``topic`` field (the related fields) as the evaluation-only
    field, unless a rule was given."""
    if args.corpus == "generated":
        args.corpus = str(domain_corpus_file(args.gcide))
        if args.label_field is None and not args.forget_words and not args.forget_regex:
            args.label_field = "label"
            args.topic_field = args.topic_field or "topic"


def main(argv: list[str] | None = None) -> int:
    """``gradroute data gcide``: convert the installed dictionary; with ``--domain`` write a
    forget-domain corpus instead."""
    import argparse

    ap = argparse.ArgumentParser(prog="gradroute data gcide", description=main.__doc__)
    ap.add_argument("--dictd", type=Path, default=DICTD_DIR, help="folder with gcide.index and gcide.dict.dz "
                                                                   "(default: %(default)s)")
    ap.add_argument("--entries", type=Path, default=None,
                    help="with --domain: an entries JSONL already converted (default: convert --dictd)")
    ap.add_argument("--out", type=Path, required=True, help="output .jsonl or .jsonl.gz")
    ap.add_argument("--domain", default=None, help=f"write a forget-domain corpus for this field tag (e.g. {FORGET_FIELD})")
    ap.add_argument("--related", nargs="*", default=list(RELATED_FIELDS),
                    help="with --domain: evaluation-only related field tags (default: %(default)s)")
    ap.add_argument("--n-other", type=int, default=N_OTHER, help="with --domain: other entries (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        if a.domain is None:
            n = convert(a.out, a.dictd)
            print(f"wrote {n} entries to {a.out}")
            return 0
        entries = read_entries(a.entries) if a.entries else list(iter_entries(*dictd_pair(a.dictd)))
        docs = domain_corpus(entries, a.domain, a.related, a.n_other, a.seed)
    except (GcideMissing, CorpusError, ValueError) as e:
        print(f"error: {e}")
        return 2
    write_jsonl(docs, a.out)
    n_f = sum(d.get("label") == "forget" for d in docs)
    n_t = sum(bool(d.get("topic")) for d in docs)
    print(f"wrote {len(docs)} documents to {a.out}: {n_f} labelled forget ({a.domain}), {n_t} topical "
          f"({', '.join(a.related)}), {len(docs) - n_f - n_t} other")
    return 0

