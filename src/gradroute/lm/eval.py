"""``gradroute eval``: EleutherAI's lm-evaluation-harness (``lm_eval``) on saved models.

    gradroute eval runs/lm/models/base runs/lm/models/era --tasks gradroute_unlearning gradroute_headword

runs ``lm_eval.simple_evaluate`` (model ``hf``) on each model folder written by
``gradroute run lm-unlearning ... --save-models`` (or any Hugging Face causal LM folder with
its tokenizer), prints lm-eval's table per model and a side-by-side of each task's main
metric, and writes the results to ``--out`` (JSON).

Besides lm-eval's own tasks and the user's (``--include-path DIR`` of task YAMLs), local tasks
are built from a run's held-out documents (``--data DIR``, by default ``MODEL_DIR/../../eval_data``:
``forget.jsonl``, ``retain.jsonl``, optionally ``topic.jsonl``, one JSON object per line with
``text`` and, for a dictionary, ``headword``):

* ``gradroute_forget_ppl`` / ``gradroute_retain_ppl`` / ``gradroute_topic_ppl``: the perplexity of
  each document (lm-eval's ``loglikelihood_rolling``: word and byte perplexity, bits per byte),
  grouped as ``gradroute_unlearning`` (topic only when ``topic.jsonl`` exists). Unlearning
  should raise the forget numbers and leave the retain numbers alone.
* ``gradroute_headword_mc`` / ``gradroute_headword_mc_retain`` (/ ``_topic``): "which headword
  does this definition describe?", four choices, built from the entries that have a headword
  (:func:`build_headword_mc`), grouped as ``gradroute_headword``: the forget-domain question set
  against a retain-domain one, as WMDP is reported next to MMLU. Scored in the dictionary's own
  order: the definition's log-likelihood after each candidate headword (lm-eval's
  multiple-input form, as Winogrande), so a small model trained on entries can answer.
* ``gradroute_headword_question`` / ``_retain`` (/ ``_topic``), group
  ``gradroute_headword_questions``: the same items as a question (the definition, then
  "Which word does this define? Answer:", each headword scored as the answer), for models
  that can follow such a prompt.

The task YAMLs and the multiple-choice data are written into a temporary folder at run time
and point at the files under ``--data``; nothing is downloaded for them. lm-eval is an optional
dependency: ``pip install "gradroute[eval]"``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .sources import CorpusError, iter_json_lines

OPTIONAL_SPLITS = ("topic",)     # left out of the groups when the run wrote no topic.jsonl
PPL_TASKS = {"gradroute_forget_ppl": "forget", "gradroute_retain_ppl": "retain", "gradroute_topic_ppl": "topic"}
MC_TASKS = {"gradroute_headword_mc": "forget", "gradroute_headword_mc_retain": "retain",
            "gradroute_headword_mc_topic": "topic"}
QUESTION_TASKS = {"gradroute_headword_question": "forget", "gradroute_headword_question_retain": "retain",
                  "gradroute_headword_question_topic": "topic"}
LOCAL_TASKS = {**PPL_TASKS, **MC_TASKS, **QUESTION_TASKS}
LOCAL_GROUPS = {"gradroute_unlearning": list(PPL_TASKS), "gradroute_headword": list(MC_TASKS),
                "gradroute_headword_questions": list(QUESTION_TASKS)}
MC_SEED = 0
MC_CHOICES = 4
MC_MAX_CHARS = 120     # headword + definition fit a 96-token context with a 1,024-token BPE
MAIN_METRICS = ("acc", "exact_match", "bits_per_byte", "word_perplexity")
MASK = "___"


class EvalError(ValueError):
    """A bad input to ``gradroute eval``: a missing model or data folder, an unknown task."""


class LmEvalMissing(ImportError):
    """lm-eval is not installed (the ``gradroute[eval]`` extra)."""


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LmEvalMissing('gradroute eval needs EleutherAI\'s lm-evaluation-harness: pip install "gradroute[eval]" '
                          '(or pip install lm-eval)') from None
    return lm_eval


# ------------------------------------------------------------------------------------------
# the data
# ------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file (``.gz`` too), each with a string ``text``."""
    out = []
    try:
        for where, d in iter_json_lines(path):
            if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                raise EvalError(f"{where}: expected an object with a string 'text' field")
            out.append(d)
    except CorpusError as e:
        raise EvalError(str(e)) from None
    if not out:
        raise EvalError(f"{path} has no documents")
    return out


# "Medicine \Med"i*cine\, n. ...": the entry's word and its pronunciation between backslashes,
# maybe a respelling in parentheses, maybe more spellings the same way ("Squinance \..\ (..), Squinancy \..\")
_GCIDE_FORM = re.compile(r"\s*([^\\\n]{1,80}?)\s*\\[^\\\n]{0,120}\\\s*(?:\([^()\n]{0,80}\))?\s*,?\s*")
_LEADING_PUNCT = re.compile(r"^[\s,;:.\-\u2013\u2014]+")


def split_entry(text: str, headword: str, etymology: bool = True) -> tuple[str, str]:
    """``(answer, definition)`` of one dictionary entry.

    A GCIDE entry opens with its word and the pronunciation between backslashes
    (``Medicine \\Med"i*cine\\, n. ...``), sometimes with a respelling in parentheses and more
    spellings (``Squinance \\..\\ (..), Squinancy \\..\\ (..), n.``): the first word is the answer
    (it can differ from the index ``headword``, e.g. the entry ``Boil`` listed under
    ``A blind boil``) and all these forms are cut off. Other texts: the answer is ``headword``,
    cut off when the text starts with it. ``etymology=False`` drops the bracketed etymology near
    the start (it spells the word's roots; without it the item asks about the sense alone). In
    what remains, every word that
    starts with the answer, the headword or another opening spelling (``Boil``, ``boils``,
    ``{Delhi boil}``) becomes ``___``, case-insensitively."""
    headword = headword.strip()
    forms, pos = [], 0
    while len(forms) < 8:
        m = _GCIDE_FORM.match(text, pos)
        if not m:
            break
        forms.append(m.group(1).strip())
        pos = m.end()
    if forms:
        answer, rest = forms[0], text[pos:]
    else:
        answer, rest = headword, text.strip()
        if rest.lower().startswith(headword.lower()):
            rest = _LEADING_PUNCT.sub("", rest[len(headword):])
    if not etymology:
        rest = _drop_etymology(rest)
    for word in sorted({answer, headword, *forms}, key=len, reverse=True):
        if word:
            rest = re.sub(r"(?<!\w)" + re.escape(word) + r"\w*", MASK, rest, flags=re.IGNORECASE)
    return answer, rest.strip()


def _drop_etymology(rest: str, within: int = 60) -> str:
    """Without the first bracketed etymology (``[L. medicina, fr. medicus.]``, brackets may
    nest: ``[Hemi- + an[ae]sthesia.]``) that opens in the first ``within`` characters; GCIDE's
    short letter marks (``[ae]``, ``[=o]``) are not etymologies."""
    i = rest.find("[")
    while 0 <= i < within:
        depth = 0
        for j in range(i, len(rest)):
            depth += {"[": 1, "]": -1}.get(rest[j], 0)
            if depth == 0:
                break
        else:
            return rest
        if j - i > 5:
            return (rest[:i].rstrip() + " " + rest[j + 1:].lstrip()).strip()
        i = rest.find("[", j + 1)
    return rest


def _shorten(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut + " ..."


def build_headword_mc(records: list[dict], seed: int = MC_SEED, n_choices: int = MC_CHOICES,
                      max_chars: int = MC_MAX_CHARS, etymology: bool = True, where: str = "the data") -> list[dict]:
    """Multiple-choice items "which headword does this definition describe?" from the
    ``records`` with a non-empty ``headword``, in file order: the definition
    (:func:`split_entry`, cut to ``max_chars`` at a word boundary), the true answer and
    ``n_choices - 1`` other answers of the same records drawn with ``random.Random(seed)``
    (distinct case-insensitively), the true answer at a position drawn from the same generator.
    An entry listed under several headwords (same answer and definition) gives one item;
    definitions under 10 characters are skipped. Each item: ``definition``, ``choices``,
    ``label`` (the index of the true answer), ``headword``."""
    items, seen = [], set()
    for d in records:
        hw = d.get("headword")
        if not isinstance(hw, str) or not hw.strip():
            continue
        answer, definition = split_entry(d["text"], hw, etymology)
        definition = _shorten(definition, max_chars)
        key = (answer.lower(), definition)
        if len(definition) < 10 or key in seen:
            continue
        seen.add(key)
        items.append({"definition": definition, "headword": answer})
    pool = sorted({it["headword"].lower(): it["headword"] for it in items}.values())
    if len(pool) < n_choices:
        raise EvalError(f"{where}: a {n_choices}-choice headword task needs at least {n_choices} distinct headwords, "
                        f"found {len(pool)} (records with a 'headword' field: "
                        f"{sum(isinstance(d.get('headword'), str) and bool(d['headword'].strip()) for d in records)})")
    rng = random.Random(seed)
    for it in items:
        others: list[str] = []
        while len(others) < n_choices - 1:
            w = pool[rng.randrange(len(pool))]
            if w.lower() != it["headword"].lower() and w.lower() not in {o.lower() for o in others}:
                others.append(w)
        label = rng.randrange(n_choices)
        it["choices"] = others[:label] + [it["headword"]] + others[label:]
        it["label"] = label
    return items


# ------------------------------------------------------------------------------------------
# the task folder
# ------------------------------------------------------------------------------------------
def _json_task(name: str, data_file: Path, cache: Path, output_type: str, **fields) -> dict:
    """An lm-eval task config reading the local JSONL ``data_file`` (its one split is "train")."""
    return {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": str(data_file), "cache_dir": str(cache)},
            "output_type": output_type, "test_split": "train", **fields, "metadata": {"version": 1.0}}


def _ppl_config(name: str, data_file: Path, cache: Path) -> dict:
    return _json_task(name, data_file, cache, "loglikelihood_rolling", doc_to_text="", doc_to_target="text",
                      metric_list=[{"metric": m, "aggregation": a, "higher_is_better": False}
                                   for m, a in (("word_perplexity", "weighted_perplexity"),
                                                ("byte_perplexity", "weighted_perplexity"),
                                                ("bits_per_byte", "bits_per_byte"))])


def _mc_config(name: str, data_file: Path, cache: Path) -> dict:
    """Headword first: each choice is a context, the definition the shared continuation; doc_to_text
    naming an int column (the true choice) is lm-eval's multiple-input form."""
    return _json_task(name, data_file, cache, "multiple_choice", doc_to_text="label", doc_to_choice="choices",
                      doc_to_target="definition",
                      metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])


def _question_config(name: str, data_file: Path, cache: Path) -> dict:
    return _json_task(name, data_file, cache, "multiple_choice",
                      doc_to_text="Definition: {{definition}}\nWhich word does this define? Answer:",
                      doc_to_choice="choices", doc_to_target="label",
                      metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                   for m in ("acc", "acc_norm")])


def _default_data(model_dirs: list[Path]) -> Path:
    return Path(model_dirs[0]).resolve().parent.parent / "eval_data"


def resolve_data_dir(data: Path | None, model_dirs: list[Path]) -> tuple[Path, bool]:
    """``(folder, given)``: ``--data`` when given (it must exist), else ``MODEL_DIR/../../eval_data``."""
    if data is not None:
        data = Path(data)
        if not data.is_dir():
            raise EvalError(f"--data {data}: no such folder (expected forget.jsonl, retain.jsonl[, topic.jsonl] "
                            "as written by gradroute run lm-unlearning --save-models)")
        return data, True
    return _default_data(model_dirs), False


def expand_local(names: list[str]) -> list[str]:
    """The local task names among ``names``, groups expanded (in order, without repeats)."""
    out: list[str] = []
    for n in names:
        for t in LOCAL_GROUPS.get(n, [n] if n in LOCAL_TASKS else []):
            if t not in out:
                out.append(t)
    return out


def write_local_tasks(names: list[str], data: Path, folder: Path, data_given: bool = True,
                      mc_chars: int = MC_MAX_CHARS, etymology: bool = True) -> list[str]:
    """Write the YAMLs (and the multiple-choice data, ``headword_<split>.jsonl``) of the local
    tasks and groups requested in ``names`` into ``folder``; returns the task names written. A
    requested group leaves out its optional (topic) tasks when their file is absent; a requested
    task needs its file."""
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "hf_datasets_cache"
    import yaml

    explicit = {n for n in names if n in LOCAL_TASKS}
    wanted = [t for t in expand_local(names)
              if t in explicit or LOCAL_TASKS[t] not in OPTIONAL_SPLITS or (data / f"{LOCAL_TASKS[t]}.jsonl").is_file()]
    for t in wanted:
        src = data / f"{LOCAL_TASKS[t]}.jsonl"
        if not src.is_file():
            how = "" if data_given else " (the default, MODEL_DIR/../../eval_data; pass --data DIR)"
            raise EvalError(f"task {t} reads {src}, which does not exist{how}")
        if t in PPL_TASKS:
            read_jsonl(src)                     # a clear error now rather than inside lm-eval
            cfg = _ppl_config(t, src.resolve(), cache)
        else:
            mc_file = folder / f"headword_{LOCAL_TASKS[t]}.jsonl"
            if not mc_file.is_file():
                items = build_headword_mc(read_jsonl(src), max_chars=mc_chars, etymology=etymology, where=str(src))
                with open(mc_file, "w", encoding="utf-8") as f:
                    for it in items:
                        f.write(json.dumps(it, ensure_ascii=False) + "\n")
            cfg = (_mc_config if t in MC_TASKS else _question_config)(t, mc_file.resolve(), cache)
        (folder / f"{t}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    for g, members in LOCAL_GROUPS.items():
        if g in names:
            (folder / f"{g}.yaml").write_text(yaml.safe_dump(
                {"group": g, "task": [t for t in members if t in wanted], "metadata": {"version": 1.0}},
                sort_keys=False), encoding="utf-8")
    return wanted


# ------------------------------------------------------------------------------------------
# running lm-eval
# ------------------------------------------------------------------------------------------
def check_model_dir(folder: Path) -> None:
    from ..hf import has_tokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"no model folder at {folder} (expected a save_pretrained folder, e.g. OUT/models/<run>/ "
                        "from gradroute run lm-unlearning --save-models)")
    if not (folder / "config.json").is_file():
        raise EvalError(f"{folder} has no config.json: not a Hugging Face model folder")
    if not has_tokenizer(folder):
        raise EvalError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json): lm-eval needs the "
                        "model's own tokenizer saved next to it")


def _task_manager(include: list[Path], names: list[str], user_paths: bool = False):
    """lm-eval's TaskManager over ``include``; its own ~14,000 built-in tasks (a 10 s scan) are
    indexed only when a requested name is not found in ``include``."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(p) for p in include], include_defaults=False)
    missing = [n for n in names if n not in tm.all_tasks]
    if not missing:
        return tm
    missing = [n for n in missing if n.startswith("gradroute_")]     # never among lm-eval's own tasks
    if not missing:
        tm = TaskManager(include_path=[str(p) for p in include], include_defaults=True)
        missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        import difflib

        hints = []
        for n in missing:
            close = difflib.get_close_matches(n, list(LOCAL_TASKS) + list(LOCAL_GROUPS) + tm.all_tasks, n=3)
            hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise EvalError(f"unknown task {', '.join(hints)}: not a gradroute local task "
                        f"({', '.join(list(LOCAL_GROUPS) + list(LOCAL_TASKS))}), not in --include-path"
                        + (" (lm-eval skips a YAML it cannot read)" if user_paths else "")
                        + ", and not among lm-eval's own tasks and groups")
    return tm


def _context_length(model_dir: Path) -> int | None:
    """The model's context in tokens, read from its config as lm-eval reads it."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for k in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return None


def check_mc_fits(model_dir: Path, mc_files: list[Path], mc_chars: int) -> None:
    """Raise :class:`EvalError` when a headword item (a choice, then the definition) is longer
    than the model's context: lm-eval would cut the context, the headword, from the left."""
    n_ctx = _context_length(model_dir)
    if n_ctx is None or not mc_files:
        return
    from ..hf import require_transformers

    tok = require_transformers().AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    worst, where = 0, None
    for f in mc_files:
        for line in f.read_text(encoding="utf-8").splitlines():
            it = json.loads(line)
            n = len(tok(" " + it["definition"])["input_ids"]) + max(len(tok(c)["input_ids"]) for c in it["choices"])
            if n > worst:
                worst, where = n, it["headword"]
    if worst > n_ctx:
        raise EvalError(f"{model_dir}: the headword item for {where!r} is {worst} tokens (a choice and the definition) "
                        f"but the model's context is {n_ctx}; lower --mc-chars (now {mc_chars})")


def main_metric(task_results: dict) -> tuple[str, float] | None:
    """The metric a side-by-side shows for one task's results: acc, exact_match,
    bits_per_byte or word_perplexity, the first found, else the first number."""
    found = {}
    for k, v in task_results.items():
        name, _, _filt = k.partition(",")
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not name.endswith("_stderr") and name != "alias":
            found.setdefault(name, float(v))
    for m in MAIN_METRICS:
        if m in found:
            return m, found[m]
    return next(iter(found.items()), None)


def _labels(model_dirs: list[Path]) -> list[str]:
    labels = [Path(m).name for m in model_dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{Path(m).resolve().parent.name}/{Path(m).name}" for m in model_dirs]
    if len(set(labels)) < len(labels):
        labels = [str(m) for m in model_dirs]
    return labels


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"


def side_by_side(results: dict[str, dict]) -> str:
    """A markdown table: one row per task (its main metric), one column per model."""
    labels = list(results)
    rows, tasks = [], []
    for r in results.values():
        for t in r.get("results", {}):
            if t not in tasks and t not in r.get("groups", {}) and t not in r.get("group_subtasks", {}):
                tasks.append(t)
    for t in tasks:
        metric = None
        cells = []
        for lab in labels:
            mm = main_metric(results[lab].get("results", {}).get(t, {}))
            if mm is not None and metric is None:
                metric = mm[0]
            cells.append("" if mm is None or mm[0] != metric else _fmt(mm[1]))
        rows.append([t, metric or "", *cells])
    head = ["task", "metric", *labels]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def evaluate_models(model_dirs: list[Path], tasks: list[str], data: Path | None = None,
                    include_path: list[Path] | None = None, limit: float | None = None, batch_size: int = 8,
                    device: str = "auto", out: Path | None = None, mc_chars: int = MC_MAX_CHARS,
                    etymology: bool = True,
                    echo: Callable[[str], None] = print) -> dict:
    """Run lm-eval's ``tasks`` on each model folder; print the tables; write ``out`` (JSON).
    Returns ``{model label: lm-eval's results dict (without per-sample logs)}``."""
    model_dirs = [Path(m) for m in model_dirs]
    if not model_dirs:
        raise EvalError("no model folder given")
    if not tasks:
        raise EvalError("no task given (--tasks)")
    for m in model_dirs:
        check_model_dir(m)
    include = [Path(p) for p in (include_path or [])]
    for p in include:
        if not p.is_dir():
            raise EvalError(f"--include-path {p}: no such folder (give the folder that holds your task YAMLs)")
    data_dir, given = resolve_data_dir(data, model_dirs)
    _lm_eval()
    import lm_eval
    from lm_eval.utils import make_table

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="gradroute-eval-"))
    try:
        local = (write_local_tasks(tasks, data_dir, work / "tasks", data_given=given, mc_chars=mc_chars,
                                   etymology=etymology) if expand_local(tasks) else [])
        mc_files = sorted({work / "tasks" / f"headword_{LOCAL_TASKS[t]}.jsonl" for t in local if t in MC_TASKS})
        for m in model_dirs:
            check_mc_fits(m, mc_files, mc_chars)
        tm = _task_manager(([work / "tasks"] if local else []) + include, list(tasks), user_paths=bool(include))
        results: dict[str, dict] = {}
        for label, m in zip(_labels(model_dirs), model_dirs):
            r = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(m.resolve()), "dtype": "float32"},
                                        tasks=list(tasks), task_manager=tm, device=device, batch_size=batch_size,
                                        limit=limit, log_samples=False)
            if r is None:      # lm-eval returns None on ranks other than 0
                continue
            r.pop("samples", None)
            results[label] = r
            echo(f"\n## {label} ({m})\n")
            echo(make_table(r))
            if r.get("groups"):
                echo(make_table(r, "groups"))
        if len(results) > 1:
            echo("\nMain metric per task, side by side:\n")
            echo(side_by_side(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"models": {lab: str(m) for lab, m in zip(_labels(model_dirs), model_dirs)},
                   "tasks": list(tasks), "data": str(data_dir) if local else None, "results": results}
        out.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
        echo(f"\nwrote {out}")
    return results


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dirs", nargs="+", type=Path, metavar="MODEL_DIR",
                   help="Hugging Face model folders with their tokenizer (OUT/models/<run>/ from --save-models)")
    p.add_argument("--tasks", nargs="+", required=True, metavar="T",
                   help="lm-eval task or group names: gradroute_unlearning (forget / retain perplexity), "
                        "gradroute_headword (the headword multiple choice, forget and retain), "
                        "gradroute_headword_questions (the same as a question), their tasks "
                        f"({', '.join(LOCAL_TASKS)}), any lm-eval task, or one from --include-path")
    p.add_argument("--data", type=Path, default=None,
                   help="folder of forget.jsonl, retain.jsonl[, topic.jsonl] for the local tasks "
                        "(default: MODEL_DIR/../../eval_data)")
    p.add_argument("--include-path", type=Path, action="append", default=None, metavar="DIR",
                   help="a folder of your own lm-eval task YAMLs (searched recursively); repeatable")
    p.add_argument("--limit", type=float, default=None, help="at most N documents per task (a fraction when < 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--mc-chars", type=int, default=MC_MAX_CHARS,
                   help="cut the headword tasks' definitions to this many characters (default: %(default)s)")
    p.add_argument("--mc-no-etymology", action="store_true",
                   help="drop the bracketed etymology from the headword tasks' definitions (the sense alone)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("runs") / "eval" / "results.json",
                   help="results JSON (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    evaluate_models(args.model_dirs, args.tasks, data=args.data, include_path=args.include_path, limit=limit,
                    batch_size=args.batch_size, device=args.device, out=args.out, mc_chars=args.mc_chars,
                    etymology=not args.mc_no_etymology)
    return 0
