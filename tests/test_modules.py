"""Module routing: per-domain auxiliary MLPs, per-example masks, isolation under AdamW, export/merge."""
import copy
import hashlib
import re
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import gradroute as gr
from gradroute.models import GPT, GPTConfig
from gradroute.modules import GENERAL, UNLABELLED

from distributed import spawn2

DOMAINS = ["forest", "sea", "space", "dino"]


def gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=40))


def randomise_modules(mods, seed=1):
    """Modules start as no-ops (down = 0); give them weights so that they matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mods.module_params():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def ids(B=4, T=8, seed=2):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


def out(model, x):
    return model(x)[0] if isinstance(model, GPT) else model(input_ids=x).logits


# ------------------------------------------------------------------ adding modules
@pytest.mark.parametrize("arch", ["gpt", "hf_gpt2", "hf_llama"])
def test_function_unchanged_after_adding_modules(arch, request):
    model = gpt() if arch == "gpt" else request.getfixturevalue(arch)
    model.eval()
    pattern = {"gpt": "transformer.h.*.mlp", "hf_gpt2": "transformer.h.*.mlp", "hf_llama": "model.layers.*.mlp"}[arch]
    x = ids()
    with torch.no_grad():
        before = out(model, x)
        mods = gr.add_modules(model, pattern, DOMAINS, width=0.1)
        after = out(model, x)
        with mods.route(torch.tensor([0, GENERAL, UNLABELLED, 3])):
            routed = out(model, x)
    assert torch.equal(before, after) and torch.equal(before, routed)
    n_mlp = 40 if arch == "gpt" else (64 if arch == "hf_gpt2" else 32)
    assert set(mods.width.values()) == {max(1, round(0.1 * n_mlp))}
    assert mods.num_params() > 0 and len(mods.blocks) == 2
    mods.remove()


def test_width_as_units_and_bad_arguments():
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", 2, width=3)
    assert mods.domains == ["d0", "d1"] and set(mods.width.values()) == {3}
    with pytest.raises(ValueError, match="already has modules"):
        gr.add_modules(model, "transformer.h.*.mlp", 2)
    mods.remove()
    with pytest.raises(ValueError, match="identifiers"):
        gr.add_modules(gpt(), "transformer.h.*.mlp", ["a.b"])
    with pytest.raises(ValueError, match="repeat"):
        gr.add_modules(gpt(), "transformer.h.*.mlp", ["a", "a"])
    with pytest.raises(ValueError, match="width"):
        gr.add_modules(gpt(), "transformer.h.*.mlp", 2, width=0)
    with pytest.raises(gr.UnknownModuleError):
        gr.add_modules(gpt(), "transformer.h.*.mlpx", 2)
    mods = gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        mods.masks(torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="integers"):
        mods.masks(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="p_cr"):
        mods.masks(torch.tensor([0]), p_cr=1.5)
    with pytest.raises(ValueError, match="unknown domain 'moon'"):
        mods.set(on=["moon"])
    with pytest.raises(ValueError, match=r"shape \(B, 5\)"):
        with mods.route(forward=torch.ones(2, 3), learn=torch.ones(2, 3, dtype=torch.bool)):
            pass


def test_masks_policy():
    mods = gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS)
    labels = torch.tensor([1, GENERAL, UNLABELLED] + [GENERAL] * 200 + [2] * 200)
    fwd, learn = mods.masks(labels, p_cr=0.5, p_as=0.3, generator=torch.Generator().manual_seed(0))
    assert fwd[0].tolist() == [1, 0, 1, 0, 0] and learn[0, 1:].tolist() == [False, True, False, False]
    assert fwd[2].tolist() == [1] * 5 and learn[2].all()
    gen = fwd[3:203]
    on = gen[:, 1:].sum(1)
    assert set(on.tolist()) <= {0.0, 1.0} and 0.15 < on.mean() < 0.45          # p_as: one module, sometimes
    assert torch.equal(learn[3:203, 1:], gen[:, 1:].bool()) and learn[3:203, 0].all()
    core_learns = learn[203:, 0].float().mean()
    assert 0.35 < core_learns < 0.65                                         # p_cr = 0.5
    assert mods.configurations()[0] == () and mods.configurations()[-1] == tuple(DOMAINS)
    assert len(mods.configurations()) == 16


# ------------------------------------------------------------------ forward masks
def test_forward_mask_is_per_example():
    model = gpt().eval()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    randomise_modules(mods)
    x = ids(5)
    labels = torch.tensor([0, 3, GENERAL, UNLABELLED, 1])
    with torch.no_grad(), mods.route(labels):
        mixed = model(x)[0]
    expect = [["forest"], ["dino"], [], DOMAINS, ["sea"]]
    for b, on in enumerate(expect):
        with torch.no_grad(), mods.using(on=on):
            alone = model(x[b:b + 1])[0]
        assert torch.allclose(mixed[b], alone[0], atol=1e-5), b
    # float strengths per example and at inference
    fwd = torch.tensor([[1.0, 0.5, 0, 0, 0]] * 5)
    with torch.no_grad(), mods.route(forward=fwd, learn=torch.ones(5, 5, dtype=torch.bool)):
        half = model(x)[0]
    with torch.no_grad(), mods.using(on={"forest": 0.5}):
        assert torch.allclose(half, model(x)[0], atol=1e-6)
    with torch.no_grad(), mods.using(on=[]):
        off = model(x)[0]
    assert not torch.allclose(half, off, atol=1e-3)


# ------------------------------------------------------------------ backward masks
def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def test_backward_mask_core_frozen_on_domain_rows():
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    randomise_modules(mods)
    x = ids(4)
    labels = torch.tensor([0, 0, GENERAL, GENERAL])
    with mods.route(labels, p_cr=1.0):
        model(x, x, reduction="sum")[1].backward()
    g = grads(model)
    # reference for the core: the general rows alone with every module off
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    with mods.using(on=[]):
        ref(x[2:], x[2:], reduction="sum")[1].backward()
    aux = lambda n: ".aux_modules." in n
    for n, p in ref.named_parameters():
        if not aux(n):
            assert torch.allclose(g[n], p.grad, atol=1e-5), n
    assert all(g[n].abs().sum() > 0 for n in g if ".aux_modules.forest." in n)
    assert all(torch.count_nonzero(g[n]) == 0 for n in g if aux(n) and ".forest." not in n)
    # an all-domain batch gives the core exactly zero gradient
    model.zero_grad(set_to_none=True)
    with mods.route(torch.tensor([1, 1, 2, 2])):
        model(x, x)[1].backward()
    g = grads(model)
    assert all(torch.count_nonzero(g[n]) == 0 for n in g if not aux(n))
    mods.release_unlearned()


def test_module_can_run_without_learning():
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    randomise_modules(mods)
    x = ids(2)
    fwd = torch.tensor([[1.0, 1, 1, 0, 0], [1.0, 1, 1, 0, 0]])
    learn = torch.tensor([[True, True, False, False, False], [True, True, False, False, False]])
    with mods.route(forward=fwd, learn=learn):
        model(x, x)[1].backward()
    g = grads(model)
    assert all(torch.count_nonzero(g[n]) == 0 for n in g if ".aux_modules.sea." in n)
    assert all(g[n].abs().sum() > 0 for n in g if ".aux_modules.forest." in n)
    assert g["transformer.h.0.mlp.c_fc.weight"].abs().sum() > 0
    # "sea" ran: its output changed the loss, and gradient flowed through it to earlier layers
    with torch.no_grad(), mods.route(forward=fwd, learn=learn):
        a = model(x)[0]
    with torch.no_grad(), mods.using(on=["forest"]):
        b = model(x)[0]
    assert not torch.allclose(a, b, atol=1e-4)
    mods.release_unlearned()


def test_p_other_zero_is_the_schedule_without_it():
    """p_other = 0 (the default) gives the same masks and leaves the generator where it was; p_other > 0
    switches other modules on (forward only) on domain rows and changes nothing else."""
    mods = gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS)
    labels = torch.tensor([0, 1, 2, 3, GENERAL, UNLABELLED] * 50)
    for spread in ("one", "each"):
        g1, g2, g3 = (torch.Generator().manual_seed(5) for _ in range(3))
        a = mods.masks(labels, p_cr=0.7, p_as=0.5, generator=g1, spread=spread)
        b = mods.masks(labels, p_cr=0.7, p_as=0.5, generator=g2, spread=spread, p_other=0.0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))   # no extra draws
        f, l = mods.masks(labels, p_cr=0.7, p_as=0.5, generator=g3, spread=spread, p_other=0.5)
        assert torch.equal(l, a[1])                               # nobody learns more (or less)
        dom = labels >= 0
        assert torch.equal(f[~dom], a[0][~dom])                   # general and unlabelled rows unchanged
        rows = torch.arange(len(labels))[dom]
        assert (f[rows, 1 + labels[dom]] == 1).all() and (f[:, 0] == 1).all()
        extra = (f[dom] - a[0][dom])[:, 1:]                       # other modules switched on
        assert set(extra.unique().tolist()) <= {0.0, 1.0}
        assert 0.4 < float(extra.sum()) / (int(dom.sum()) * (len(DOMAINS) - 1)) < 0.6
    f, l = mods.masks(labels, p_other=1.0, generator=torch.Generator().manual_seed(0))
    assert (f[labels >= 0] == 1).all() and torch.equal(l[labels >= 0, 1:].sum(1), torch.ones(200, dtype=torch.long))
    with pytest.raises(ValueError, match="p_other"):
        mods.masks(labels, p_other=1.5)


def test_running_module_gets_no_gradient_from_rows_it_does_not_learn():
    """Per example: a module that runs on example i without learning (p_other) gets no gradient from i;
    its gradient in a mixed batch is exactly the sum over the rows where it learns."""
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    randomise_modules(mods)
    x = ids(3, seed=4)
    labels = torch.tensor([0, 1, 0])          # forest, sea, forest; every module runs on every row
    fwd, learn = mods.masks(labels, p_cr=0.0, p_other=1.0)
    assert (fwd == 1).all() and learn[:, 2].tolist() == [False, True, False]

    def grads_for(rows):
        model.zero_grad(set_to_none=True)
        with mods.route(forward=fwd[rows], learn=learn[rows]):
            model(x[rows], x[rows], reduction="sum")[1].backward()
        mods.release_unlearned()                # clear the flags (no optimizer here)
        return grads(model)
    mixed, sea_row, forest_rows = grads_for([0, 1, 2]), grads_for([1]), grads_for([0, 2])
    sea = [n for n in mixed if ".aux_modules.sea." in n]
    forest = [n for n in mixed if ".aux_modules.forest." in n]
    assert all(torch.count_nonzero(forest_rows[n]) == 0 for n in sea)      # ran on rows 0, 2: no gradient
    assert all(sea_row[n].abs().sum() > 0 for n in sea)
    assert all(torch.allclose(mixed[n], sea_row[n], atol=1e-6) for n in sea)
    assert all(torch.count_nonzero(sea_row[n]) == 0 for n in forest)
    assert all(torch.allclose(mixed[n], forest_rows[n], atol=1e-6) for n in forest)
    # the core learns from every row (p_cr 0): its gradient is the sum of both parts
    core = [n for n in mixed if ".aux_modules." not in n]
    assert all(torch.allclose(mixed[n], sea_row[n] + forest_rows[n], atol=1e-5) for n in core)
    # and the sea module's output on rows 0 and 2 did change the loss (it ran)
    with torch.no_grad():
        with mods.route(forward=fwd, learn=learn):
            on = model(x)[0]
        with mods.using(on=["forest"]):
            off = model(x)[0]
    assert not torch.allclose(on[0], off[0], atol=1e-4)


def test_p_other_modules_do_not_move_under_adamw():
    """A module that only ran without learning since the last step is not stepped (moments, weight decay),
    also after it has moments from earlier steps."""
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    _routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL], 0, p_as=0.5, generator=g)
    others = [_snapshot(mods.module_params(d)) for d in DOMAINS[1:]]
    core, forest = _snapshot(mods.core_params()), _snapshot(mods.module_params("forest"))
    # forest rows only; every other module runs on them (p_other 1), core frozen
    _routed_steps(model, mods, opt, [0, 0, 0], 20, p_cr=1.0, p_other=1.0)
    assert _same(core, mods.core_params())
    for snap, d in zip(others, DOMAINS[1:]):
        assert _same(snap, mods.module_params(d)), d
    assert not _same(forest, mods.module_params("forest"))
    mods.remove()


# ------------------------------------------------------------------ isolation under AdamW
def _snapshot(params):
    return [p.detach().clone() for p in params]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _routed_steps(model, mods, opt, labels, seed, n=3, **route):
    """``n`` optimizer steps, each on one routed batch with ``labels`` (inputs ``ids(B, seed=seed + s)``)."""
    labels = torch.tensor(labels)
    for s in range(n):
        x = ids(len(labels), seed=seed + s)
        with mods.route(labels, **route):
            model(x, x)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_frozen_parameters_bit_identical_under_real_optimizers(optimizer):
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1))
    g = torch.Generator().manual_seed(0)
    # mixed steps first: every owner gets momentum / Adam moments
    _routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL, UNLABELLED], 0, p_as=0.5, generator=g)
    core, forest, others = _snapshot(mods.core_params()), _snapshot(mods.module_params("forest")), \
        [_snapshot(mods.module_params(d)) for d in DOMAINS[1:]]
    _routed_steps(model, mods, opt, [0, 0, 0], 10, p_cr=1.0)   # only forest data, core frozen
    assert _same(core, mods.core_params())
    for snap, d in zip(others, DOMAINS[1:]):
        assert _same(snap, mods.module_params(d)), d
    assert not _same(forest, mods.module_params("forest"))
    # the trap this guards against: zeroed gradients still move the core (moments, weight decay)
    for p in mods.core_params():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert not _same(core, mods.core_params())
    mods.remove()


def test_isolation_in_the_shared_training_loop():
    from gradroute.lm.data import Batch
    from gradroute.lm.train import TrainConfig, token_losses, train

    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    core, sea, dino = (_snapshot(mods.core_params()), _snapshot(mods.module_params("sea")),
                       _snapshot(mods.module_params("dino")))

    def batch_at(step):
        x = ids(4, seed=step)
        z = torch.zeros(4, dtype=torch.bool)
        return Batch(x, x, z, z, z, torch.arange(4), int(x.numel()), {"labels": torch.tensor([0, 2, 2, 3])})

    def loss_fn(net, b):
        with mods.route(b.extra["labels"], p_cr=1.0):
            return token_losses(net, b.x, b.y).sum()

    train(model, batch_at, TrainConfig(steps=4, lr=1e-2, warmup=0, weight_decay=0.1), loss_fn=loss_fn)
    assert _same(core, mods.core_params()) and _same(sea, mods.module_params("sea"))
    assert not _same(dino, mods.module_params("dino"))        # trained on its rows
    mods.remove()


def test_plain_training_without_routing_updates_everything():
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    randomise_modules(mods)
    before = _snapshot(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with torch.no_grad(), mods.route(torch.tensor([0, 0, 0, 0])):   # a routed evaluation learns nothing
        model(ids())
    model(ids(), ids())[1].backward()
    assert mods.learned_flags() is None
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    mods.remove()


# ------------------------------------------------------------------ export and merge
def test_export_without_modules_equals_modules_off():
    model = gpt().eval()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    randomise_modules(mods)
    stock = mods.export()
    assert type(stock) is GPT and not any("aux_modules" in n for n, _ in stock.named_parameters())
    fresh = GPT(stock.config)
    fresh.load_state_dict(stock.state_dict())      # a stock checkpoint
    x = ids()
    with torch.no_grad(), mods.using(on=[]):
        off = model(x)[0]
    with torch.no_grad():
        assert torch.equal(stock(x)[0], off) and torch.equal(fresh(x)[0], off)
        assert not torch.allclose(model(x)[0], off, atol=1e-3)       # the original still has its modules
    mods.remove()
    with torch.no_grad():
        assert torch.equal(model(x)[0], off)                         # remove(): stock again, in place


@pytest.mark.parametrize("arch", ["gpt", "hf_gpt2"])
def test_merge_equals_modules_on(arch, request):
    model = gpt() if arch == "gpt" else request.getfixturevalue(arch)
    model.eval()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    randomise_modules(mods)
    x = ids()
    for on in (["sea"], ["forest", "dino"], {"space": 0.5, "sea": 1.0}):
        merged = mods.export(on=on)
        assert not any("aux_modules" in n for n, _ in merged.named_parameters())
        with torch.no_grad(), mods.using(on=on):
            a = out(model, x)
        with torch.no_grad():
            b = out(merged, x)
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), on
    if arch == "gpt":  # the merged checkpoint loads into a stock GPT of the wider config
        merged = mods.export(on=["sea"])
        assert merged.config.d_mlp == 40 + mods.width["transformer.h.0.mlp"]
        fresh = GPT(merged.config)
        fresh.load_state_dict(merged.state_dict())
        with torch.no_grad(), mods.using(on=["sea"]):
            assert torch.allclose(fresh(x)[0], model(x)[0], atol=1e-5)
    mods.remove()


def test_merge_gated_mlp_is_a_clear_error(hf_llama):
    mods = gr.add_modules(hf_llama, "model.layers.*.mlp", DOMAINS)
    randomise_modules(mods)
    with pytest.raises(ValueError, match="gated MLP"):
        mods.export(on=["sea"])
    stock = mods.export()   # modules off: always exact
    x = ids()
    with torch.no_grad(), mods.using(on=[]):
        assert torch.equal(stock(input_ids=x).logits, hf_llama(input_ids=x).logits)
    mods.remove()


def test_llama_routing_freezes_core():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(cfg)
    mods = gr.add_modules(model, "model.layers.*.mlp", DOMAINS)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with mods.route(torch.tensor([GENERAL, UNLABELLED])):
        model(input_ids=ids(2), labels=ids(2)).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    core = _snapshot(mods.core_params())
    with mods.route(torch.tensor([2, 2])):
        model(input_ids=ids(2), labels=ids(2)).loss.backward()
    opt.step()
    assert _same(core, mods.core_params())
    mods.remove()


# ------------------------------------------------------------------ the multi-topic corpus
def test_default_story_generator_output_unchanged():
    from gradroute.lm.corpus import generate_stories

    text = "\x00".join(generate_stories(500, seed=0) + generate_stories(300, seed=7, start=40, topic_fraction=0.5))
    # sha256 of the same call on main before the multi-topic generator was added
    assert hashlib.sha256(text.encode()).hexdigest() == \
        "168001f0019bbdb033d8237a87446eb81e6352f88a3810f6328823becf3a1592"


def test_topic_generator():
    from gradroute.lm.corpus import TOPICS, generate_topic_stories

    texts, labels = generate_topic_stories(1000, seed=0)
    assert (texts, labels) == generate_topic_stories(1000, seed=0)
    assert generate_topic_stories(10, seed=0, start=5) == (texts[5:15], labels[5:15])
    counts = {k: labels.count(k) for k in range(-1, 4)}
    assert all(60 < counts[k] < 140 for k in range(4)) and counts[-1] > 500
    for k, name in enumerate(TOPICS):
        own = [t for t, l in zip(texts, labels) if l == k]
        scenes = [s.split("{A}")[-1].rstrip(".") for s in TOPICS[name]["scenes"]]
        assert all(any(s in t for s in scenes) for t in own), name
        others = [t for t, l in zip(texts, labels) if l != k]
        assert not any(s in t for s in scenes for t in others[:200]), name
    with pytest.raises(ValueError, match="unknown topics"):
        generate_topic_stories(2, topics=("moon",))
    with pytest.raises(ValueError, match="topic_fraction"):
        generate_topic_stories(2, topic_fraction=0.5)


def test_default_topic_generator_output_unchanged():
    from gradroute.lm.corpus import generate_topic_stories

    texts, labels = generate_topic_stories(4000, seed=0)
    # sha256 of the same call on main before the topic_vocab option was added
    assert hashlib.sha256(("\n".join(texts[:500]) + str(labels[:500])).encode()).hexdigest() == \
        "246313ad0686f0e7e4343105eb12440a471a1b11fab5de8b80fde060e4581739"
    assert (texts, labels) == generate_topic_stories(4000, seed=0, topic_vocab="own")


def _words(text):
    return set(re.findall(r"[A-Za-z]+|[^\sA-Za-z]", text))


def test_shared_topic_vocabulary_uses_only_general_words():
    import copy

    from gradroute.lm import corpus as C

    before = copy.deepcopy(C.TOPICS)
    own_t, own_l = C.generate_topic_stories(3000, seed=0)
    texts, labels = C.generate_topic_stories(3000, seed=0, topic_vocab="shared")
    assert C.TOPICS == before                          # the own table is not touched
    assert labels == own_l                             # same labels and general stories
    assert all(a == b for a, b, l in zip(own_t, texts, labels) if l == C.GENERAL_TOPIC)
    general = set().union(*(_words(t) for t, l in zip(texts, labels) if l == C.GENERAL_TOPIC))
    shared_topic = [t for t, l in zip(texts, labels) if l != C.GENERAL_TOPIC]
    own_topic = [t for t, l in zip(own_t, own_l) if l != C.GENERAL_TOPIC]
    assert len(shared_topic) > 800
    for t in shared_topic:                             # every word of a shared-topic story is general
        assert _words(t) <= general, (t, _words(t) - general)
    assert all(_words(t) - general for t in own_topic)  # while own-vocabulary topics are not
    # the topics differ: each uses its own share of the general events, none of another topic's
    for k, name in enumerate(C.TOPIC_NAMES):
        mine = [e.split("{A}")[-1].split("{")[0] for e in C.SHARED_TOPICS[name]["events"]]
        stories = [t for t, l in zip(texts, labels) if l == k]
        assert stories and all(any(e in t for e in mine) for t in stories), name
        for j, other in enumerate(C.TOPIC_NAMES):
            if j != k:
                assert not set(C.SHARED_TOPICS[name]["events"]) & set(C.SHARED_TOPICS[other]["events"])
                assert not set(C.SHARED_TOPICS[name]["dialogue"]) & set(C.SHARED_TOPICS[other]["dialogue"])
                assert not set(C.SHARED_TOPICS[name]["places"]) & set(C.SHARED_TOPICS[other]["places"])
    with pytest.raises(ValueError, match="topic_vocab"):
        C.generate_topic_stories(2, topic_vocab="mixed")


# ------------------------------------------------------------------ DDP (2 gloo processes)
# same gradients as one process, every rank steps the same owners (learned flags all-reduced),
# frozen owners bit-identical
DDP_DOMAINS = ["a", "b", "c"]


# the options (ours) run in the same processes: the embedding learning on core-frozen rows (its
# "learned" flag all-reduced with the owners') and the per-module embedding deltas
DDP_OPTIONS = {"plain": {}, "options": dict(always_learn=["transformer.wte.weight"], embed_delta=True),
               # keyed modules with full-vocabulary deltas: their gates are computed per rank from its own rows
               "keyed": dict(embed_delta=True, keys={"a": list(range(0, 12)), "b": list(range(12, 30)),
                                                     "c": list(range(40, 64))})}


def ddp_make(options="plain"):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=2, n_head=2, d_model=16, d_mlp=32))
    mods = gr.add_modules(model, "transformer.h.*.mlp", DDP_DOMAINS, width=4, **DDP_OPTIONS[options])
    return model, mods


def ddp_data(step):
    x = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(step))
    # step 0: rank 0 holds domain-"a" rows only (core frozen there), rank 1 general rows: module "a"
    # learns on rank 0 alone, so the ranks must agree to step it. Step 1: only domain "b" rows.
    labels = torch.tensor([0, 0, GENERAL, GENERAL]) if step == 0 else torch.tensor([1, 1, 1, 1])
    return x, labels


def ddp_train_steps(net, mods, opt, rank=None):
    snaps = []
    for step in range(2):
        x, labels = ddp_data(step)
        if rank is not None:
            x, labels = x[2 * rank:2 * rank + 2], labels[2 * rank:2 * rank + 2]
        with mods.route(labels, p_cr=1.0):
            loss = net(x, x, reduction="sum")[1] / 32 * (1 if rank is None else 2)   # DDP averages
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        snaps.append({n: p.detach().clone() for n, p in mods.model.named_parameters()})
    return snaps


def ddp_worker(rank, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for options in DDP_OPTIONS:
            model, mods = ddp_make(options)
            net = DDP(model)          # plain DDP: every parameter must be in each rank's graph
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            snaps = ddp_train_steps(net, mods, opt, rank)
            mods.remove()
            torch.save(snaps, f"{path}.{options}.{rank}")
            dist.barrier()
    finally:
        dist.destroy_process_group()


def test_module_routing_under_ddp(tmp_path):
    path = str(tmp_path / "snaps")
    spawn2(ddp_worker, path)
    r0, r1 = torch.load(f"{path}.plain.0"), torch.load(f"{path}.plain.1")
    model, mods = ddp_make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    single = ddp_train_steps(model, mods, opt)
    for step in range(2):
        for n in single[step]:
            assert torch.equal(r0[step][n], r1[step][n]), (step, n)               # ranks agree
            assert torch.allclose(r0[step][n], single[step][n], atol=1e-6), (step, n)
    start = dict(ddp_make()[0].named_parameters())
    for n in single[0]:
        moved = not torch.equal(single[0][n], start[n])
        if ".aux_modules.b." in n or ".aux_modules.c." in n:
            assert not moved, n                      # no rows for them on step 0
        elif ".aux_modules.a.up." not in n:   # (up gets zero gradient while down is still 0)
            assert moved, n
        if ".aux_modules.b." not in n:                # step 1: only module "b" learns
            assert torch.equal(r0[1][n], r0[0][n]), n
        elif not n.endswith("up.bias"):               # (its up.bias: zero gradient and no decay)
            assert not torch.equal(r0[1][n], r0[0][n]), n
    # with the options: the same agreement with one process; on step 1 (domain "b" rows only, core
    # frozen) the token embedding and b's module and delta move, nothing else
    o0, o1 = torch.load(f"{path}.options.0"), torch.load(f"{path}.options.1")
    model, mods = ddp_make("options")
    single = ddp_train_steps(model, mods, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    assert "aux_embed.b.weight" in single[1]
    for step in range(2):
        for n in single[step]:
            assert torch.equal(o0[step][n], o1[step][n]), (step, n)
            assert torch.allclose(o0[step][n], single[step][n], atol=1e-6), (step, n)
    for n in single[1]:
        moves = n == "transformer.wte.weight" or (".aux_modules.b." in n and not n.endswith("up.bias")) \
            or n == "aux_embed.b.weight"
        assert torch.equal(o0[1][n], o0[0][n]) != moves, n
    # keyed: the same agreement; on step 1 only b's module and delta move
    k0, k1 = torch.load(f"{path}.keyed.0"), torch.load(f"{path}.keyed.1")
    model, mods = ddp_make("keyed")
    single = ddp_train_steps(model, mods, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    for step in range(2):
        for n in single[step]:
            assert torch.equal(k0[step][n], k1[step][n]), (step, n)
            assert torch.allclose(k0[step][n], single[step][n], atol=1e-6), (step, n)
    for n in single[1]:
        moves = (".aux_modules.b." in n and not n.endswith("up.bias")) or n == "aux_embed.b.weight"
        assert torch.equal(k0[1][n], k0[0][n]) != moves, n


# ------------------------------------------------------------------ the experiment's pieces
def test_compute_ratio_inverts_the_fitted_curve():
    from gradroute.experiments.modules import CR_CAP, compute_ratio, fit_power_law

    steps = [10, 20, 40, 80, 160, 320]
    losses = [2.0 + 5.0 * s ** -0.7 for s in steps]
    fit = fit_power_law(steps, losses)
    assert fit["rmse"] < 1e-3
    for s in (15, 100, 320):
        assert compute_ratio(2.0 + 5.0 * s ** -0.7, fit, 320) == pytest.approx(s / 320, rel=0.02)
    assert compute_ratio(fit["c"] - 0.1, fit, 320) == CR_CAP


def test_experiment_labels_and_filters():
    from gradroute.experiments.modules import allowed_for, routing_labels, unlabelled_subset

    labels = torch.tensor([0, 1, -1, 3, -1, 0])
    unl = torch.tensor([True, False, True, False, False, False])
    assert routing_labels(labels, None).tolist() == [0, 1, GENERAL, 3, GENERAL, 0]
    assert routing_labels(labels, unl).tolist() == [UNLABELLED, 1, UNLABELLED, 3, GENERAL, 0]
    assert allowed_for("filter_forest", labels, unl).tolist() == [False, True, True, True, True, False]
    assert allowed_for("filter_all", labels, unl).tolist() == [False, False, True, False, True, False]
    # partial: only labelled topic stories are dropped
    assert allowed_for("filter_partial", labels, unl).tolist() == [True, False, True, False, True, False]
    assert allowed_for("modular", labels, unl) is None
    m = unlabelled_subset(1000, 0.5, seed=3)
    assert int(m.sum()) == 500 and torch.equal(m, unlabelled_subset(1000, 0.5, seed=3))


def _tiny_experiment(tmp_path, monkeypatch, steps, curve_points, modules, attack_rounds):
    """The modules experiment at toy size as the `quick` profile; returns (module, its parser)."""
    import argparse

    from gradroute.experiments import modules as E

    tiny = dict(
        corpus=dict(n_train=400, topic_fraction=0.1, n_eval=6, n_val=6, n_attack=6, n_general_eval=6),
        vocab_size=300, model=dict(n_ctx=48, n_layer=1, n_head=2, d_model=16, d_mlp=32),
        train=dict(steps=steps, lr=3e-3, warmup=1), batch_size=8, curve_points=curve_points,
        modules=modules, unlabelled_fraction=0.5,
        attack=dict(topic="sea", rounds=attack_rounds, patience=2, lr_factor=0.25),
        ascent=dict(steps=2, lr_factor=0.1, eval_every=1, max_general_increase=0.05), seeds=1)
    monkeypatch.setitem(E.PROFILES, "quick", tiny)
    monkeypatch.setenv("GRADROUTE_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--device", default="cpu")
    E.add_arguments(parser)
    return E, parser


def test_experiment_end_to_end_tiny(tmp_path, monkeypatch):
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=8, curve_points=4,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.25), attack_rounds=3)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "base", "modular",
                              "filter_sea", "demix", "modular_partial", "filter_partial"])
    m = E.run(args)
    T = m["summary"]["table"]
    assert len(T["modular"]) == 16 and len(T["demix"]) == 16
    assert set(T["modular"]["none"]) == set(E.SETS)
    assert "sea" in m["summary"]["attack_topic"] and set(m["summary"]["attack"]) == {"modular", "filter_sea",
                                                                                      "ascent", "base"}
    assert any("single module off" in k for k in m["claims"])
    assert any("50% unlabelled" in k for k in m["claims"])     # the partial-label claim is checked
    rep = E.report(tmp_path / "o")
    assert rep["figures"] and rep["table"]["rows"] and rep["verdict"] in ("reproduced", "partly", "not")
    assert (tmp_path / "o" / "modular_config_heatmap.png").exists()
    again = E.run(args)           # resumable: finished runs are loaded, not retrained
    assert again["summary"]["table"]["modular"] == T["modular"]


def test_spread_each_switches_modules_independently():
    mods = gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS)
    fwd, learn = mods.masks(torch.full((400,), GENERAL), p_as=0.5, generator=torch.Generator().manual_seed(0),
                            spread="each")
    on = fwd[:, 1:].sum(1)
    assert on.max() >= 3 and 1.6 < on.mean() < 2.4 and torch.equal(learn[:, 1:], fwd[:, 1:].bool())
    with pytest.raises(ValueError, match="spread"):
        mods.masks(torch.tensor([GENERAL]), spread="some")


def test_select_schedule_rule():
    from gradroute.experiments.modules import SETS, TOPIC_NAMES, config_name, select_schedule

    def cand(off_topic, elsewhere, own=1.0):
        """val losses: all on 1.0 everywhere; with one module off its topic at off_topic, others moved;
        with only one module on, its topic at ``own``."""
        res = {}
        for on in [tuple(TOPIC_NAMES)] + [tuple(x for x in TOPIC_NAMES if x != t) for t in TOPIC_NAMES] + \
                [(t,) for t in TOPIC_NAMES]:
            row = {n: 1.0 for n in SETS}
            for t in TOPIC_NAMES:
                if t not in on and len(on) == len(TOPIC_NAMES) - 1:
                    row = {n: (off_topic if n == t else 1.0 + elsewhere) for n in SETS}
            if len(on) == 1:
                row[on[0]] = own
            res[config_name(on)] = row
        return res
    filt = {t: 4.0 for t in TOPIC_NAMES}
    # candidate 0: weak removal but no interference; 1: removal ok, interference 0.3; 2: removal ok, 0.1
    out = select_schedule([cand(2.0, 0.0), cand(3.8, 0.3), cand(3.7, -0.1)], filt, removal=0.9)
    assert out["chosen"] == 2 and out["any_removal_ok"]
    assert [r["removal_ok"] for r in out["rows"]] == [False, True, True]
    assert out["rows"][1]["interference"] == pytest.approx(0.3)
    # none removes enough: the strongest removal is taken
    out = select_schedule([cand(2.0, 0.0), cand(3.0, 0.5)], filt, removal=0.9)
    assert out["chosen"] == 1 and not out["any_removal_ok"]
    # usefulness (own module only vs base): a candidate that removes but whose modules did not learn
    # their topic does not qualify; the useful one with removal ok is taken despite more interference
    base = {t: 1.0 for t in TOPIC_NAMES}
    out = select_schedule([cand(3.8, 0.1, own=3.0), cand(3.7, 0.3, own=1.05)], filt, 0.9, base, useful=1.1)
    assert out["chosen"] == 1 and out["any_qualifies"]
    assert [r["useful_ok"] for r in out["rows"]] == [False, True]
    assert out["rows"][0]["useful_ratio_max"] == pytest.approx(3.0)
    # nobody qualifies: the smallest worst shortfall (removal 0.9/0.5 = 1.8 vs usefulness 1.5/1.1 = 1.36)
    out = select_schedule([cand(4.0, 0.0, own=5.0), cand(2.0, 0.0, own=1.0), cand(3.2, 0.2, own=1.5)], filt, 0.9,
                          base, useful=1.1)
    assert not out["any_qualifies"] and out["chosen"] == 2
    assert out["rows"][2]["shortfall"] == pytest.approx(1.5 / 1.1)


def test_interference_by_token_splits_shared_and_topic_only():
    from gradroute.experiments.modules import SETS, TOPIC_NAMES, general_token_ids, interference_by_token
    from gradroute.lm.data import Stories

    g = torch.Generator().manual_seed(0)

    def stories(lo, hi, n=3, T=16):
        x = torch.randint(lo, hi, (n, T), generator=g)
        y = torch.cat([x[:, 1:], torch.full((n, 1), -100)], 1)
        z = torch.zeros(n, dtype=torch.bool)
        return Stories(x, y, torch.zeros_like(x, dtype=torch.bool), z, z)
    # general stories use tokens 0..31; topic stories 0..63 (so 32..63 are topic-only)
    train = stories(0, 32, n=4)
    labels = torch.full((4,), -1)
    shared = general_token_ids(train, labels, 64)
    assert shared[:32].any() and not shared[32:].any()
    sets = {n: stories(0, 64) for n in TOPIC_NAMES}
    sets["general"] = train
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", list(TOPIC_NAMES))
    model.eval()
    res = interference_by_token(model, mods, sets, shared)
    assert set(res) == set(TOPIC_NAMES) and all(t not in res[t] for t in TOPIC_NAMES)
    assert all(v["all"] == 0.0 for a in res for v in res[a].values())      # zero-initialised modules: no effect
    randomise_modules(mods)
    res = interference_by_token(model, mods, sets, shared)
    d = res["forest"]["sea"]
    assert d["all"] != 0.0
    f = d["topic_only_fraction"]
    assert 0 < f < 1 and d["all"] == pytest.approx((1 - f) * d["shared"] + f * d["topic_only"], abs=1e-5)
    assert res["forest"]["general"]["topic_only"] is None and res["forest"]["general"]["topic_only_fraction"] == 0


def test_experiment_selects_schedule_on_validation(tmp_path, monkeypatch):
    sel = dict(seeds=[7], removal=0.9, useful=1.1, candidates=[dict(p_cr=1.0, p_as=0.5, spread="one"),
                                                   dict(p_cr=0.7, p_as=0.5, spread="each")])
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=6, curve_points=3,
                                 modules=dict(width=0.1, p_cr=0.5, p_as=0.1, spread="one", select=sel),
                                 attack_rounds=2)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "base", "modular",
                              "--no-attack"])
    m = E.run(args)
    s = m["selection"]
    assert s["seeds"] == [7] and len(s["rows"]) == 2 and s["schedule"] == sel["candidates"][s["chosen"]]
    # the headline runs use the chosen schedule, and the selection runs are separate (val split, seed 7)
    assert {k: m["config"]["modules"][k] for k in ("p_cr", "p_as", "spread")} == s["schedule"]
    assert (tmp_path / "o" / "select" / "c1" / "runs" / "modular_s7.json").exists()
    # usefulness needs the base model of the selection seed (trained with the filters)
    assert (tmp_path / "o" / "select" / "filters" / "runs" / "base_s7.json").exists()
    assert all(r["useful_ratio_max"] > 0 for r in s["rows"]) and s["useful"] == 1.1
    assert "interference_by_token" in m["runs"]["modular_s0"]
    assert "val_configs" in m["runs"]["modular_s0"] and set(m["seeds"]) == {0}
    # an explicit schedule skips selection; a selection seed that is also an evaluation seed is refused
    args2 = parser.parse_args(["--out", str(tmp_path / "o2"), "--workers", "1", "--methods", "modular",
                               "--no-attack", "--p-cr", "1.0", "--seeds", "0"])
    assert E.run(args2)["selection"] is None
    args3 = parser.parse_args(["--out", str(tmp_path / "o3"), "--workers", "1", "--methods", "modular",
                               "--no-attack", "--seeds", "7"])
    with pytest.raises(ValueError, match="evaluation seeds"):
        E.run(args3)


def test_topic_vocab_flag_reaches_config_report_and_run_key(tmp_path, monkeypatch):
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=2, curve_points=2,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.5), attack_rounds=1)
    assert parser.parse_args(["--out", "x"]).topic_vocab == "own"
    assert E.build_config(parser.parse_args(["--out", "x"]))["corpus"]["topic_vocab"] == "own"
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "base", "modular", "--no-attack"]
    m = E.run(parser.parse_args([*common, "--topic-vocab", "shared"]))
    assert m["config"]["corpus"]["topic_vocab"] == "shared" and m["summary"]["topic_vocab"] == "shared"
    assert "Topic vocabulary: shared" in (tmp_path / "o" / "summary.md").read_text()
    assert "topic vocabulary shared" in E.report(tmp_path / "o")["detail"]
    run_file = tmp_path / "o" / "runs" / "base_s0.json"
    assert E.read_json(run_file)["config"]["corpus"]["topic_vocab"] == "shared"
    # the same out directory with the other vocabulary retrains instead of resuming the shared runs
    own = E.run(parser.parse_args(common))
    assert E.read_json(run_file)["config"]["corpus"]["topic_vocab"] == "own"
    assert own["runs"]["base_s0"]["val_losses"] != m["runs"]["base_s0"]["val_losses"]
    with pytest.raises(SystemExit):
        parser.parse_args([*common, "--topic-vocab", "mixed"])


def test_partial_label_runs_use_the_official_partial_schedule(tmp_path, monkeypatch):
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=2, curve_points=2,
                                 modules=dict(width=0.1, p_cr=0.7, p_as=0.5, spread="each", p_other=0.5,
                                              partial=dict(p_cr=1.0, p_as=0.2, spread="one", p_other=0.0)),
                                 attack_rounds=1)
    seen = {}
    real = E.modular_loss

    def spy(mods, route_labels, p_cr, p_as, seed, spread="one", p_other=0.0):
        seen[bool((route_labels == UNLABELLED).any())] = (p_cr, p_as, spread, p_other)
        return real(mods, route_labels, p_cr, p_as, seed, spread, p_other=p_other)
    monkeypatch.setattr(E, "modular_loss", spy)
    args = parser.parse_args(["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular",
                              "modular_partial", "--no-attack"])
    E.run(args)
    assert seen == {False: (0.7, 0.5, "each", 0.5), True: (1.0, 0.2, "one", 0.0)}
    assert E.PROFILES["paper"]["modules"]["partial"] == E.PARTIAL


def test_p_other_flag_reaches_config_and_run_key(tmp_path, monkeypatch):
    """--p-other is part of the config and of every run's resume key; p_other 0 trains exactly the
    model that the schedule without p_other trains."""
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=3, curve_points=2,
                                 modules=dict(width=0.1, p_cr=0.7, p_as=0.5, spread="one"), attack_rounds=1)
    cfg = E.build_config(parser.parse_args(["--out", "x", "--p-other", "0.5"]))
    assert cfg["modules"]["p_other"] == 0.5 and "select" not in cfg["modules"]
    assert E.PROFILES["paper"]["modules"]["p_other"] == 0.0 and E.PARTIAL["p_other"] == 0.0
    with pytest.raises(ValueError, match="p-other"):
        E.build_config(parser.parse_args(["--out", "x", "--p-other", "2"]))
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular", "--no-attack"]
    without = E.run(parser.parse_args(common))["runs"]["modular_s0"]
    run_file = tmp_path / "o" / "runs" / "modular_s0.json"
    assert "p_other" not in E.read_json(run_file)["config"]["modules"]
    zero = E.run(parser.parse_args([*common, "--p-other", "0"]))["runs"]["modular_s0"]
    assert E.read_json(run_file)["config"]["modules"]["p_other"] == 0.0        # retrained under its own key
    assert zero["configs"] == without["configs"] and zero["val_configs"] == without["val_configs"]
    one = E.run(parser.parse_args([*common, "--p-other", "1"]))
    assert E.read_json(run_file)["config"]["modules"]["p_other"] == 1.0
    assert one["runs"]["modular_s0"]["configs"] != without["configs"]
    assert "p_other 1.0" in E.report(tmp_path / "o")["detail"]


# ------------------------------------------------------------------ always_learn (embeddings free; ours)
def test_always_learn_embedding_moves_on_domain_steps_core_stays_bit_identical():
    """With the token embedding (tied unembedding) in always_learn and p_cr 1, a domain-only step under
    AdamW moves the embedding (with its true gradient) while every other core weight and the other
    modules stay bit-identical (moments and weight decay included)."""
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, always_learn=["transformer.wte.weight"])
    assert model.lm_head.weight is model.transformer.wte.weight            # tied
    randomise_modules(mods)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    # mixed steps first: every owner has Adam moments
    _routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL, UNLABELLED], 0, p_as=0.5, generator=g)
    wte = model.transformer.wte.weight
    frozen = [p for p in mods.core_params() if p is not wte]
    assert len(frozen) == len(mods.core_params()) - 1
    # the embedding's gradient on core-frozen rows is its ordinary gradient (the core is frozen, not cut)
    x = ids(3, seed=30)
    fwd, learn = mods.masks(torch.tensor([0, 0, 0]), p_cr=1.0)
    with mods.route(forward=fwd, learn=torch.ones_like(learn)):
        model(x, x)[1].backward()
    plain = wte.grad.clone()
    opt.zero_grad(set_to_none=True)
    mods._pending, mods._free_pending = None, False          # that pass was a probe, not a step
    core, emb = _snapshot(frozen), wte.detach().clone()
    others, forest = [_snapshot(mods.module_params(d)) for d in DOMAINS[1:]], _snapshot(mods.module_params("forest"))
    for s in range(3):   # forest stories only, core frozen
        with mods.route(torch.tensor([0, 0, 0]), p_cr=1.0):
            xs = x if s == 0 else ids(3, seed=30 + s)
            model(xs, xs)[1].backward()
        if s == 0:
            assert torch.allclose(wte.grad, plain, atol=1e-6)
            assert all(p.grad is None or not p.grad.any() for p in frozen)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert _same(core, frozen)
    for snap, d in zip(others, DOMAINS[1:]):
        assert _same(snap, mods.module_params(d)), d
    assert not _same(forest, mods.module_params("forest"))
    assert not torch.equal(emb, wte)
    mods.remove()


def test_always_learn_default_off_and_bad_names():
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS)
    assert mods.always_learn == []
    mods.remove()
    with pytest.raises(ValueError, match="unknown parameter 'transformer.wte.weigth'.*transformer.wte.weight"):
        gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS, always_learn=["transformer.wte.weigth"])
    with pytest.raises(ValueError, match="module parameter"):
        gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS,
                       always_learn=["transformer.h.0.mlp.aux_modules.sea.up.weight"])
    tied = gr.add_modules(gpt(), "transformer.h.*.mlp", DOMAINS, always_learn="lm_head.weight")  # either name
    assert tied.always_learn == ["lm_head.weight"]
    tied.remove()


def test_refused_options_leave_the_model_unchanged(hf_gpt2):
    """A refused always_learn / embed_delta raises before the model is changed (no modules or hooks
    left behind, so a corrected call works); embed_delta refuses models other than our GPT (a Hugging
    Face GPT-2 called with input_ids= would get the output delta only) and untied embeddings."""
    untied = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=1, n_head=2, d_model=16, d_mlp=40, tie_embeddings=False))
    for model, kw, msg in ((gpt(), dict(always_learn=["transformer.wte.weigth"]), "unknown parameter"),
                           (gpt(), dict(always_learn=["aux_embed.sea.weight"]), "module parameter"),
                           (untied, dict(embed_delta=True), "tied"),
                           (hf_gpt2, dict(embed_delta=True), "gradroute.models.GPT.*GPT2LMHeadModel")):
        names = [n for n, _ in model.named_parameters()]
        with pytest.raises(ValueError, match=msg):
            gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, **kw)
        assert [n for n, _ in model.named_parameters()] == names
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        gr.add_modules(model, "transformer.h.*.mlp", DOMAINS).remove()       # a corrected call works


def test_embed_free_flag_reaches_config_and_run_key(tmp_path, monkeypatch):
    """--embed-free is in the config and every run's resume key only when on (default configs unchanged);
    with it the embedding learns on core-frozen topic stories, so the model differs."""
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=3, curve_points=2,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.5, spread="one"), attack_rounds=1)
    assert "embed_free" not in E.build_config(parser.parse_args(["--out", "x"]))["modules"]
    assert E.build_config(parser.parse_args(["--out", "x", "--embed-free"]))["modules"]["embed_free"] is True
    seen = []
    real = E.attach_modules

    def spy(model, cfg, method, embed_free=False, **kw):
        mods = real(model, cfg, method, embed_free, **kw)
        seen.append((method, tuple(mods.always_learn)))
        return mods
    monkeypatch.setattr(E, "attach_modules", spy)
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular", "--no-attack"]
    off = E.run(parser.parse_args(common))["runs"]["modular_s0"]
    run_file = tmp_path / "o" / "runs" / "modular_s0.json"
    assert "embed_free" not in E.read_json(run_file)["config"]["modules"]
    assert seen == [("modular", ())]
    on = E.run(parser.parse_args([*common, "--embed-free"]))
    assert E.read_json(run_file)["config"]["modules"]["embed_free"] is True     # retrained under its own key
    assert seen[-1] == ("modular", E.EMBED_PARAMS)
    assert on["runs"]["modular_s0"]["configs"] != off["configs"]
    assert "token embedding free" in E.report(tmp_path / "o")["detail"]


# ------------------------------------------------------------------ per-module embedding deltas (ours)
def test_embed_delta_function_unchanged_and_off_means_no_delta():
    """embed_delta=True: a zero (vocab, d) delta per domain; the function is unchanged at init (plain,
    routed); a module switched off (per example in a routed batch, or at inference) contributes no
    delta at all, so zeroing its delta leaves those outputs bit-identical; routed rows equal `using`."""
    model = gpt()
    model.eval()
    x = ids()
    with torch.no_grad():
        before = model(x)[0]
        mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, embed_delta=True)
        assert torch.equal(before, model(x)[0])
        with mods.route(torch.tensor([0, GENERAL, UNLABELLED, 3]), p_cr=1.0, p_as=1.0, spread="each",
                        generator=torch.Generator().manual_seed(0)):
            assert torch.equal(before, model(x)[0])
    delta = model.aux_embed.forest.weight
    assert delta.shape == model.transformer.wte.weight.shape and "aux_embed.forest.weight" in model.state_dict()
    assert any(p is delta for p in mods.module_params("forest"))
    assert not any(p is delta for p in mods.module_params("sea") + mods.core_params())
    randomise_modules(mods)
    fwd = torch.tensor([[1., 1, 0, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    with torch.no_grad():
        with mods.route(forward=fwd, learn=fwd.bool()):
            routed = model(x)[0]
        with mods.using(off=["forest"]):
            off = model(x)[0]
        for i in range(4):        # each routed row is the model with that row's modules on
            with mods.using(on=[d for k, d in enumerate(DOMAINS) if fwd[i, 1 + k]]):
                assert torch.allclose(routed[i], model(x[i:i + 1])[0][0], atol=1e-5)
        saved = delta.clone()
        delta.zero_()
        with mods.route(forward=fwd, learn=fwd.bool()):
            routed0 = model(x)[0]
        with mods.using(off=["forest"]):
            assert torch.equal(off, model(x)[0])
        forest_on = fwd[:, 1].bool()
        assert torch.equal(routed0[~forest_on], routed[~forest_on])
        assert not torch.allclose(routed0[forest_on], routed[forest_on])
        delta.copy_(saved)
    mods.remove()
    assert "aux_embed.forest.weight" not in model.state_dict() and torch.equal(model(x)[0], before)


def test_embed_delta_isolation_under_adamw():
    """The delta learns exactly where its module learns: in a mixed batch its gradient is that of the
    rows where it learns (not of rows where it only runs); on core-frozen forest-only steps under AdamW
    every core weight (wte included) and the other modules' deltas stay bit-identical, forest's moves."""
    model = gpt()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, embed_delta=True)
    randomise_modules(mods)
    delta = model.aux_embed.forest.weight
    x = ids(2, seed=7)
    # row 0: forest story (forest learns); row 1: sea story on which forest runs without learning
    fwd = torch.tensor([[1., 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    learn = torch.tensor([[True, True, False, False, False], [True, False, True, False, False]])
    with mods.route(forward=fwd, learn=learn):
        model(x, x, reduction="none")[1].sum().backward()
    mixed = delta.grad.clone()
    model.zero_grad(set_to_none=True)
    with mods.route(forward=fwd[:1], learn=learn[:1]):
        model(x[:1], x[:1], reduction="none")[1].sum().backward()
    assert torch.allclose(mixed, delta.grad, atol=1e-6) and delta.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    mods._pending = None                                      # probes, not steps
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    # mixed steps first: every owner (each delta included) has Adam moments
    _routed_steps(model, mods, opt, [0, 1, 2, 3, GENERAL, UNLABELLED], 0, p_as=0.5, generator=g)
    core = mods.core_params()
    assert any(p is model.transformer.wte.weight for p in core)
    before, others = _snapshot(core), [_snapshot(mods.module_params(d)) for d in DOMAINS[1:]]
    forest = delta.detach().clone()
    _routed_steps(model, mods, opt, [0, 0, 0], 20, p_cr=1.0)
    assert _same(before, core)
    for snap, d in zip(others, DOMAINS[1:]):
        assert _same(snap, mods.module_params(d)), d
    assert not torch.equal(forest, delta)
    mods.remove()


def test_embed_delta_export_merges_into_tied_embedding():
    model = gpt()
    model.eval()
    mods = gr.add_modules(model, "transformer.h.*.mlp", DOMAINS, embed_delta=True)
    randomise_modules(mods)
    x = ids()
    with torch.no_grad():
        for on in (["sea", "space"], {"sea": 0.5}):
            stock = mods.export(on=on)
            assert type(stock) is GPT and not hasattr(stock, "aux_embed")
            assert stock.lm_head.weight is stock.transformer.wte.weight        # still tied
            with mods.using(on=on):
                assert torch.allclose(stock(x)[0], model(x)[0], atol=1e-5)
            fresh = GPT(copy.deepcopy(stock.config))
            fresh.load_state_dict(stock.state_dict())
            assert torch.equal(fresh(x)[0], stock(x)[0])
        plain = mods.export()
        with mods.using(on=[]):
            assert torch.equal(plain(x)[0], model(x)[0])
        assert torch.equal(plain.transformer.wte.weight, model.transformer.wte.weight)
    untied = GPT(GPTConfig(vocab_size=64, n_ctx=16, n_layer=1, n_head=2, d_model=16, d_mlp=40, tie_embeddings=False))
    with pytest.raises(ValueError, match="tied"):
        gr.add_modules(untied, "transformer.h.*.mlp", DOMAINS, embed_delta=True)


def test_module_embed_flag_reaches_config_run_key_and_attack(tmp_path, monkeypatch):
    """--module-embed is in the config and every run's resume key only when on; the modular model then
    carries the deltas (state dict), and the attack stage reloads and exports it."""
    E, parser = _tiny_experiment(tmp_path, monkeypatch, steps=3, curve_points=2,
                                 modules=dict(width=0.1, p_cr=1.0, p_as=0.5, spread="one"), attack_rounds=1)
    assert "module_embed" not in E.build_config(parser.parse_args(["--out", "x"]))["modules"]
    assert E.build_config(parser.parse_args(["--out", "x", "--module-embed"]))["modules"]["module_embed"] is True
    common = ["--out", str(tmp_path / "o"), "--workers", "1", "--methods", "modular", "--no-attack"]
    off = E.run(parser.parse_args(common))["runs"]["modular_s0"]
    run_file = tmp_path / "o" / "runs" / "modular_s0.json"
    assert "module_embed" not in E.read_json(run_file)["config"]["modules"]
    on = E.run(parser.parse_args([*common[:-1], "--module-embed"]))        # with the attack this time
    assert E.read_json(run_file)["config"]["modules"]["module_embed"] is True   # retrained under its own key
    state = torch.load(tmp_path / "o" / "models" / "modular_s0.pt", weights_only=True)
    assert any(k.startswith("aux_embed.") for k in state)
    assert on["runs"]["modular_s0"]["configs"] != off["configs"]
    assert "modular" in on["attacks"]["0"]["attack"]
    assert "per-module token-embedding deltas" in E.report(tmp_path / "o")["detail"]
