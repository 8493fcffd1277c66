"""Parameter routing inside a Hugging Face ``Trainer``, on your labelled documents and your model.

    # one process
    python examples/hf_trainer_routing.py --corpus docs.jsonl --label-field label --out runs/trainer
    # two CPU processes (gloo), same global batch
    torchrun --nproc_per_node=2 examples/hf_trainer_routing.py --corpus docs.jsonl --label-field label \\
        --out runs/trainer2 --batch-size 2

Documents labelled forget (by ``--label-field`` / ``--forget-words`` / ``--forget-regex``, see
``gradroute.lm.labels``) update only 16 new MLP units per layer; the others update everything.
After training the new units are removed and the model is saved with ``save_pretrained``
into ``OUT/model`` (loads with ``AutoModelForCausalLM.from_pretrained``). ``--model PATH``
takes a local model folder (its own tokenizer); the default is a tiny Llama-style model built
from a config with a tokenizer trained on the corpus.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import transformers

import gradroute as gr
from gradroute import hf
from gradroute.lm.labels import FORGET, rule_from_args
from gradroute.lm.sources import iter_documents


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--label-field")
    ap.add_argument("--forget-words", nargs="+")
    ap.add_argument("--forget-regex")
    ap.add_argument("--model", help="a local Hugging Face model folder (default: a tiny Llama-style model)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--expand", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8, help="per process")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-ctx", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    rule = rule_from_args(args.label_field, args.forget_words, args.forget_regex)
    docs = [(d.text, rule.status(d.record, d.where) == FORGET) for d in iter_documents(args.corpus)]
    if args.model:
        model, tok = hf.load_causal_lm(args.model)
        if tok is None:
            raise SystemExit(f"{args.model} has no tokenizer files; save one there with save_pretrained")
    else:
        from gradroute.lm.tokenizer import train_bpe, wrap_tokenizer

        tok = wrap_tokenizer(train_bpe([t for t, _ in docs], 512))
        cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=args.n_ctx, eos_token_id=tok.eos_token_id,
                                       bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
        model, _ = hf.load_causal_lm(cfg, tokenizer=tok, seed=args.seed)
    new = gr.expand_mlp(model, hf.mlp_pattern(model), args.expand)
    router = gr.ParamRouter(model, new)

    data = [{"input_ids": tok.encode(t)[: args.n_ctx], "forget": f} for t, f in docs]
    targs = transformers.TrainingArguments(
        output_dir=str(args.out / "trainer"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, seed=args.seed,
        report_to=[], save_strategy="no", logging_steps=max(1, args.steps // 4), use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = hf.RoutingTrainer(model=model, args=targs, train_dataset=data,
                                data_collator=hf.RoutingCollator(tok), router=router)
    result = trainer.train()
    router.ablate()
    gr.contract(model, new)
    if trainer.is_world_process_zero():
        folder = hf.save_unlearned(model, args.out / "model", tokenizer=tok)
        info = {"world_size": int(os.environ.get("WORLD_SIZE", "1")), "train_loss": result.training_loss,
                "documents": len(docs), "forget_documents": sum(f for _, f in docs), "saved": str(folder),
                "forget_params": router.num_forget_params()}
        (args.out / "result.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info))
    if torch.distributed.is_initialized():       # let every rank finish before the group goes away
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
