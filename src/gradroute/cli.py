"""Command line: ``gradroute run <experiment> [flags]``, ``gradroute reproduce``, ``gradroute demo``,
``gradroute eval MODEL_DIR ... --tasks ...``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import experiments


def _add_common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--out", type=Path, default=Path("runs") / name,
                   help="output folder for metrics.json and figures (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="gradroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run_p = sub.add_parser("run", help="run one experiment", add_help=False)
    run_p.add_argument("experiment", nargs="?", help="one of: " + ", ".join(sorted(experiments.EXPERIMENTS)))
    run_p.add_argument("-h", "--help", action="store_true")

    demo_p = sub.add_parser("demo", help="a short routed-training demo that prints what it shows")
    _add_common(demo_p, "demo")
    demo_p.add_argument("--steps", type=int, default=300)
    demo_p.add_argument("--seed", type=int, default=0)

    data_p = sub.add_parser("data", help="prepare a corpus: `gradroute data gcide --out FILE` (see --help)",
                            add_help=False)
    data_p.add_argument("dataset", nargs="?", choices=["gcide"])

    rep_p = sub.add_parser("reproduce", help="run every experiment and write report.md / report.html")
    from . import reproduce

    reproduce.add_arguments(rep_p)

    from .lm import eval as lm_eval_cmd

    eval_p = sub.add_parser("eval", help="lm-evaluation-harness tasks on saved models (docs/eval.md)")
    lm_eval_cmd.add_arguments(eval_p)

    args, rest = parser.parse_known_args(argv)
    if args.command == "eval":
        try:
            return lm_eval_cmd.main(eval_p.parse_args(argv[1:]))
        except (lm_eval_cmd.EvalError, lm_eval_cmd.LmEvalMissing) as e:
            print(f"gradroute eval: error: {e}", file=sys.stderr)
            return 2
    if args.command == "reproduce":
        return reproduce.main(rep_p.parse_args(argv[1:]))
    if args.command == "data":
        if args.dataset is None:
            parser.parse_args(["data", "-h"]) if rest else print("datasets: gcide (`gradroute data gcide -h`)")
            return 0 if rest else 2
        from .lm import gcide

        return gcide.main(rest)
    if args.command == "demo":
        args = demo_p.parse_args(argv[1:])
        from .demo import run as run_demo

        run_demo(args)
        return 0

    if args.command == "run":
        if args.experiment is None:
            run_p.print_help()
            print("\nexperiments: " + ", ".join(sorted(experiments.EXPERIMENTS)))
            return 0 if args.help else 2
        try:
            module = experiments.get(args.experiment)
        except ValueError as e:
            parser.error(str(e))
        exp_p = argparse.ArgumentParser(prog=f"gradroute run {args.experiment}",
                                        description=getattr(module, "DESCRIPTION", None))
        _add_common(exp_p, args.experiment)
        module.add_arguments(exp_p)
        exp_args = exp_p.parse_args(rest + (["--help"] if args.help else []))
        module.run(exp_args)
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
