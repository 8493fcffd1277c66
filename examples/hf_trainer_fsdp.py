"""Parameter routing in ``transformers.Trainer`` (``gradroute.hf.RoutingTrainer``) with FSDP2 through Accelerate.

    torchrun --nproc_per_node 2 examples/hf_trainer_fsdp.py --out runs/trainer_fsdp     # 2 processes, FSDP2
    python examples/hf_trainer_fsdp.py --out runs/trainer_one                          # 1 process, no sharding

FSDP2 is switched on by the training arguments alone (transformers 5 reads ``fsdp_config["version"]``, default 2,
and hands Accelerate an FSDP2 plugin; with transformers 5.25 / accelerate 1.16 it called ``fully_shard`` on the
embedding, each decoder layer, the final norm, the head, then the root)::

    TrainingArguments(..., fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})

On CPU (gloo) Accelerate 1.16 ignores that plugin: ``AcceleratorState`` selects FSDP only for multi-device
backends (MULTI_GPU, MULTI_XPU, ...), so with 2 CPU processes (MULTI_CPU) the Trainer silently wraps the model in
DDP instead. :class:`Trainer` below switches the state to FSDP right after the accelerator is made (no effect on
GPUs, where the arguments alone select it); Accelerate's own FSDP2 preparation then runs on CPU. The script checks
that the trained model really holds sharded (DTensor) parameters.

A tiny Llama built from a config trains on random tokens; every 4th example is "forget" and updates only the
16 MLP units added per block. The router is built before the Trainer shards the model (masks follow parameter
names). After training every rank ablates theta_forget on its own shard; the full state dict is gathered and
loaded into an unsharded copy given the same expansion, which is contracted (the new units removed) and saved
with ``save_pretrained`` on rank 0. The global batch is the same for any number of processes
(``--batch`` over the processes), so the runs can be compared. See docs/scale.md.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import transformers
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

import gradroute as gr
from gradroute import hf


class Trainer(hf.RoutingTrainer):
    """RoutingTrainer whose FSDP config also takes effect on CPU (see the module docstring)."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and state.distributed_type == DistributedType.MULTI_CPU:
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP   # (re-read by later states)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True


def build(args):
    torch.manual_seed(0)                       # the same initial model on every rank
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=2 * args.d_model,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=args.seq)
    model = transformers.LlamaForCausalLM(cfg)
    return model, gr.expand_mlp(model, hf.mlp_pattern(model), args.units)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over the processes)")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--units", type=int, default=16, help="MLP units added per block (theta_forget)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} does not split over {world} processes")

    model, new = build(args)
    router = gr.ParamRouter(model, new)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, args.vocab, (args.seq,), generator=g).tolist(), "forget": i % 4 == 0}
            for i in range(args.batch * args.steps)]
    sharded = world > 1
    targs = transformers.TrainingArguments(
        output_dir=str(args.out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch // world,
        learning_rate=1e-3, weight_decay=0.1, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        **(dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
           if sharded else {}))
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=hf.RoutingCollator(pad_id=0),
                                router=router)
    trainer.train()
    net = trainer.model_wrapped                # the sharded model (FSDP2 shards in place: `model` is the same object)
    shards = [n or "(root)" for n, m in net.named_modules() if isinstance(m, FSDPModule)]
    if sharded and not (shards and all(gr.adapters.is_sharded(p) for p in net.parameters())):
        raise RuntimeError("the Trainer did not shard the model with FSDP2")
    router.ablate()                            # on every rank: each zeroes theta_forget in its own shard
    sd = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.is_world_process_zero():
        plain, plain_new = build(args)         # unsharded, the same expansion: load, contract, save
        plain.load_state_dict(sd)
        gr.contract(plain, plain_new)
        folder = hf.save_unlearned(plain, args.out / "model")
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        info = {"processes": world, "distributed_type": str(trainer.accelerator.distributed_type),
                "fsdp_version": getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
                "fully_shard_on": shards, "losses": losses, "saved": str(folder),
                "parameters": sum(p.numel() for p in plain.parameters())}
        (args.out / "result.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
