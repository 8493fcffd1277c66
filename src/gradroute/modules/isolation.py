"""Optimizer isolation: a parameter whose owner did not learn on a step must not move at all.

Zeroed gradients or lr = 0 are not enough: AdamW's moments, its step count and weight decay still move it.
While a :class:`~gradroute.modules.ModuleSet` is attached, a global optimizer step pre-hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``) runs before every ``optimizer.step()`` of an
optimizer holding the model's parameters, after a routed forward: it sets ``.grad = None`` on every
parameter whose owner (the core, or one module) had no example learning it since the previous step, and
torch optimizers skip parameters without a gradient entirely. Under DistributedDataParallel the per-owner
flags are all-reduced (max) first, so every rank steps the same owners. Flags accumulate over micro-batches
until the next step; forwards under ``no_grad`` record nothing. Under FSDP2 the parameters are shards (DTensors)
and the flags are all-reduced the same way, so every rank drops the same owners' shards."""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook


class Isolation:
    """Per-owner "learned" flags of ``owner`` (a ModuleSet: ``model``, ``K``, ``core_params()``,
    ``module_params(k)``, ``sync``) and the optimizer step pre-hook that drops the others' gradients."""

    def __init__(self, owner):
        self.owner = weakref.ref(owner)
        self.pending: torch.Tensor | None = None     # learned flags (1 + K) since the last step
        ref = self.owner

        def pre_step(optimizer, args, kwargs):
            me = ref()
            if me is not None:
                me.isolation.before_step(optimizer)
        self._hook = register_optimizer_step_pre_hook(pre_step)

    def record(self, flags: torch.Tensor) -> None:
        self.pending = flags if self.pending is None else self.pending | flags

    def before_step(self, optimizer) -> None:
        if self.pending is None:
            return
        # the model's parameters as of now: wrapping (FSDP2's fully_shard) replaces the parameter objects
        ids = {id(p) for p in self.owner().model.parameters()}
        if not any(id(p) in ids for g in optimizer.param_groups for p in g["params"]):
            return
        self.release()

    def _synced(self, flags: torch.Tensor, owner) -> torch.Tensor:
        sync = owner.sync if owner.sync is not None else (dist.is_available() and dist.is_initialized()
                                                          and dist.get_world_size() > 1)
        if not sync:
            return flags
        dev = next(owner.model.parameters()).device
        if dist.get_backend() == "nccl":
            dev = torch.device("cuda", torch.cuda.current_device())
        t = flags.to(dev, torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.cpu().bool()

    def release(self) -> torch.Tensor:
        """Set ``.grad = None`` on the parameters of every owner that did not learn since the last step
        (all-reducing the flags across processes first when syncing), then clear the flags."""
        owner = self.owner()
        flags = self.pending if self.pending is not None else torch.ones(1 + owner.K, dtype=torch.bool)
        flags = self._synced(flags, owner)
        if not bool(flags[0]):
            for p in owner.core_params():
                p.grad = None
        for k in range(owner.K):
            if not bool(flags[1 + k]):
                for p in owner.module_params(k):
                    p.grad = None
        self.pending = None
        return flags

    def remove(self) -> None:
        self._hook.remove()
        self.pending = None
