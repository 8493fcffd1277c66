"""Small shared helpers used by every experiment: seeds, devices, JSON, progress, stats, figures."""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch


class DataMissing(FileNotFoundError):
    """Optional data an experiment needs is not on this machine; the message says how to get it.
    ``gradroute reproduce`` reports such an experiment as skipped, not failed."""


def set_seed(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what :mod:`platform` knows), for benchmark records."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically (a crash never leaves a half-written file behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike) -> Any:
    """Read JSON; a corrupt file raises ValueError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to recompute") from e


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def progress(iterable: Iterable | None = None, **kwargs):
    """A tqdm progress bar (to stderr); GRADROUTE_QUIET=1 silences it.

    When stderr is not a terminal (output redirected to a file or a pipe) the bar stays
    readable there: transient inner bars (``leave=False``: a training run inside a sweep) are
    not drawn at all, and the others are redrawn at most every 30 s (``GRADROUTE_PROGRESS_S``),
    each update a plain line of fixed width."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", os.environ.get("GRADROUTE_QUIET") == "1")
    if _stderr_is_terminal():
        kwargs.setdefault("dynamic_ncols", True)
    else:
        if kwargs.get("leave") is False:
            kwargs["disable"] = True
        kwargs.setdefault("mininterval", float(os.environ.get("GRADROUTE_PROGRESS_S", "30")))
        kwargs.setdefault("maxinterval", kwargs["mininterval"])
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, **kwargs)


def _stderr_is_terminal() -> bool:
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# two-sided 95% Student-t quantiles for small samples (df = n - 1)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def mean_ci(values: Sequence[float]) -> dict:
    """Mean and 95% confidence interval of the mean (Student t); n=1 gives a zero-width interval."""
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        raise ValueError("mean_ci() of an empty sequence")
    m = float(v.mean())
    if v.size == 1:
        return {"mean": m, "lo": m, "hi": m, "n": 1}
    df = v.size - 1
    t = _T95.get(df) or _T95[max(k for k in _T95 if k <= df)]
    half = t * float(v.std(ddof=1)) / math.sqrt(v.size)
    return {"mean": m, "lo": m - half, "hi": m + half, "n": int(v.size)}


def format_ci(stats: dict, digits: int = 3) -> str:
    """A :func:`mean_ci` result as text: ``"1.234 ± 0.056"`` (mean ± 95% CI half-width), or just
    ``"1.234"`` when it comes from one value (no interval exists; say ``n=1`` next to it)."""
    m = stats["mean"]
    if stats.get("n", 1) <= 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {stats['hi'] - m:.{digits}f}"


def intervals_separate(a: dict, b: dict) -> bool | None:
    """Whether two :func:`mean_ci` intervals do not overlap (None when either comes from one
    value: there is no interval to compare)."""
    if a.get("n", 1) < 2 or b.get("n", 1) < 2:
        return None
    return a["lo"] > b["hi"] or b["lo"] > a["hi"]


def plt():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def savefig(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt().close(fig)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are shown with 3 decimals."""
    def fmt(x):
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def claim_verdict(checks: Sequence[bool]) -> str:
    """A report verdict from claim checks: all hold -> 'reproduced', at least half -> 'partly',
    fewer (or no checks at all) -> 'not'."""
    checks = list(checks)
    held = sum(bool(c) for c in checks)
    if checks and held == len(checks):
        return "reproduced"
    return "partly" if checks and 2 * held >= len(checks) else "not"


def claim_summary(claims: dict, key: str = "holds", what: str = "checks hold") -> tuple[str, str]:
    """``(verdict, sentence)`` for a report section from ``{claim: {key: bool, ...}}``: the
    :func:`claim_verdict` and e.g. "2 of 3 checks hold (a, b)"."""
    held = [name for name, c in claims.items() if c[key]]
    return claim_verdict([c[key] for c in claims.values()]), \
        f"{len(held)} of {len(claims)} {what} ({', '.join(held) or 'none'})"
