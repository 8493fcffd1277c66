"""``gradroute run lm-unlearning --corpus PATH``: the user's corpus, forget rule and held-out
sets, for the experiment in :mod:`gradroute.experiments.lm_unlearning`.

    gradroute run lm-unlearning --corpus docs.jsonl --forget-words tree forest --fractions 1
    gradroute run lm-unlearning --corpus docs/ --label-field label --topic-field topic \\
        --arch hf-gpt2 --save-models --methods base filtering era param_routing --fractions 1
    gradroute run lm-unlearning --corpus docs/ --label-field label --model path/to/hf_model --save-models

Steps (each cached under ``$GRADROUTE_CACHE/corpora``, keyed by the files' sizes and times,
the rule, the split and the tokenizer): one pass labels every document (:mod:`.labels`), the
held-out sets are drawn by counts (:mod:`.splits`), a BPE is trained on (up to 20,000)
training documents (with ``--model PATH``: the model folder's own tokenizer instead), and one
more pass tokenizes everything into a memory-mapped cache laid out
as training rows then each held-out set (:mod:`.sources`).
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .labels import FORGET, UNLABELLED, ForgetRule, LabelError, rule_from_args
from .sources import CorpusError, fingerprint, iter_documents, stories_from_cache, tokenize_to_cache, tokenizer_key
from .splits import SETS, SplitTargets, plan_splits, row_order
from .tokenizer import ModelTokenizer, cache_dir, get_tokenizer, model_tokenizer

BPE_SAMPLE_DOCS = 20_000
EVAL_KEYS = ("retain_loss", "forget_loss", "forget_loss_no_keywords", "topic_loss", "forget_loss_after_attack")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("your corpus (with --corpus PATH; see docs/your_data.md)")
    g.add_argument("--label-field", default=None,
                   help='JSONL/parquet field with "forget" / "retain" (absent: unlabelled)')
    g.add_argument("--forget-words", nargs="+", default=None,
                   help="forget documents contain one of these whole words (any case); default, when no "
                        "rule is given: the paper's tree/forest/woodland list")
    g.add_argument("--forget-regex", default=None, help="forget documents match this regex (case-insensitive)")
    g.add_argument("--topic-field", default=None,
                   help="evaluation-only field marking forget-domain documents without a label (absorption)")
    g.add_argument("--text-field", default="text", help="the documents' text field (default: %(default)s)")
    g.add_argument("--split", default="train", help="split of a datasets folder or hub dataset (default: train)")
    g.add_argument("--n-eval", type=int, default=None,
                   help="held-out forget and retain documents to evaluate on (default: sized to the corpus)")
    g.add_argument("--n-attack", type=int, default=None, help="forget documents for the retraining attack")
    g.add_argument("--n-val", type=int, default=None, help="retain documents, and forget documents, for validation (baseline hyperparameter choice; default: sized to the corpus)")
    g.add_argument("--n-topic", type=int, default=None, help="unlabelled topical documents to evaluate on")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the held-out draw (default: 0)")
    g.add_argument("--save-models", action="store_true",
                   help="save every final model with save_pretrained under OUT/models/<run>/ (our GPT is saved as "
                        "a transformers GPT-2 computing the same function) and the held-out documents under "
                        "OUT/eval_data/, for `gradroute eval`")


def is_user_corpus(source: str) -> bool:
    return source not in ("generated", "tinystories")


# ------------------------------------------------------------------------------------------
# labelling pass (cached)
# ------------------------------------------------------------------------------------------
def _corpus_dir() -> Path:
    return cache_dir() / "corpora"


def scan_labels(source: str, rule: ForgetRule, text_field: str = "text", split: str = "train") -> dict:
    """Per document: ``status`` (FORGET / RETAIN / UNLABELLED), ``topic`` and ``chars`` (length). Raises
    a clear error for an empty corpus, a label field no document has, or no forget documents."""
    fp = fingerprint(source, text_field, split)
    key = hashlib.sha256(f"{fp}|{rule.key()}".encode()).hexdigest()[:20]
    path = _corpus_dir() / f"labels-{key}.npz"
    if path.is_file():
        z = np.load(path)
        if "chars" in z:                        # (caches written before document lengths were kept: redo)
            return {"status": z["status"], "topic": z["topic"], "chars": z["chars"], "fingerprint": fp}
    status, topic, chars, first, seen_field = [], [], [], None, 0
    for d in iter_documents(source, text_field, split):
        first = first or d
        status.append(rule.status(d.record, d.where))
        topic.append(rule.is_topic(d.record, d.where))
        chars.append(len(d.text))
        seen_field += rule.label_field is not None and d.record.get(rule.label_field) is not None
    if not status:
        raise CorpusError(f"{source} contains no documents")
    if rule.label_field is not None and not seen_field:
        raise LabelError(f"{source}: no document has the label field {rule.label_field!r} (fields of the first "
                         f"document, {first.where}: {', '.join(first.record)})")
    if rule.topic_field is not None and not any(topic):
        raise LabelError(f"{source}: no document has a true evaluation field {rule.topic_field!r} (fields of the "
                         f"first document, {first.where}: {', '.join(first.record)})")
    status, topic = np.array(status, dtype=np.int8), np.array(topic, dtype=bool)
    if not (status == FORGET).any():
        raise LabelError(f"{source}: no forget documents under the rule ({rule.describe()}) among {status.size} "
                         "documents")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    chars = np.array(chars, dtype=np.int64)
    np.savez(tmp, status=status, topic=topic, chars=chars)
    tmp.replace(path)
    return {"status": status, "topic": topic, "chars": chars, "fingerprint": fp}


# ------------------------------------------------------------------------------------------
# configuration (at build_config time) and data (at _prepare time)
# ------------------------------------------------------------------------------------------
def configure(cfg: dict, args: argparse.Namespace) -> None:
    """Add ``cfg["user_data"]``: the rule, the corpus fingerprint and the held-out sizes,
    resolved now (so they are recorded with every run); with ``cfg["size_from_corpus"]``, the
    vocabulary and steps (:func:`size_for_corpus`). ``cfg`` needs ``corpus`` (``n_eval``,
    ``n_attack``, ``n_val``: the held-out targets), ``train``, ``batch_size`` and ``tokenizer``."""
    rule = rule_from_args(args.label_field, args.forget_words, args.forget_regex, args.topic_field)
    c = cfg["corpus"]
    targets = SplitTargets(forget=args.n_eval, attack_pool=args.n_attack, retain=args.n_eval, retain_val=args.n_val, forget_val=args.n_val,
                           topic=args.n_topic, target_eval=c["n_eval"], target_attack=c["n_attack"],
                           target_val=c["n_val"])
    scan = scan_labels(args.corpus, rule, args.text_field, args.split)
    if rule.topic_field is None and args.n_topic:
        raise ValueError("--n-topic needs --topic-field")
    plan = plan_splits(scan["status"], scan["topic"], targets, args.split_seed, source=args.corpus)
    sizes = plan["sizes"]
    if cfg.get("size_from_corpus") and cfg.get("tokenizer") == "bpe":
        cfg["sizing"] = size_for_corpus(cfg, scan["chars"][plan["index"]["train"]], explicit={
            k for k in ("steps", "vocab_size", "d_model") if getattr(args, k, None) is not None})
    cfg["user_data"] = {
        "rule": {"label_field": rule.label_field, "words": list(rule.words), "regex": rule.regex,
                 "topic_field": rule.topic_field},
        "text_field": args.text_field, "split": args.split, "split_seed": args.split_seed,
        "sizes": sizes, "fingerprint": scan["fingerprint"], "save_models": bool(args.save_models)}


# Sizing a user's corpus (profiles quick and real, our GPT with a BPE trained on the corpus).
# The rule was chosen on the GCIDE medical corpus's validation split so that the base model learns
# the forget domain (docs/lm_unlearning.md, "Real text: sizing"): a larger vocabulary lets a
# domain's words be tokens of their own, and more passes over the data let the model learn them.
# chosen on the dictionary corpus's validation split, rounds 1 and 2 (docs/real_text.md)
SIZING = {"chars_per_merge": 500, "vocab": (1024, 8192), "epochs": 1.0, "max_steps": 2400}


def size_for_corpus(cfg: dict, train_chars: np.ndarray, explicit: set = frozenset()) -> dict:
    """Set the vocabulary and training steps of ``cfg`` from the training documents' lengths
    (``train_chars``), except what the user gave (``explicit``); returns what was chosen and why.

    - vocabulary: a power of two near one BPE token per ``chars_per_merge`` characters of
      training text, within ``vocab`` (1,024 for under ~0.75M characters, 8,192 from ~4M);
    - steps: ``epochs`` passes over the training documents at the profile's batch size, at
      least the profile's steps and at most ``max_steps``."""
    n_docs, chars = int(train_chars.size), int(train_chars.sum())
    lo, hi = SIZING["vocab"]
    vocab = int(min(hi, max(lo, 2 ** round(np.log2(max(chars / SIZING["chars_per_merge"], 1))))))
    steps = int(min(SIZING["max_steps"], max(cfg["train"]["steps"],
                                             np.ceil(SIZING["epochs"] * n_docs / cfg["batch_size"]))))
    chosen = {"train_documents": n_docs, "train_characters": chars, "rule": dict(SIZING)}
    if "vocab_size" not in explicit:
        cfg["vocab_size"] = chosen["vocab_size"] = vocab
    if "steps" not in explicit:
        cfg["train"]["steps"] = chosen["steps"] = steps
    return chosen


def _rule(ud: dict) -> ForgetRule:
    return ForgetRule(**ud["rule"])


def _plan(cfg: dict, source: str):
    ud = cfg["user_data"]
    rule = _rule(ud)
    scan = scan_labels(source, rule, ud["text_field"], ud["split"])
    if scan["fingerprint"] != ud["fingerprint"]:
        raise CorpusError(f"{source} changed since the run was configured; start the command again")
    return rule, scan, plan_splits(scan["status"], scan["topic"], SplitTargets(**ud["sizes"]), ud["split_seed"],
                                   source=source)


EVAL_DATA_SETS = ("forget", "retain", "topic")


def write_eval_data(cfg: dict, folder) -> Path:
    """The held-out evaluation documents (``forget``, ``retain`` and, with a topic field, ``topic``)
    as ``folder/<set>.jsonl``: ``text`` plus the record's other string fields (e.g. ``headword``),
    for ``gradroute eval --data folder``; never training documents."""
    import json

    ud = cfg["user_data"]
    _, _, plan = _plan(cfg, cfg["source"])
    where = {int(i): k for k in EVAL_DATA_SETS for i in plan["index"][k]}
    rows: dict = {k: [] for k in EVAL_DATA_SETS if plan["sizes"][k]}
    for i, d in enumerate(iter_documents(cfg["source"], ud["text_field"], ud["split"])):
        if i in where:
            extra = {k: v for k, v in d.record.items() if isinstance(v, str) and k != ud["text_field"]}
            rows[where[i]].append({**extra, "text": d.text})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k, docs in rows.items():
        (folder / f"{k}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in docs))
    return folder


def prepare(cfg: dict, source: str | None = None):
    """``(tokenizer, training Stories, held-out sets, counts)`` as the experiment's ``_prepare``."""
    ud = cfg["user_data"]
    source = source or cfg["source"]
    rule, scan, plan = _plan(cfg, source)
    status, topic = scan["status"], scan["topic"]
    rows_of, slices = row_order(plan, status.size)
    train_idx = plan["index"]["train"]
    docs = lambda: iter_documents(source, ud["text_field"], ud["split"])
    if cfg["tokenizer"] == "bpe":
        sample, want = [], set(train_idx[:BPE_SAMPLE_DOCS].tolist())
        for i, d in enumerate(docs()):
            if i in want:
                sample.append(d.text)
            if len(sample) == len(want):
                break
        tok = get_tokenizer("bpe", texts=sample, vocab_size=cfg["vocab_size"])
    elif cfg["tokenizer"] == "model":              # --model PATH: the model folder's own tokenizer
        tok = model_tokenizer(cfg["model"]["path"])
    else:
        tok = get_tokenizer(cfg["tokenizer"])
    n_ctx = cfg["model"]["n_ctx"]
    key = hashlib.sha256(f"{scan['fingerprint']}|{rule.key()}|{tokenizer_key(tok)}|{n_ctx}|".encode()
                         + rows_of.tobytes()).hexdigest()[:20]
    folder = tokenize_to_cache(docs(), rows_of, tok, n_ctx, rule.spans, _corpus_dir() / f"tokens-{key}")
    is_f = torch.from_numpy(status == FORGET)
    order = torch.from_numpy(np.concatenate([plan["index"][k] for k in ("train", *SETS)]))
    forget_rows = is_f[order]
    train = stories_from_cache(folder, slices["train"], forget_rows[slices["train"]])
    sets = {k: stories_from_cache(folder, slices[k], forget_rows[slices[k]]) for k in SETS if plan["sizes"][k]}
    n_train, f_train = len(train), int(train.forget.sum())
    counts = {"stories": n_train, "forget": f_train, "forget_fraction": f_train / n_train,
              "documents": int(status.size), "forget_documents": int((status == FORGET).sum()),
              "unlabelled_documents": int((status == UNLABELLED).sum()),
              "topic_documents": int((topic & (status != FORGET)).sum()),
              "held_out": plan["sizes"], "retain_source": plan["retain_source"], "rule": rule.describe(),
              "source": str(source), "token_cache": str(folder)}
    return tok, train, sets, counts


# ------------------------------------------------------------------------------------------
# an example corpus (the tutorial's and the tests')
# ------------------------------------------------------------------------------------------
def write_example_corpus(folder, n: int = 3000, forget: float = 0.02, topic: float = 0.03, parts: int = 2,
                         seed: int = 0) -> Path:
    """A folder of ``parts`` JSONL files with ``n`` generated stories: ``round(forget * n)``
    forest stories naming it (``"label": "forget"``), ``round(topic * n)`` forest stories
    without keywords and without a label (``"topic": true``), and other stories, every second
    one labelled ``"retain"`` (the rest unlabelled). Deterministic in ``seed``."""
    import json
    import random

    from .corpus import generate_stories, is_forest_topic, is_forget

    n_f, n_t = round(forget * n), round(topic * n)
    if n_f + n_t > n:
        raise ValueError(f"forget + topic fractions exceed 1: {forget} + {topic}")
    other, forest, plain = [], [], []
    k = 0
    while len(other) < n - n_f - n_t or len(forest) < n_f:
        for s in generate_stories(2000, seed=seed * 1000 + 5, start=k):
            (forest if is_forget(s) else plain if is_forest_topic(s) else other).append(s)
        k += 2000
    k = 0
    while len(plain) < n_t:
        plain += [s for s in generate_stories(2000, seed=seed * 1000 + 6, start=k, keyword_fraction=0.0)
                  if is_forest_topic(s) and not is_forget(s)]
        k += 2000
    rows = [{"text": t, "label": "retain"} if i % 2 == 0 else {"text": t}
            for i, t in enumerate(other[: n - n_f - n_t])]
    rows += [{"text": t, "label": "forget"} for t in forest[:n_f]] + [{"text": t, "topic": True} for t in plain[:n_t]]
    random.Random(seed).shuffle(rows)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for p in range(parts):
        chunk = rows[p * len(rows) // parts:(p + 1) * len(rows) // parts]
        (folder / f"part-{p}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chunk))
    return folder


# ------------------------------------------------------------------------------------------
# evaluation extras, table, saved models
# ------------------------------------------------------------------------------------------
def extra_metrics(model, sets: dict) -> dict:
    """``topic_loss``: mean loss (nats/token) on held-out unlabelled topical documents."""
    from .evaluate import mean_loss

    return {"topic_loss": mean_loss(model, sets["topic"])} if "topic" in sets else {}


def evaluation_table(runs: list[dict]) -> str:
    """One markdown table: per method and labelled fraction, the mean over seeds of each
    metric (± 95% CI half-width when there are several seeds; ``n`` says how many)."""
    from ..utils import markdown_table, mean_ci

    keys = [k for k in EVAL_KEYS if any(k in r for r in runs)]
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["method"], r["labelled_fraction"]), []).append(r)
    rows = []
    for (m, p), rs in groups.items():
        cells = []
        for k in keys:
            c = mean_ci([r[k] for r in rs if k in r]) if any(k in r for r in rs) else None
            cells.append("" if c is None else f"{c['mean']:.3f}" + (f" ± {c['hi'] - c['mean']:.3f}" if c["n"] > 1 else ""))
        rows.append([m, f"{p:g}", str(len(rs)), *cells])
    return ("Losses in nats/token on held-out documents; forget_loss_after_attack is the minimum forget loss "
            "reached by the retraining attack"
            + ("; topic_loss is on unlabelled documents of the forget domain" if "topic_loss" in keys else "")
            + ".\n\n" + markdown_table(["method", "p", "n", *keys], rows))


def save_model(model, tok, folder: Path) -> Path:
    """The final model (Hugging Face) with ``save_pretrained``, with its tokenizer: the model
    folder's own for ``--model PATH``, else our BPE as a ``PreTrainedTokenizerFast``."""
    from ..hf import save_unlearned
    from .tokenizer import wrap_tokenizer

    return save_unlearned(model, folder, tokenizer=tok.transformers if isinstance(tok, ModelTokenizer)
                          else wrap_tokenizer(tok))


if __name__ == "__main__":      # python -m gradroute.lm.user_corpus example FOLDER [--n N --forget F --topic T]
    ap = argparse.ArgumentParser(prog="python -m gradroute.lm.user_corpus",
                                 description="write the tutorial's example corpus (docs/your_data.md)")
    ap.add_argument("command", choices=["example"])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--forget", type=float, default=0.02, help="fraction labelled forget")
    ap.add_argument("--topic", type=float, default=0.03, help="fraction of unlabelled forget-domain documents")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    f = write_example_corpus(a.folder, a.n, a.forget, a.topic, seed=a.seed)
    print(f"wrote {a.n} documents to {f}/part-*.jsonl")
