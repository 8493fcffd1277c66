"""Hugging Face models and training loops: load any causal LM with its tokenizer, find its
MLPs, route in ``transformers.Trainer``, save the unlearned model so plain ``transformers``
loads it.

    import gradroute as gr
    from gradroute import hf

    model, tok = hf.load_causal_lm("path/to/model")         # a checkpoint or a config-only folder
    new = gr.expand_mlp(model, hf.mlp_pattern(model), 64)    # ERA's expansion, any layout
    router = gr.ParamRouter(model, new)                       # theta_forget = the new units
    trainer = hf.RoutingTrainer(model=model, args=..., train_dataset=ds, data_collator=hf.RoutingCollator(tok),
                                router=router)                # each example's "forget" flag routes it
    trainer.train()
    router.ablate(); gr.contract(model, new)                  # remove the new units
    hf.save_unlearned(model, "unlearned/", tokenizer=tok)     # loads with AutoModelForCausalLM

Layouts recognised (see :mod:`gradroute.adapters`): GPT-2 (``c_fc``/``c_proj``), Llama /
Mistral / Qwen (gated ``gate_proj``, ``up_proj``/``down_proj``, grouped-query attention),
GPT-NeoX / Pythia (``dense_h_to_4h``/``dense_4h_to_h``), OPT, GPT-J and others.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .adapters import mlp_parts, unwrap

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_MLP_SIZE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")


class ModelFolderError(ValueError):
    """A model folder is missing, incomplete, or its tokenizer does not match the model."""


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("gradroute.hf needs transformers: pip install 'gradroute[hf]'") from None
    return transformers


# ------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------
def load_causal_lm(source, tokenizer=None, seed: int = 0, torch_dtype=None):
    """``(model, tokenizer)`` from a local folder or a ``transformers`` config.

    A folder with weights (``model.safetensors``, ``pytorch_model.bin``, sharded index) loads
    them; a folder with only ``config.json`` builds a fresh model from the config (initialised
    from ``seed``), as does a ``PretrainedConfig`` object. ``tokenizer``: a tokenizer object,
    a folder, or None (the model folder's own tokenizer, when it has one). The tokenizer is
    checked against the model (:func:`check_tokenizer`). Nothing is downloaded."""
    tr = require_transformers()
    tok_where = None
    if isinstance(source, tr.PretrainedConfig):
        torch.manual_seed(seed)
        model = tr.AutoModelForCausalLM.from_config(source)
        where = f"{type(source).__name__}"
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise ModelFolderError(f"no model folder at {folder} (expected a folder with config.json, as written by "
                                   "save_pretrained)")
        if not (folder / "config.json").is_file():
            raise ModelFolderError(f"{folder} has no config.json: not a Hugging Face model folder "
                                   f"(files: {', '.join(sorted(p.name for p in folder.iterdir())[:10]) or 'none'})")
        try:
            config = tr.AutoConfig.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise ModelFolderError(f"{folder / 'config.json'}: cannot read the config ({type(e).__name__}: {e})") from None
        kw = {} if torch_dtype is None else {"dtype": torch_dtype}
        if any((folder / f).is_file() for f in WEIGHT_FILES):
            model = tr.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kw)
        else:
            torch.manual_seed(seed)
            model = tr.AutoModelForCausalLM.from_config(config, **kw)
        where = str(folder)
        if tokenizer is None and has_tokenizer(folder):
            tokenizer = folder
    if isinstance(tokenizer, (str, os.PathLike)):
        tok_where = str(tokenizer)
        if not Path(tokenizer).is_dir() or not has_tokenizer(Path(tokenizer)):
            raise ModelFolderError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {tokenizer}")
        tokenizer = tr.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    if tokenizer is not None:
        check_tokenizer(model, tokenizer, model_where=where, tokenizer_where=tok_where or "the tokenizer")
    return model, tokenizer


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds tokenizer files (as ``save_pretrained`` writes them)."""
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                 "tokenizer.model"))


def check_tokenizer(model: nn.Module, tokenizer, model_where: str = "the model",
                    tokenizer_where: str = "the tokenizer") -> None:
    """Raise :class:`ModelFolderError` when ``tokenizer`` can produce ids the model has no
    embedding for (its vocabulary is larger than the model's input embedding), or its special
    token ids are out of range."""
    n_emb = unwrap(model).get_input_embeddings().weight.shape[0]
    n_tok = len(tokenizer)
    if n_tok > n_emb:
        raise ModelFolderError(f"tokenizer does not match the model: {tokenizer_where} has {n_tok} tokens but "
                               f"{model_where} embeds only {n_emb} (config vocab_size "
                               f"{getattr(unwrap(model).config, 'vocab_size', '?')}); use the model's own tokenizer")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        i = getattr(tokenizer, name, None)
        if isinstance(i, int) and not 0 <= i < n_emb:
            raise ModelFolderError(f"tokenizer does not match the model: {tokenizer_where}'s {name} is {i}, outside "
                                   f"{model_where}'s {n_emb} embeddings")


# ------------------------------------------------------------------------------------------
# structure
# ------------------------------------------------------------------------------------------
def mlp_names(model: nn.Module) -> list[str]:
    """Names of the model's MLP blocks (every module :func:`gradroute.adapters.mlp_parts`
    recognises), in order."""
    out = []
    for name, mod in unwrap(model).named_modules():
        if not name:
            continue
        try:
            mlp_parts(mod, name)
        except TypeError:
            continue
        out.append(name)
    if not out:
        raise TypeError(f"{type(unwrap(model)).__name__} has no MLP block gradroute recognises "
                        "(see gradroute.adapters._MLP_LAYOUTS)")
    return out


def mlp_pattern(model: nn.Module, layers=None) -> str:
    """A module pattern matching the model's MLP blocks (``layers``: a slice or indices of them)."""
    names = mlp_names(model)
    if layers is not None:
        names = names[layers] if isinstance(layers, slice) else [names[i] for i in layers]
    return "re:" + "|".join(re.escape(n) for n in names)


def sync_config(model: nn.Module) -> None:
    """Write the MLP width found in the modules into the config (after ``expand_mlp`` or
    ``contract``), so ``save_pretrained`` / ``from_pretrained`` round-trip. Every MLP must have
    the same width (a config has one); otherwise ablate without contracting."""
    root = unwrap(model)
    widths = {n: mlp_parts(root.get_submodule(n), n).n_units for n in mlp_names(root)}
    sizes = sorted(set(widths.values()))
    if len(sizes) > 1:
        raise ValueError(f"MLP widths differ between layers ({', '.join(f'{n}: {w}' for n, w in widths.items())}); "
                         "a transformers config holds one width. Ablate (zero) instead of contracting, or "
                         "expand/contract every layer alike.")
    cfg = root.config
    keys = [k for k in _MLP_SIZE_KEYS if hasattr(cfg, k)]
    if not keys:
        raise ValueError(f"{type(cfg).__name__} has none of {', '.join(_MLP_SIZE_KEYS)}; cannot record the MLP width")
    for k in keys:
        setattr(cfg, k, sizes[0])


def _special_ids_from(model: nn.Module, tokenizer) -> None:
    """Config (and generation config) bos/eos/pad ids outside the embedding (e.g. GPT2Config's
    default 50256 on a small vocabulary) are replaced by the tokenizer's."""
    n_emb = model.get_input_embeddings().weight.shape[0]
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v, t = getattr(cfg, name, None), getattr(tokenizer, name, None)
            if isinstance(v, int) and not 0 <= v < n_emb and isinstance(t, int):
                setattr(cfg, name, t)


def save_unlearned(model: nn.Module, folder, tokenizer=None) -> Path:
    """``save_pretrained`` the (ablated or contracted) model, and the tokenizer when given, into
    ``folder``; the config's MLP width is synced first (:func:`sync_config`)."""
    root = unwrap(model)
    from .models import GPT

    if isinstance(root, GPT):
        root = gpt_to_hf(root)
    if not hasattr(root, "save_pretrained"):
        raise TypeError(f"{type(root).__name__} is not a Hugging Face model (no save_pretrained); "
                        "use --arch hf-gpt2 or a model from gradroute.hf.load_causal_lm")
    sync_config(root)
    if tokenizer is not None:
        _special_ids_from(root, tokenizer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    log = require_transformers().utils.logging
    shown = log.is_progress_bar_enabled()
    log.disable_progress_bar()                  # a one-shard bar per saved model only clutters logs
    try:
        root.save_pretrained(folder)
    finally:
        if shown:
            log.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def gpt_to_hf(model: nn.Module):
    """gradroute's :class:`~gradroute.models.GPT` as a ``transformers.GPT2LMHeadModel`` computing
    the same function (up to float rounding): the same pre-norm blocks with exact GELU, q/k/v fused
    into GPT-2's ``c_attn``, Linear weights transposed into ``Conv1D``. Expanded or contracted
    MLPs are fine as long as every block has the same width (GPT-2's config has one)."""
    tr = require_transformers()
    c = model.config
    blocks = list(model.transformer.h)
    widths = {b.mlp.c_fc.out_features for b in blocks}
    dims = {b.attn.q_proj.out_features for b in blocks}
    if len(widths) != 1 or dims != {c.d_model}:
        raise ValueError(f"gpt_to_hf: GPT-2 has one MLP width and d_model-wide attention; this model has MLP widths "
                         f"{sorted(widths)} and attention widths {sorted(dims)}")
    n_head = c.d_model // blocks[0].attn.head_dim
    cfg = tr.GPT2Config(vocab_size=c.vocab_size, n_positions=c.n_ctx, n_embd=c.d_model, n_layer=len(blocks),
                        n_head=n_head, n_inner=widths.pop(), activation_function="gelu", resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=blocks[0].ln_1.eps,
                        tie_word_embeddings=model.lm_head.weight is model.transformer.wte.weight,
                        bos_token_id=None, eos_token_id=None)   # set from the tokenizer when saved
    hf = tr.GPT2LMHeadModel(cfg).to(model.lm_head.weight.dtype)
    t = hf.transformer
    with torch.no_grad():
        for name in ("wte", "wpe", "ln_f"):
            getattr(t, name).load_state_dict(getattr(model.transformer, name).state_dict())
        for b, h in zip(blocks, t.h):
            h.ln_1.load_state_dict(b.ln_1.state_dict())
            h.ln_2.load_state_dict(b.ln_2.state_dict())
            a = b.attn
            h.attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).T)
            h.attn.c_attn.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            for src, dst in ((a.o_proj, h.attn.c_proj), (b.mlp.c_fc, h.mlp.c_fc), (b.mlp.c_proj, h.mlp.c_proj)):
                dst.weight.copy_(src.weight.T)
                dst.bias.copy_(src.bias)
        if not cfg.tie_word_embeddings:
            hf.lm_head.weight.copy_(model.lm_head.weight)
    return hf.eval()


# ------------------------------------------------------------------------------------------
# training loops users already have
# ------------------------------------------------------------------------------------------
class RoutingCollator:
    """Pads ``input_ids`` (right, with the tokenizer's pad or eos id), sets ``labels`` (``-100``
    on padding) and ``attention_mask``, and keeps each example's routing flag ``key`` (bool)."""

    def __init__(self, tokenizer=None, key: str = "forget", pad_id: int | None = None):
        if pad_id is None:
            if tokenizer is None:
                raise ValueError("RoutingCollator needs a tokenizer or pad_id")
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; pass pad_id=")
        self.pad_id, self.key = int(pad_id), key

    def __call__(self, examples: list[dict]) -> dict:
        for i, e in enumerate(examples):
            if self.key not in e:
                raise KeyError(f"example {i} of the batch has no {self.key!r} field (fields: {', '.join(e)}); "
                               "every example needs its routing flag")
        T = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(examples), T, dtype=torch.long)
        for i, e in enumerate(examples):
            x = torch.as_tensor(e["input_ids"], dtype=torch.long)
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        flag = torch.tensor([bool(e[self.key]) for e in examples])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, self.key: flag}


def _trainer_base():
    return require_transformers().Trainer


def _make_routing_trainer():
    Trainer = _trainer_base()

    class RoutingTrainer(Trainer):
        """``transformers.Trainer`` that routes each example by a per-example flag in the batch.

        ``router``: a :class:`gradroute.ParamRouter`: flagged examples update only
        ``theta_forget`` (parameter routing). Or ``units`` (a :class:`gradroute.Units`, e.g. from
        ``expand_mlp``) with ``route_kwargs`` for :func:`gradroute.route_units` (activation
        routing, ERA; default ``inside=1, outside=0``: flagged examples learn only through the
        units). ``key``: the batch field with the flags (bool per example), removed before
        the forward pass; the dataset column is kept even with ``remove_unused_columns``.
        The loss is the model's own (mean next-token cross-entropy)."""

        def __init__(self, *args, router=None, units=None, route_kwargs: dict | None = None, key: str = "forget",
                     **kwargs):
            if (router is None) == (units is None):
                raise ValueError("RoutingTrainer needs exactly one of router= (ParamRouter) or units= (Units)")
            self.router, self.units, self.key = router, units, key
            self.route_kwargs = {"inside": 1.0, "outside": 0.0, **(route_kwargs or {})}
            super().__init__(*args, **kwargs)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if self.key not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, self.key]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.key not in inputs:
                raise KeyError(f"the batch has no routing field {self.key!r} (fields: {', '.join(inputs)}); "
                               "use gradroute.hf.RoutingCollator or put a bool per example under that key")
            inputs = dict(inputs)
            flag = torch.as_tensor(inputs.pop(self.key)).bool()
            if self.router is not None:
                ctx = self.router(forget=flag)
            else:
                from .surgery import route_units

                ctx = route_units(model, self.units, flag, **self.route_kwargs)
            kw = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}  # older Trainers
            with ctx:
                return super().compute_loss(model, inputs, return_outputs=return_outputs, **kw)

    return RoutingTrainer


def __getattr__(name: str) -> Any:            # RoutingTrainer is built on first use (imports Trainer)
    if name == "RoutingTrainer":
        cls = _make_routing_trainer()
        globals()["RoutingTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
