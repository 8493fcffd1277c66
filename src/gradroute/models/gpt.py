"""A small GPT in one readable file (nanoGPT-like).

Module names follow GPT-2's so the same routing specs work on both:
``transformer.h.{i}.mlp.c_fc / .act / .c_proj`` and ``transformer.h.{i}.attn.{q,k,v,o}_proj``.
Heads are separate q/k/v projections so that attention surgery (adding heads) is plain
row/column work. The number of heads is read from the projections' shapes, so expanded
layers keep working.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    n_ctx: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_mlp: int = 512
    dropout: float = 0.0
    tie_embeddings: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.d_model % cfg.n_head:
            raise ValueError(f"d_model {cfg.d_model} is not divisible by n_head {cfg.n_head}")
        self.head_dim = cfg.d_model // cfg.n_head
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.act = nn.GELU()
        self.c_proj = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.d_model),
            wpe=nn.Embedding(cfg.n_ctx, cfg.d_model),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.d_model),
        ))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith(("o_proj.weight", "c_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                only_targets: bool = False):
        """Logits ``(B, T, vocab)``; with ``targets`` also the cross-entropy (``reduction`` as in
        F.cross_entropy; 'none' gives per-token losses ``(B, T)``; target -100 is ignored).

        ``only_targets=True`` (with ``targets``): run the output layer only at positions whose target
        is not ignored and return ``None`` for the logits. Same losses; at small widths the output
        layer is most of a step, and padding is a third of the rows of short documents (1.45x per
        training step on dictionary entries with an 8,192-token BPE, ``benchmarks/lm_speed.py``). Hooks on the output layer see
        ``(B, T, d)`` inputs, so where it has forward hooks (keyed modules) or a per-instance forward
        (parameter routing inside a ``ParamRouter`` context) every position runs."""
        B, T = idx.shape
        if T > self.config.n_ctx:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.config.n_ctx}")
        pos = torch.arange(T, device=idx.device).unsqueeze(0)  # (1, T): shared by the batch
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        head = self.lm_head
        if (only_targets and targets is not None and "forward" not in head.__dict__
                and not (head._forward_hooks or head._forward_pre_hooks)):
            keep = targets != -100
            loss = F.cross_entropy(head(x[keep]).float(), targets[keep], reduction="none")
            if reduction == "none":
                return None, torch.zeros(B, T, dtype=loss.dtype, device=loss.device).masked_scatter(keep, loss)
            if reduction == "sum":
                return None, loss.sum()
            return None, loss.mean()
        logits = head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                               reduction=reduction)
        return logits, loss.view(B, T) if reduction == "none" else loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
