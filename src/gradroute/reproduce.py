"""``gradroute reproduce``: run every experiment and write one report, side by side with the paper.

Each experiment runs into ``OUT/<name>/`` with its own flags for the chosen profile, and
``OUT/<name>/done.json`` marks it finished (with wall time, command and machine), so an
interrupted run resumes where it stopped: finished experiments are not redone, and experiments
that resume their own sub-runs (MNIST settings, gridworld and LM sweeps) keep their partial work.

An experiment module takes part in the report by defining ``report(out_dir) -> dict`` with:

    title, claim (text), paper (text), verdict ("reproduced" | "partly" | "not"), detail (text),
    table ({"header": [...], "rows": [[...], ...]}), figures ([file names in out_dir])

``OUT/report.md`` and ``OUT/report.html`` (self-contained: figures embedded) are rewritten from
what is on disk after every run, so a partial report exists even after an interruption.
"""
from __future__ import annotations

import argparse
import base64
import html
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from . import experiments
from .utils import DataMissing, markdown_table, read_json, write_json

PROFILES = ("demo", "quick", "paper", "real")

# profile -> experiment -> (the experiment's own --profile, extra flags).
# quick: the whole reproduction in about 35 minutes on 2 CPU cores (2,110 s measured on 2026-11-30; target 45 min) (where an experiment's own
#   quick profile is a longer sweep, a subset is named here).
# demo: every experiment at toy length (about 5-10 minutes): the report's pipeline end to end,
#   numbers not meant to reproduce anything.
# paper: the paper's settings (hours; meant for a GPU).
# real: the real-text experiments (a real dictionary, GCIDE): lm-unlearning (47 minutes measured on 2 CPU
#   cores), then token-routing (10 minutes); skipped, saying how to get it, where the dictionary is absent.
PLAN: dict[str, dict[str, tuple[str, list[str]]]] = {
    "demo": {
        "mnist": ("quick", ["--setting", "1,8", "--epochs", "15", "--certificate-epochs", "5", "--threads", "1"]),
        "gridworld": ("quick", ["--oversight", "0.3", "--seeds", "0", "--updates", "40", "--eval-every", "20"]),
        "lm-unlearning": ("quick", ["--fractions", "0.5", "1.0", "--seeds", "0", "--steps", "60",
                                    "--attack-repeats", "1"]),
        "steering": ("quick", ["--steps", "100", "--hf-steps", "20", "--samples", "8", "--seeds", "0"]),
        "token-routing": ("quick", ["--steps", "60", "--attack-repeats", "1", "--seeds", "0"]),
        "modules": ("quick", ["--steps", "40", "--seeds", "0", "--no-select"]),
    },
    "quick": {
        "mnist": ("quick", ["--setting", "1,8", "--threads", "1"]),
        "gridworld": ("quick", ["--oversight", "0.3"]),
        "lm-unlearning": ("quick", ["--fractions", "0.1", "0.5", "--methods", "base", "filtering", "era",
                                    "param_routing", "rmu", "--seeds", "0", "1", "2"]),
        "steering": ("quick", []),
        "token-routing": ("quick", []),
        "modules": ("quick", []),
    },
    "paper": {
        "mnist": ("paper", ["--setting", "all", "--seeds", "20"]),
        "gridworld": ("paper", []),
        "lm-unlearning": ("paper", []),
        "steering": ("paper", []),
        "token-routing": ("paper", []),
        "modules": ("paper", []),
    },
    "real": {
        "lm-unlearning": ("real", ["--save-models"]),   # models + held-out documents for `gradroute eval`
        "token-routing": ("real", []),
    },
}


def available() -> list[str]:
    """Experiments of the plan that exist in this installation, in plan order."""
    return [n for n in PLAN["quick"] if n in experiments.EXPERIMENTS and _importable(n)]


def planned(profile: str) -> list[str]:
    """The available experiments that ``profile`` runs, in plan order."""
    return [n for n in available() if n in PLAN[profile]]


def _importable(name: str) -> bool:
    try:
        experiments.get(name)
        return True
    except ImportError:
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="quick",
                   help="demo (toy lengths, ~5-10 min), quick (default; ~35 min on 2 CPU cores) or paper "
                        "(paper settings; hours, meant for a GPU)")
    p.add_argument("--mnist-dir", type=Path, default=None,
                   help="MNIST IDX folder for the mnist experiment (e.g. the real 10k test set as held-out data)")
    p.add_argument("--gcide", type=Path, default=None,
                   help="profile real: the GCIDE entries file (default: $GRADROUTE_GCIDE, the cache, or the installed "
                        "dict-gcide; `gradroute data gcide -h`)")
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output folder (default: %(default)s)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these experiments")
    p.add_argument("--redo", nargs="+", metavar="NAME", default=[], help="run these again even if finished")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")


def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SystemExit(f"gradroute reproduce: cannot write to --out {out}: {e.strerror or e}")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def is_done(exp_dir: Path) -> bool:
    """Finished: done.json and metrics.json both present and valid. A corrupt file raises
    ValueError naming it (the caller reports it and leaves it untouched)."""
    done, metrics = exp_dir / "done.json", exp_dir / "metrics.json"
    if not done.exists():
        return False
    read_json(done)
    if not metrics.exists():
        return False
    read_json(metrics)
    return True


def _finished_with(exp_dir: Path, profile: str) -> bool:
    """True when exp_dir holds a finished result made with this profile (corrupt files: False here;
    they are reported when the experiment itself is selected)."""
    try:
        return is_done(exp_dir) and read_json(exp_dir / "done.json").get("profile") == profile
    except ValueError:
        return False


def run_one(name: str, profile: str, out: Path, device: str, mnist_dir: Path | None = None,
            gcide: Path | None = None) -> dict:
    module = experiments.get(name)
    exp_profile, flags = PLAN[profile][name]
    argv = ["--profile", exp_profile, *flags]
    if name == "mnist" and mnist_dir is not None:
        argv += ["--data-dir", str(mnist_dir)]
    if profile == "real" and gcide is not None:
        argv += ["--gcide", str(gcide)]
    parser = argparse.ArgumentParser(prog=f"gradroute run {name}")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="auto")
    module.add_arguments(parser)
    exp_dir = out / name
    args = parser.parse_args([*argv, "--out", str(exp_dir), "--device", device])
    command = shlex.join(["gradroute", "run", name, *argv, "--out", str(exp_dir), "--device", device])
    t0 = time.time()
    module.run(args)
    record = {"experiment": name, "profile": profile, "command": command,
              "wall_s": round(time.time() - t0, 1), "machine": machine(),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(exp_dir / "done.json", record)
    return record


def main(args: argparse.Namespace) -> int:
    if args.profile not in PROFILES:
        raise SystemExit(f"gradroute reproduce: unknown profile {args.profile!r}; choose from {', '.join(PROFILES)}")
    names = planned(args.profile)
    for n in (args.only or []) + args.redo:
        if n not in names:
            raise SystemExit(f"gradroute reproduce: unknown experiment {n!r}; available: {', '.join(names)}")
    if args.only:
        names = [n for n in names if n in args.only]
    _check_out(args.out)
    # the report covers what this call runs plus what an earlier call finished in the same folder
    # with the same profile, so running one experiment again does not drop the others from it
    shown = [n for n in planned(args.profile) if n in names or _finished_with(args.out / n, args.profile)]
    failures, skipped = {}, {}
    print(f"gradroute reproduce --profile {args.profile}: {', '.join(names)} -> {args.out}", flush=True)
    for i, name in enumerate(names, 1):
        exp_dir = args.out / name
        try:
            if name not in args.redo and is_done(exp_dir):
                print(f"[{i}/{len(names)}] {name}: already finished, skipped", flush=True)
                continue
        except ValueError as e:
            failures[name] = str(e)
            print(f"[{i}/{len(names)}] {name}: {e}", file=sys.stderr, flush=True)
            continue
        print(f"[{i}/{len(names)}] {name}: running", flush=True)
        try:
            rec = run_one(name, args.profile, args.out, args.device, getattr(args, "mnist_dir", None),
                          getattr(args, "gcide", None))
            print(f"[{i}/{len(names)}] {name}: done in {rec['wall_s']:.0f} s", flush=True)
        except DataMissing as e:           # optional data absent: skipped, with how to get it
            skipped[name] = str(e)
            write_json(exp_dir / "skipped.json", {"experiment": name, "profile": args.profile, "reason": str(e)})
            print(f"[{i}/{len(names)}] {name}: skipped: {e}", flush=True)
        except Exception as e:  # one experiment failing must not lose the others
            failures[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        write_report(args.out, shown, args.profile)
    paths = write_report(args.out, shown, args.profile)
    print(f"report: {paths[0]} and {paths[1]}")
    if failures:
        for n, msg in failures.items():
            print(f"FAILED {n}: {msg}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- report

def collect(out: Path, names: list[str]) -> list[dict]:
    sections = []
    for name in names:
        exp_dir = out / name
        sec = {"name": name, "status": "not run", "figures": []}
        try:
            if not is_done(exp_dir) and (exp_dir / "skipped.json").is_file():
                sec.update(status="skipped", detail=read_json(exp_dir / "skipped.json")["reason"])
            elif is_done(exp_dir):
                sec["status"] = "finished"
                sec["done"] = read_json(exp_dir / "done.json")
                module = experiments.get(name)
                if hasattr(module, "report"):
                    sec.update(module.report(exp_dir))
                else:
                    sec.update(title=name, verdict="not assessed",
                               detail="this experiment has no summary yet; see metrics.json",
                               figures=sorted(p.name for p in exp_dir.glob("*.png")))
        except ValueError as e:
            sec["status"], sec["detail"] = "corrupt result", str(e)
        sections.append(sec)
    return sections


def write_report(out: Path, names: list[str], profile: str) -> tuple[Path, Path]:
    sections = collect(out, names)
    md = [f"# gradroute: reproduction report ({profile} profile)\n",
          f"Machine: {machine()}. Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.\n",
          "| experiment | verdict | wall time |", "|---|---|---|"]
    for s in sections:
        wall = f"{s['done']['wall_s']:.0f} s" if "done" in s else "-"
        md.append(f"| {s.get('title', s['name'])} | {s.get('verdict', s['status'])} | {wall} |")
    walls = [s["done"]["wall_s"] for s in sections if "done" in s]
    if walls:
        md.append(f"\nTotal wall time of the {len(walls)} finished experiment(s): {sum(walls):.0f} s "
                  f"({sum(walls) / 60:.1f} min), each as measured when it ran.\n")
    for s in sections:
        md.append(f"\n## {s.get('title', s['name'])}\n")
        if s["status"] != "finished":
            md.append(f"**{s['status']}**. {s.get('detail', '')}\n")
            continue
        for key, label in (("claim", "Claim"), ("paper", "Paper")):
            if s.get(key):
                md.append(f"**{label}:** {s[key]}\n")
        md.append(f"**Verdict: {s.get('verdict')}.** {s.get('detail', '')}\n")
        if s.get("table"):
            md.append(markdown_table([str(h) for h in s["table"]["header"]], s["table"]["rows"]))
        for f in s.get("figures", []):
            md.append(f"![{f}]({s['name']}/{f})\n")
        d = s["done"]
        md.append(f"Command: `{d['command']}`; wall time {d['wall_s']:.0f} s; finished {d['finished']}.\n")
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))
    html_path = out / "report.html"
    html_path.write_text(_html(sections, profile, out))
    return md_path, html_path


_CSS = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .6em;text-align:right}
th{background:#eee}td.t{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}
.reproduced{color:#176317;font-weight:bold}.partly{color:#9a6700;font-weight:bold}.not{color:#b42318;font-weight:bold}
code{background:#f4f4f4;padding:.1em .3em}"""

# sets data-images="loaded/total" on <body> once the page has loaded (checked by the HTML test)
_IMG_CHECK = """<script>window.addEventListener('load',()=>{const im=[...document.images];
document.body.dataset.images=im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+im.length;});</script>"""


def _html(sections: list[dict], profile: str, out: Path) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>gradroute reproduction ({e(profile)})</title>"
             f"<style>{_CSS}</style>{_IMG_CHECK}</head><body>",
             f"<h1>gradroute: reproduction report ({e(profile)} profile)</h1>",
             f"<p>Machine: {e(machine())}. Generated {e(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>",
             "<table><tr><th>experiment</th><th>verdict</th><th>wall time</th></tr>"]
    for s in sections:
        v = s.get("verdict", s["status"])
        wall = f"{s['done']['wall_s']:.0f} s" if "done" in s else "-"
        parts.append(f"<tr><td>{e(s.get('title', s['name']))}</td><td class='{e(v.split()[0])}'>{e(v)}</td>"
                     f"<td>{wall}</td></tr>")
    parts.append("</table>")
    for s in sections:
        parts.append(f"<h2>{e(s.get('title', s['name']))}</h2>")
        if s["status"] != "finished":
            parts.append(f"<p><b>{e(s['status'])}</b>. {e(s.get('detail', ''))}</p>")
            continue
        for key, label in (("claim", "Claim"), ("paper", "Paper")):
            if s.get(key):
                parts.append(f"<p><b>{label}:</b> {e(s[key])}</p>")
        v = s.get("verdict", "")
        parts.append(f"<p><b>Verdict: <span class='{e(v.split()[0] if v else '')}'>{e(v)}</span>.</b> "
                     f"{e(s.get('detail', ''))}</p>")
        if s.get("table"):
            t = s["table"]
            fmt = lambda c: f"{c:.3f}" if isinstance(c, float) else str(c)
            parts.append("<table><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in t["header"]) + "</tr>")
            cell = lambda c: f"<td>{e(fmt(c))}</td>" if isinstance(c, (int, float)) else f"<td class='t'>{e(str(c))}</td>"
            parts += ["<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in t["rows"]]
            parts.append("</table>")
        for f in s.get("figures", []):
            data = base64.b64encode((out / s["name"] / f).read_bytes()).decode()
            parts.append(f"<figure><img alt='{e(f)}' src='data:image/png;base64,{data}'><figcaption>{e(f)}"
                         "</figcaption></figure>")
        d = s["done"]
        parts.append(f"<p>Command: <code>{e(d['command'])}</code>; wall time {d['wall_s']:.0f} s; "
                     f"finished {e(d['finished'])}; {e(d['machine'])}.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
