"""THE training loop, shared by every method and by the retraining attack.

AdamW (decay on matrices only), linear warmup then cosine to ``min_lr``, gradient clipping, an
evaluation callback every ``eval_every`` steps, a tqdm bar, a JSONL log, a checkpoint every
``ckpt_every`` steps and exact resume. Methods customise one thing: ``loss_fn(model, batch)``,
which returns the *sum* of its per-token losses over the batch's rows and may enter a routing
context around the forward pass (backward runs after it returns; routing contexts allow that).
The loop divides by the batch's global target-token count, so results do not depend on how
rows are split over processes.

Under ``torchrun --nproc_per_node=N`` (``torch.distributed`` initialised, see
:func:`init_distributed`) each process takes a contiguous chunk of every batch and the model is
wrapped in DistributedDataParallel: same results as one process up to float rounding. Only rank
0 writes files; evaluation runs on every rank (it is deterministic and the same everywhere).

With ``TrainConfig.fsdp`` the loop shards instead: it trains a copy of the model sharded with
FSDP2 (``fully_shard`` on each block of the largest ``nn.ModuleList``, then on the root;
parameters, gradients and AdamW moments 1/N per rank) and, at the end, loads the gathered weights
back into ``model``, which is never sharded (so ablation, surgery, evaluation and saving after
training work as in one process). ``loss_fn`` and ``eval_fn`` get the sharded copy: routing must
act on the module they are given (``route_units(net, ...)``; a ``ParamRouter`` built on ``net``,
not on ``model``: one built on ``model`` would not route the copy).

The batch at step ``s`` must be a pure function of ``s`` (see ``data.BatchOrder``) and the
checkpoint holds the model, the optimizer and the RNG state, so an interrupted run resumed with
``resume=True`` ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..utils import progress
from .data import IGNORE, Batch


@dataclass
class TrainConfig:
    steps: int
    lr: float = 5e-4
    min_lr: float | None = None          # cosine floor; default lr / 10 (the paper: 5e-4 -> 5e-5)
    warmup: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    eval_every: int = 0                  # 0: evaluate only before and after training
    ckpt_every: int = 0                  # 0: no checkpoints
    select_best: str | None = None       # keep the weights with the lowest eval metric of this name
    fsdp: bool = False                   # under torchrun: shard with FSDP2 instead of DDP (module docstring)
    desc: str = "train"

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup < 0 or self.eval_every < 0 or self.ckpt_every < 0:
            raise ValueError("warmup, eval_every and ckpt_every must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        self.betas = tuple(self.betas)

    def lr_at(self, step: int) -> float:
        """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``min_lr``."""
        lo = self.lr / 10 if self.min_lr is None else self.min_lr
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return lo + 0.5 * (self.lr - lo) * (1 + math.cos(math.pi * t))


# ------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``(B, T, vocab)`` of ``gradroute.models.GPT`` or a Hugging Face causal LM."""
    return model(x)[0] if _is_our_gpt(model) else model(input_ids=x).logits


def token_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy ``(B, T)`` (0 at ignored targets)."""
    if _is_our_gpt(model):
        return model(x, y, reduction="none", only_targets=True)[1]
    return F.cross_entropy(logits(model, x).flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                           reduction="none").view(y.shape)


def _is_our_gpt(model: nn.Module) -> bool:
    from ..adapters import unwrap
    from ..models.gpt import GPT

    return isinstance(unwrap(model), GPT)


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The default ``loss_fn``: summed next-token cross-entropy."""
    return token_losses(model, batch.x, batch.y).sum()


# ------------------------------------------------------------------------------------------
# distributed helpers
# ------------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """Initialise ``torch.distributed`` from torchrun's environment (gloo on CPU, nccl on GPU)
    when ``WORLD_SIZE`` > 1 and not yet initialised. Returns ``(rank, world_size)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world
    return 0, 1


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------
def make_optimizer(params: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in params if p.ndim >= 2]
    other = [p for n, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    # foreach: one multi-tensor update instead of a Python loop over parameters (the CPU default
    # is the loop); same arithmetic
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, foreach=True)


def shard_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: the children of the model's largest ``nn.ModuleList``
    by parameter count (the transformer blocks of our GPT, Hugging Face GPT-2, Llama, ...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"fsdp: {type(model).__name__} has no nn.ModuleList of blocks to shard one by one")
    return list(max(lists, key=lambda l: sum(p.numel() for p in l.parameters())))


def sharded_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` with rank 0's weights (as DDP broadcasts them), sharded with FSDP2 over
    every process: ``fully_shard`` per block (:func:`shard_blocks`), then on the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    net = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            dist.broadcast(t, 0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in shard_blocks(net):
        fully_shard(block, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def full_state(model: nn.Module) -> dict:
    """A copy of ``model``'s whole state dict; of a model sharded with FSDP2 gathered on every rank
    (a collective: call it on every rank)."""
    from ..adapters import is_sharded

    if not any(is_sharded(p) for p in model.parameters()):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(model: nn.Module, batch_at: Callable[[int], Batch], cfg: TrainConfig, *,
          loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = lm_loss,
          eval_fn: Callable[[nn.Module], dict] | None = None,
          params: Callable[[str, nn.Parameter], bool] | None = None,
          out_dir: str | os.PathLike | None = None, resume: bool = False,
          on_step: Callable[[int, dict], None] | None = None,
          distributed: bool | None = None, device: torch.device | str | None = None) -> dict:
    """Train ``model`` in place for ``cfg.steps`` steps; returns ``{"history", "evals", ...}``.

    ``batch_at(step)``: the global batch of a step. ``loss_fn``: summed loss of a batch (see the
    module docstring). ``eval_fn(model) -> {name: value}`` runs before training, every
    ``eval_every`` steps and at the end. ``params(name, p)`` selects the trainable parameters
    (default: all that require grad). ``out_dir``: where ``log.jsonl`` and ``ckpt.pt`` go;
    ``resume=True`` continues from ``ckpt.pt`` there. ``on_step(step, record)`` is called after
    every step (tests use it to interrupt a run). ``distributed``: use DDP (FSDP2 with
    ``cfg.fsdp``) when ``torch.distributed`` is initialised (default) or never (``False``).
    """
    rank, world = rank_world() if distributed in (None, True) else (0, 1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (params is None or params(n, p))]
    if not named:
        raise ValueError("no trainable parameters selected")
    keep = {id(p) for _, p in named}
    frozen = [p for p in model.parameters() if id(p) not in keep and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    sharded = cfg.fsdp and world > 1
    net = model
    if sharded:     # the same parameter names on the copy; frozen ones were frozen before copying
        net = sharded_copy(model, device)
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    opt = make_optimizer(named, cfg)
    live = net if sharded else model       # what is evaluated, checkpointed and kept as the best
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # a method can leave parameters out of a rank's graph (DEMix: the expert of a label absent
        # from this rank's shard); let DDP reduce them as zeros. (Parameter routing keeps every
        # parameter in the graph, so it would not need this.)
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    out = Path(out_dir) if out_dir is not None else None
    ckpt = out / "ckpt.pt" if out is not None else None
    log_path = out / "log.jsonl" if out is not None else None
    start, history, evals, best = 0, [], [], None
    if resume and ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["steps"] != cfg.steps:
            raise ValueError(f"checkpoint {ckpt} was made for a {state['steps']}-step run, this one has {cfg.steps}")
        if state.get("fsdp", False) != sharded:
            raise ValueError(f"checkpoint {ckpt} was written {'with' if state.get('fsdp') else 'without'} FSDP2 "
                             f"sharding, this run is {'sharded' if sharded else 'not sharded'}: resume it the way "
                             "it was started, or delete the checkpoint")
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start, history, evals, best = state["step"], state["history"], state["evals"], state["best"]
        if rank == 0 and log_path is not None and log_path.is_file():  # drop lines written after the checkpoint
            lines = [l for l in log_path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= start]
            log_path.write_text("".join(l + "\n" for l in lines))
    elif rank == 0 and log_path is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")

    pending: list[str] = []      # log lines, written in chunks (not one file open per step)

    def flush_log():
        if pending and rank == 0 and log_path is not None:
            with open(log_path, "a") as f:
                f.write("".join(pending))
        pending.clear()

    def log(rec: dict):
        if rank == 0 and log_path is not None:
            pending.append(json.dumps(rec) + "\n")
            if len(pending) >= 100:
                flush_log()

    def evaluate(step: int):
        nonlocal best
        if eval_fn is None:
            return
        was = live.training
        live.eval()
        with torch.no_grad():
            res = {k: float(v) for k, v in eval_fn(live).items()}
        live.train(was)
        rec = {"step": step, **res}
        evals.append(rec)
        log({"eval": True, **rec})
        if cfg.select_best is not None:
            if cfg.select_best not in res:
                raise KeyError(f"select_best={cfg.select_best!r} is not among the eval metrics {sorted(res)}")
            if best is None or res[cfg.select_best] < best["value"]:
                best = {"step": step, "value": res[cfg.select_best], "state": full_state(live)}

    t0 = time.time()
    if start == 0:
        evaluate(0)
    live.train()
    bar = progress(range(start, cfg.steps), desc=cfg.desc, leave=False, **({} if rank == 0 else {"disable": True}))
    tokens = 0
    for step in bar:
        lr = cfg.lr_at(step)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = batch_at(step)
        n_tok = batch.n_tokens
        if n_tok <= 0:
            raise ValueError(f"batch at step {step} has no target tokens")
        batch = batch.shard(rank, world).to(device)
        loss = loss_fn(net, batch) / n_tok * world     # DDP and FSDP2 average over ranks
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = None
        if cfg.grad_clip is not None:    # over DTensor gradients (FSDP2): the global norm, on every rank
            gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.grad_clip)
            gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        opt.step()
        tokens += n_tok
        shown = loss.detach() / world                  # this rank's share of the batch's mean loss
        if world > 1:
            dist.all_reduce(shown)
        rec = {"step": step + 1, "loss": float(shown), "lr": lr}
        if gnorm is not None:
            rec["grad_norm"] = gnorm
        history.append(rec)
        log(rec)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            evaluate(done)
        if ckpt is not None and cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != cfg.steps:
            if sharded:      # gathered on every rank (a collective), written by rank 0
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

                msd, osd = get_state_dict(net, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            else:
                msd, osd = (model.state_dict(), opt.state_dict()) if rank == 0 else (None, None)
            if rank == 0:
                flush_log()          # the log on disk always reaches the checkpoint
                _atomic_save({"step": done, "steps": cfg.steps, "model": msd, "optimizer": osd, "fsdp": sharded,
                              "rng": torch.get_rng_state(), "history": history, "evals": evals, "best": best,
                              "config": asdict(cfg)}, ckpt)
        if on_step is not None:
            on_step(done, rec)
    if cfg.steps > start or not evals:
        evaluate(cfg.steps)
    flush_log()
    if sharded:          # the trained weights, gathered on every rank, into the unsharded model
        model.load_state_dict(full_state(net))
    if best is not None:
        model.load_state_dict(best["state"])
    for p in frozen:
        p.requires_grad_(True)
    if rank == 0 and ckpt is not None and ckpt.is_file():
        ckpt.unlink()  # finished: the caller saves what it needs
    return {"history": history, "evals": evals, "best_step": None if best is None else best["step"],
            "wall_s": time.time() - t0, "tokens": tokens, "world": world, "fsdp": sharded}
