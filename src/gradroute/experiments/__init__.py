"""Experiments runnable as ``gradroute run <name>``.

Each experiment is one module exposing::

    DESCRIPTION: str
    def add_arguments(parser: argparse.ArgumentParser) -> None   # its own flags
    def run(args: argparse.Namespace) -> dict                    # writes args.out/metrics.json

The CLI adds ``--out`` (output folder) and ``--device`` (auto|cpu|cuda) to every experiment.
Modules are imported lazily so ``gradroute --help`` stays fast.
"""
from __future__ import annotations

import importlib

EXPERIMENTS = {
    # name -> module path
    "mnist": "gradroute.experiments.mnist",
    "gridworld": "gradroute.experiments.gridworld",
    "lm-unlearning": "gradroute.experiments.lm_unlearning",
    "steering": "gradroute.experiments.steering",
    "token-routing": "gradroute.experiments.token_routing",
    "modules": "gradroute.experiments.modules",
}


def get(name: str):
    if name not in EXPERIMENTS:
        import difflib

        close = difflib.get_close_matches(name, EXPERIMENTS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS)) or 'none'}.{hint}"
        )
    try:
        return importlib.import_module(EXPERIMENTS[name])
    except ModuleNotFoundError as e:
        if e.name in EXTRA:    # `pip install gradroute` installs torch only
            raise ModuleNotFoundError(f"experiment {name!r} needs {e.name}: pip install 'gradroute[experiments]'",
                                      name=e.name) from e
        raise


EXTRA = ("numpy", "scipy", "matplotlib", "tqdm")   # pyproject.toml's `experiments` extra
