"""Parameter routing in a plain Accelerate training loop (your loop, our router).

    python examples/accelerate_routing.py --corpus docs.jsonl --label-field label --out runs/acc
    torchrun --nproc_per_node=2 examples/accelerate_routing.py --corpus docs.jsonl \\
        --label-field label --out runs/acc2 --batch-size 4      # 2 CPU processes (gloo), same global batch

(On CPU, ``accelerate launch --num_processes 2 --cpu`` started a single process in our test
with accelerate 1.15; torchrun starts two, and ``Accelerator`` picks them up.)

The only gradroute lines are the expansion, ``ParamRouter``, the ``with router(forget=...)``
around the forward pass, and the ablation/contraction + ``save_unlearned`` at the end. The
router is built on the unwrapped model; Accelerate's DistributedDataParallel wrapper is looked
through.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from accelerate import Accelerator
from torch.utils.data import DataLoader

import gradroute as gr
from gradroute import hf
from gradroute.lm.labels import FORGET, rule_from_args
from gradroute.lm.sources import iter_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--label-field")
    ap.add_argument("--forget-words", nargs="+")
    ap.add_argument("--model", help="a local Hugging Face model folder (default: a tiny Llama-style model)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8, help="per process")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-ctx", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)

    rule = rule_from_args(args.label_field, args.forget_words)
    docs = [(d.text, rule.status(d.record, d.where) == FORGET) for d in iter_documents(args.corpus)]
    if args.model:
        model, tok = hf.load_causal_lm(args.model)
    else:
        from gradroute.lm.tokenizer import train_bpe, wrap_tokenizer

        tok = wrap_tokenizer(train_bpe([t for t, _ in docs], 512))
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=args.n_ctx)
        model, _ = hf.load_causal_lm(cfg, tokenizer=tok, seed=0)
    new = gr.expand_mlp(model, hf.mlp_pattern(model), 16)
    router = gr.ParamRouter(model, new)

    data = [{"input_ids": tok.encode(t)[: args.n_ctx], "forget": f} for t, f in docs]
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=hf.RoutingCollator(tok),
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    net, opt, loader = acc.prepare(model, opt, loader)
    step, losses = 0, []
    while step < args.steps:
        for batch in loader:
            forget = batch.pop("forget")
            with router(forget=forget):                   # forget rows update only the new units
                loss = net(**batch).loss
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(float(acc.reduce(loss.detach(), "mean")))
            step += 1
            if step == args.steps:
                break
    router.ablate()
    gr.contract(model, new)
    if acc.is_main_process:
        folder = hf.save_unlearned(model, args.out / "model", tokenizer=tok)
        info = {"processes": acc.num_processes, "first_loss": losses[0], "last_loss": losses[-1],
                "saved": str(folder)}
        (args.out / "result.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main()
