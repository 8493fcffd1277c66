"""Resumable, parallel sweeps of independent runs (shared by the experiments).

A job is a tuple key (e.g. ``(method, p, seed)``) whose result is a JSON file that records the
``config`` it was made with. Finished jobs with the same config are loaded, not rerun; the rest
run in spawned worker processes (one thread each) or in this process.
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Hashable, Iterable

from .utils import progress, read_json


def split_finished(jobs: Iterable[Hashable], path_of: Callable[..., Path], config: dict,
                   verbose: bool = True) -> tuple[dict, list]:
    """``(results, todo)``: results of jobs whose file exists with the same ``config``; the rest."""
    jobs = list(jobs)
    results, todo = {}, []
    for key in jobs:
        path = path_of(*key)
        if path.exists():
            prev = read_json(path)
            if prev.get("config") == config:
                results[key] = prev
                continue
            if verbose:
                print(f"recomputing {path.name}: it was made with different settings")
        todo.append(key)
    if results and verbose:
        print(f"resuming: {len(results)} of {len(jobs)} runs already done")
    return results, todo


def _single_threaded(fn: Callable, key: tuple):
    import torch

    torch.set_num_threads(1)
    os.environ["GRADROUTE_QUIET"] = "1"
    return fn(*key)


def run_jobs(todo: list, fn: Callable, workers: int = 1, desc: str = "runs", show: bool = True) -> dict:
    """Run ``fn(*key)`` for every key of ``todo``; ``workers > 1`` uses that many spawned processes
    (``fn`` must then be picklable: a module-level function or a partial of one)."""
    results = {}
    bar = progress(total=len(todo), desc=desc, **({} if show else {"disable": True}))
    if workers <= 1 or len(todo) <= 1:
        for key in todo:
            results[key] = fn(*key)
            bar.update(1)
    else:
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=get_context("spawn")) as ex:
            futs = {ex.submit(functools.partial(_single_threaded, fn), key): key for key in todo}
            for f in as_completed(futs):
                results[futs[f]] = f.result()
                bar.update(1)
    bar.close()
    return results
