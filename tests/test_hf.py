"""Hugging Face models from local folders: expand, route, ablate/contract, save, reload with
plain transformers; the Trainer integration matches our training loop; clear errors."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gradroute as gr
from gradroute import hf
from gradroute.lm.data import Batch
from gradroute.lm.train import TrainConfig, train

VOCAB = 300


def _tokenizer(n_vocab=VOCAB):
    from gradroute.lm.corpus import generate_stories
    from gradroute.lm.tokenizer import train_bpe, wrap_tokenizer

    return wrap_tokenizer(train_bpe(generate_stories(60, seed=3), n_vocab, cache=None))


CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=32),
    "neox": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               max_position_embeddings=32),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    import os

    os.environ.setdefault("GRADROUTE_CACHE", str(tmp_path_factory.mktemp("cache")))
    return _tokenizer()


def _folder(tmp_path, arch, tok, weights=True):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    d = tmp_path / arch
    if weights:
        model.save_pretrained(d)
    else:
        model.config.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_expand_route_ablate_save_reload(tmp_path, tok, arch):
    model, t = hf.load_causal_lm(_folder(tmp_path, arch, tok))
    assert len(t) == len(tok)
    ids = torch.tensor([t.encode("Once upon a time, Timmy went to the park.")[:12]] * 4)
    before = _logits(model, ids)
    new = gr.expand_mlp(model, hf.mlp_pattern(model), 4)
    assert torch.allclose(_logits(model, ids), before, atol=1e-5)       # expansion keeps the function
    router = gr.ParamRouter(model, new)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    with router(forget=torch.tensor([True, False, True, False])):
        model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    routed = _logits(model, ids)
    readers = [m.get_submodule(n) for m in [model] for n in hf.mlp_names(model)]
    readers = [getattr(r, gr.adapters.mlp_parts(r).output).weight for r in readers]
    assert all(w[:, -4:].abs().sum() > 0 for w in readers)              # the new units learned (from 0)
    router.ablate()
    ablated = _logits(model, ids)
    assert all(w[:, -4:].abs().sum() == 0 for w in readers) and not torch.equal(routed, ablated)
    hf.save_unlearned(model, tmp_path / "ablated", tokenizer=t)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ablated")
    assert back.config.intermediate_size == 32 + 4
    assert torch.equal(_logits(back, ids), ablated)
    gr.contract(model, new)                                             # remove the (zero) units
    hf.save_unlearned(model, tmp_path / "contracted", tokenizer=t)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "contracted")
    assert back.config.intermediate_size == 32
    assert torch.equal(_logits(back, ids), _logits(model, ids))
    assert torch.allclose(_logits(back, ids), ablated, atol=1e-5)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "contracted").encode("a tree") == t.encode("a tree")


def test_config_only_folder_and_layer_subset(tmp_path, tok):
    m1, _ = hf.load_causal_lm(_folder(tmp_path, "llama", tok, weights=False), seed=1)
    m2, _ = hf.load_causal_lm(tmp_path / "llama", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))   # seeded fresh init
    assert hf.mlp_names(m1) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    units = gr.expand_mlp(m1, hf.mlp_pattern(m1, layers=[0]), 2)
    assert list(units.index) == ["model.layers.0.mlp"]
    with pytest.raises(ValueError, match="MLP widths differ"):
        hf.save_unlearned(m1, tmp_path / "uneven")


def test_bad_model_folders(tmp_path, tok):
    with pytest.raises(hf.ModelFolderError, match="no model folder at .*nowhere"):
        hf.load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(hf.ModelFolderError, match="empty has no config.json.*notes.txt"):
        hf.load_causal_lm(tmp_path / "empty")
    d = _folder(tmp_path, "neox", tok)
    big = _tokenizer(VOCAB + 100)
    big.save_pretrained(tmp_path / "bigtok")
    with pytest.raises(hf.ModelFolderError, match=r"tokenizer does not match the model: .*bigtok has 400 tokens "
                                                   r"but .*neox embeds only 300"):
        hf.load_causal_lm(d, tokenizer=tmp_path / "bigtok")
    with pytest.raises(hf.ModelFolderError, match="no tokenizer files"):
        hf.load_causal_lm(d, tokenizer=tmp_path / "empty")


# ------------------------------------------------------------------------------------------
# Trainer integration
# ------------------------------------------------------------------------------------------
def _examples(n=12, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    forget = torch.tensor([i % 3 == 0 for i in range(n)])
    return ids, forget


def _model_and_router(mode):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    new = gr.expand_mlp(model, hf.mlp_pattern(model), 4)
    return model, (gr.ParamRouter(model, new) if mode == "param" else new)


def _hf_train(mode, ids, forget, per_device, steps, lr, out):
    """``RoutingTrainer`` on the examples in order (per-device batch ``per_device``); the model."""
    from torch.utils.data import SequentialSampler

    model, r = _model_and_router(mode)

    class Sequential(hf.RoutingTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    data = [{"input_ids": ids[i].tolist(), "forget": bool(forget[i])} for i in range(len(ids))]
    args = transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=per_device,
                                          max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                                          weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0,
                                          report_to=[], save_strategy="no", logging_strategy="no",
                                          use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    kw = {"router": r} if mode == "param" else {"units": r}
    Sequential(model=model, args=args, train_dataset=data, data_collator=hf.RoutingCollator(pad_id=0), **kw).train()
    return model


@pytest.mark.parametrize("mode", ["param", "activation"])
def test_trainer_matches_our_loop(tmp_path, mode):
    ids, forget = _examples()
    B, steps, lr = 4, 3, 1e-2

    # our loop: inputs ids[:, :-1], targets ids[:, 1:], the same routing per example
    ours, r1 = _model_and_router(mode)

    def batch_at(s):
        x, f = ids[s * B:(s + 1) * B], forget[s * B:(s + 1) * B]
        return Batch(x[:, :-1], x[:, 1:], torch.zeros_like(x[:, 1:], dtype=torch.bool), f, f,
                     torch.arange(B), x[:, 1:].numel())

    def loss_fn(net, b):
        from gradroute.lm.train import token_losses

        ctx = r1(forget=b.labelled) if mode == "param" else gr.route_units(net, r1, b.labelled, inside=1.0, outside=0.0)
        with ctx:
            return token_losses(net, b.x, b.y).sum()

    train(ours, batch_at, TrainConfig(steps=steps, lr=lr, min_lr=lr, warmup=0, weight_decay=0.0, grad_clip=1.0),
          loss_fn=loss_fn, distributed=False)

    theirs = _hf_train(mode, ids, forget, B, steps, lr, tmp_path / "hf")
    init, _ = _model_and_router(mode)
    moved = 0
    for (n, a), b, c in zip(ours.named_parameters(), theirs.parameters(), init.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), n
        moved += not torch.equal(a, c)
    assert moved > 10


def _trainer_worker(rank, port, path):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    ids, forget = _examples()
    model = _hf_train("param", ids, forget, 2, 3, 1e-2, f"{path}.out{rank}")   # 2 per process: global 4
    assert dist.is_initialized() and dist.get_world_size() == 2
    if rank == 0:
        torch.save(model.state_dict(), path)
    dist.barrier()          # both ranks done communicating before the group is torn down
    dist.destroy_process_group()


@pytest.mark.slow
def test_trainer_under_two_processes(spawn2, tmp_path):
    """2 gloo processes with 2 examples each give the weights of 1 process with batches of 4."""
    path = tmp_path / "ddp.pt"
    spawn2(_trainer_worker, str(path))
    ids, forget = _examples()
    single = _hf_train("param", ids, forget, 4, 3, 1e-2, tmp_path / "one").state_dict()
    init = _model_and_router("param")[0].state_dict()
    ddp = torch.load(path)
    for n, v in single.items():
        assert torch.allclose(ddp[n], v, atol=1e-6), n
    assert sum(not torch.equal(init[n], v) for n, v in single.items()) > 10


def test_trainer_errors():
    collate = hf.RoutingCollator(pad_id=0)
    with pytest.raises(KeyError, match="example 1 of the batch has no 'forget' field"):
        collate([{"input_ids": [1, 2], "forget": True}, {"input_ids": [3]}])
    b = collate([{"input_ids": [1, 2], "forget": True}, {"input_ids": [3], "forget": False}])
    assert b["labels"].tolist() == [[1, 2], [3, -100]] and b["forget"].tolist() == [True, False]
    with pytest.raises(ValueError, match="exactly one of router"):
        hf.RoutingTrainer(model=None, args=None)


def test_our_gpt_saved_as_gpt2_computes_the_same_function(tmp_path, tiny_gpt):
    """``gpt_to_hf``: the same logits from our GPT and its GPT-2 twin, also after ERA's expand and
    contract, and through save_unlearned + from_pretrained; per-block widths that GPT-2 cannot hold
    are refused."""
    transformers = pytest.importorskip("transformers")
    from gradroute.hf import gpt_to_hf, save_unlearned

    import gradroute as gr

    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(tiny_gpt.transformer.h[0].mlp.c_proj.bias, std=0.1)   # nonzero biases matter too
    torch.testing.assert_close(gpt_to_hf(tiny_gpt)(ids).logits, tiny_gpt(ids)[0], atol=1e-5, rtol=1e-5)
    new = gr.expand_mlp(tiny_gpt, "transformer.h.*.mlp", k=4)
    with torch.no_grad():
        for p in tiny_gpt.parameters():
            p.add_(0.01 * torch.randn_like(p))
    gr.contract(tiny_gpt, new)
    folder = save_unlearned(tiny_gpt, tmp_path / "m")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.n_inner == 32 and reloaded.config.activation_function == "gelu"
    torch.testing.assert_close(reloaded(ids).logits, tiny_gpt(ids)[0], atol=1e-5, rtol=1e-5)
    gr.expand_mlp(tiny_gpt, "transformer.h.0.mlp", k=4)
    with pytest.raises(ValueError, match=r"one MLP width .* MLP widths \[32, 36\]"):
        gpt_to_hf(tiny_gpt)
