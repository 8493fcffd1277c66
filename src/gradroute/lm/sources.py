"""A user's corpus: documents from local files, folders or the hub, tokenized once into a
memory-mapped cache on disk.

Sources (``iter_documents``):

- ``docs.jsonl``: one JSON object per line with a text field (``"text"`` unless
  ``text_field=``) and any other fields (labels, topics...), or one JSON string per line;
- ``docs.parquet``: one row per document (needs ``pyarrow``);
- ``docs.txt``: documents separated by ``<|endoftext|>`` when the file contains it, else one
  per non-empty line;
- a folder: every ``.jsonl`` / ``.parquet`` file in it (recursively, sorted by path) read as
  above, and every ``.txt`` file as *one* document, with the fields ``file`` (path in the
  folder) and ``folder`` (its first sub-folder, e.g. ``forget`` for ``forget/a.txt``);
- a folder written by Hugging Face ``datasets``' ``save_to_disk`` (``state.json`` or
  ``dataset_dict.json`` inside; read with ``pyarrow``, ``datasets`` itself is not needed);
- ``hub:owner/name`` or ``hub:owner/name:split``: streamed from the Hugging Face hub (needs
  ``datasets`` and network; nothing in the tests or the tutorial uses it).

Every document is a :class:`Doc` (text, its record, and ``where`` = ``"file:line"``), so
errors name the file and line. :func:`tokenize_to_cache` writes token rows (one document per
row, as :mod:`gradroute.lm.data`) to ``.npy`` files read back memory-mapped, so a corpus
larger than memory is tokenized in chunks once and then paged in as batches need it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .corpus import EOT
from .data import IGNORE, Stories

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
CACHE_VERSION = 1


class CorpusError(ValueError):
    """The corpus cannot be read; the message names the file and line or field."""


@dataclass
class Doc:
    text: str
    record: dict          # the document's fields, "text" included
    where: str            # "file:line" (or "file:row N") for error messages


# ------------------------------------------------------------------------------------------
# reading documents
# ------------------------------------------------------------------------------------------
def _need(module: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise ImportError(f"{what} needs the '{module}' package: pip install {module}") from None


def _text_of(obj: dict, text_field: str, where: str) -> str:
    if text_field not in obj:
        raise CorpusError(f"{where}: no text field {text_field!r} (fields: {', '.join(map(str, obj)) or 'none'}); "
                          "name the text field with --text-field")
    t = obj[text_field]
    if not isinstance(t, str):
        raise CorpusError(f"{where}: field {text_field!r} is a {type(t).__name__}, not a string")
    return t


def _record(obj: dict, text_field: str, where: str) -> Doc | None:
    text = _text_of(obj, text_field, where).strip()
    if not text:
        return None
    rec = dict(obj)
    rec["text"] = text
    return Doc(text, rec, where)


def iter_json_lines(path) -> Iterator[tuple[str, object]]:
    """``("file:line", value)`` for each non-empty line of a JSONL file (gzip-compressed when its name
    ends in .gz); a line that is not JSON raises :class:`CorpusError` naming the file and line."""
    import gzip

    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not valid JSON ({e.msg})") from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[Doc]:
    for where, obj in iter_json_lines(path):
        if isinstance(obj, str):
            obj = {text_field: obj}
        if not isinstance(obj, dict):
            raise CorpusError(f"{where}: expected a JSON object with a {text_field!r} field or a string")
        d = _record(obj, text_field, where)
        if d is not None:
            yield d


def _iter_txt(path: Path) -> Iterator[Doc]:
    raw = path.read_text(encoding="utf-8")
    if EOT in raw:
        parts, unit = raw.split(EOT), "document"
    else:
        parts, unit = raw.splitlines(), "line"
    for i, t in enumerate(parts, 1):
        t = t.strip()
        if t:
            yield Doc(t, {"text": t}, f"{path}:{unit} {i}" if unit == "document" else f"{path}:{i}")


def _iter_record_batches(batches, path: Path, text_field: str, columns: Sequence[str]) -> Iterator[Doc]:
    if text_field not in columns:
        raise CorpusError(f"{path}: no text column {text_field!r} (columns: {', '.join(columns)}); "
                          "name the text column with --text-field")
    row = 0
    for batch in batches:
        for obj in batch.to_pylist():
            d = _record(obj, text_field, f"{path}:row {row}")
            row += 1
            if d is not None:
                yield d


def _iter_parquet(path: Path, text_field: str) -> Iterator[Doc]:
    _need("pyarrow", "reading .parquet files")
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    yield from _iter_record_batches(pf.iter_batches(batch_size=1024), path, text_field, pf.schema_arrow.names)


def _iter_arrow_dataset(folder: Path, text_field: str, split: str) -> Iterator[Doc]:
    """A folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict``: ``split``)."""
    _need("pyarrow", "reading a Hugging Face datasets folder")
    import pyarrow as pa

    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise CorpusError(f"{folder}: no split {split!r} in dataset_dict.json (splits: {', '.join(splits)})")
        folder = folder / split
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise CorpusError(f"{folder}: no state.json; not a folder written by datasets' save_to_disk")
    files = [d["filename"] for d in json.loads(state_path.read_text()).get("_data_files", [])]
    if not files:
        raise CorpusError(f"{state_path}: lists no data files")
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CorpusError(f"{state_path} lists {name}, which is missing")
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        yield from _iter_record_batches(reader, path, text_field, reader.schema.names)


def _iter_hub(name: str, text_field: str) -> Iterator[Doc]:
    name, _, split = name.partition(":")
    _need("datasets", f"streaming {name} from the Hugging Face hub")
    import datasets

    ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    for i, obj in enumerate(ds):
        d = _record(obj, text_field, f"hub:{name}:row {i}")
        if d is not None:
            yield d


def _folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def iter_documents(source: str | os.PathLike, text_field: str = "text", split: str = "train") -> Iterator[Doc]:
    """The documents of ``source`` in a fixed order (see the module docstring). Empty texts
    are skipped."""
    s = str(source)
    if s.startswith("hub:"):
        yield from _iter_hub(s[4:], text_field)
        return
    path = Path(s)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist (expected a .jsonl/.parquet/.txt file, a folder "
                                "of them, a datasets save_to_disk folder, or hub:owner/name)")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            yield from _iter_arrow_dataset(path, text_field, split)
            return
        files = _folder_files(path)
        if not files:
            raise CorpusError(f"corpus folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
        for f in files:
            if f.suffix == ".txt":
                t = f.read_text(encoding="utf-8").strip()
                rel = f.relative_to(path)
                if t:
                    yield Doc(t, {"text": t, "file": str(rel), "folder": rel.parts[0] if len(rel.parts) > 1 else ""},
                              str(f))
            else:
                yield from _iter_file(f, text_field)
        return
    yield from _iter_file(path, text_field)


def _iter_file(path: Path, text_field: str) -> Iterator[Doc]:
    if path.suffix == ".jsonl":
        return _iter_jsonl(path, text_field)
    if path.suffix == ".parquet":
        return _iter_parquet(path, text_field)
    if path.suffix == ".txt":
        return _iter_txt(path)
    raise CorpusError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(TEXT_SUFFIXES)}")


def fingerprint(source: str | os.PathLike, text_field: str = "text", split: str = "train") -> str:
    """A hash of what ``source`` is now (paths, sizes, modification times), for caches."""
    s = str(source)
    h = hashlib.sha256(f"v{CACHE_VERSION}:{text_field}:{split}:".encode())
    if s.startswith("hub:"):
        h.update(s.encode())
        return h.hexdigest()[:20]
    path = Path(s)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist")
    files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


# ------------------------------------------------------------------------------------------
# token cache
# ------------------------------------------------------------------------------------------
def _open(path: Path, shape=None):
    a = np.load(path, mmap_mode="c")            # copy-on-write: tensors may be written, the file never
    return torch.from_numpy(a)


def tokenize_to_cache(docs: Iterable[Doc], rows_of: np.ndarray, tok, n_ctx: int,
                      spans: Callable[[str], list[tuple[int, int]]], folder: Path,
                      chunk: int = 2048) -> Path:
    """Tokenize ``docs`` (document ``i`` goes to row ``rows_of[i]``; ``-1`` skips it) into
    ``folder/{x,y,keyword}.npy`` (one document per row, as :func:`gradroute.lm.data.encode_stories`:
    ``n_ctx`` inputs and targets, padding targets ``-100``; ``keyword`` marks targets overlapping
    ``spans(text)``). Written to a temporary folder and renamed, so concurrent processes are safe
    and an interrupted run leaves no half cache. Returns ``folder``."""
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        return folder
    n = int(rows_of.max()) + 1 if rows_of.size else 0
    if n <= 0:
        raise CorpusError("no documents to tokenize")
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    X = np.lib.format.open_memmap(tmp / "x.npy", mode="w+", dtype=np.int64, shape=(n, n_ctx))
    Y = np.lib.format.open_memmap(tmp / "y.npy", mode="w+", dtype=np.int64, shape=(n, n_ctx))
    K = np.lib.format.open_memmap(tmp / "keyword.npy", mode="w+", dtype=np.bool_, shape=(n, n_ctx))
    filled = np.zeros(n, dtype=bool)

    def flush(buf):
        encs = tok.encode_batch([d.text for _, d in buf])
        for (r, d), enc in zip(buf, encs):
            ids = (list(enc.ids[:n_ctx]) + [tok.eot_id])[: n_ctx + 1]
            row = np.full(n_ctx + 1, tok.eot_id, dtype=np.int64)
            row[: len(ids)] = ids
            y = row[1:].copy()
            y[len(ids) - 1:] = IGNORE
            kw = np.zeros(n_ctx + 1, dtype=bool)
            for s, e in spans(d.text):
                for j, (a, b) in enumerate(enc.offsets[:n_ctx]):
                    if a < e and b > s:
                        kw[j] = True
            X[r], Y[r], K[r] = row[:-1], y, kw[1:]
            filled[r] = True

    buf = []
    for i, d in enumerate(docs):
        if i >= rows_of.size:
            raise CorpusError(f"{d.where}: the corpus changed while it was read (more documents than before)")
        if rows_of[i] >= 0:
            buf.append((int(rows_of[i]), d))
            if len(buf) >= chunk:
                flush(buf)
                buf = []
    if buf:
        flush(buf)
    if not filled.all():
        raise CorpusError(f"the corpus changed while it was read ({int((~filled).sum())} rows were not filled)")
    for a in (X, Y, K):
        a.flush()
    del X, Y, K
    (tmp / "meta.json").write_text(json.dumps({"rows": n, "n_ctx": n_ctx, "tokenizer": tok.name}))
    try:
        os.replace(tmp, folder)
    except OSError:            # another process finished first: use its cache
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():
            raise
    return folder


def stories_from_cache(folder: Path, rows: slice, forget: torch.Tensor) -> Stories:
    """:class:`Stories` over ``rows`` of a token cache; ``x``, ``y`` and ``keyword`` stay
    memory-mapped (indexing a batch reads only its rows)."""
    x, y, k = (_open(Path(folder) / f"{n}.npy") for n in ("x", "y", "keyword"))
    x, y, k = x[rows], y[rows], k[rows]
    forget = torch.as_tensor(forget, dtype=torch.bool)
    if forget.shape != (x.shape[0],):
        raise ValueError(f"forget flags have shape {tuple(forget.shape)}, expected ({x.shape[0]},)")
    return Stories(x, y, k, forget, torch.zeros_like(forget))


def tokenizer_key(tok) -> str:
    """A hash of a :class:`gradroute.lm.tokenizer.Tokenizer`'s full definition."""
    return hashlib.sha256(tok.hf.to_str().encode()).hexdigest()[:16]
