"""Module routing: keyed modules (ours) and their embedding deltas. A module runs from the first of its key tokens
on; its delta sits on its rows of the tied embeddings (our GPT, Hugging Face GPT-2) and acts where its gate is
open; the gates of a forward are not reused outside it; Hugging Face caches, padding and checkpointing."""
import pytest
import torch

import gradroute as gr
from gradroute.modules import key_gates


def test_key_gates_open_at_the_first_key_and_stay_open(modkit):
    mods = modkit.keyed(modkit.gpt())
    x = torch.tensor([[1, 2, 12, 2, 2, 40],       # forest key at 2, dino key at 5
                      [5, 2, 2, 2, 2, 2],         # 5 is a key of forest and dino
                      [1, 1, 1, 1, 1, 1]])        # no key
    g = mods.key_gates(x)
    assert g.shape == (4, 3, 6) and g.dtype == torch.bool
    assert g[0, 0].tolist() == [False, False, True, True, True, True]
    assert g[3, 0].tolist() == [False] * 5 + [True]
    assert g[0, 1].all() and g[3, 1].all() and not g[1, 1].any() and not g[2, 1].any()
    assert not g[:, 2].any()


def test_key_gates_pure_function_matches_the_module_set(modkit):
    keymask = torch.zeros(2, 10, dtype=torch.bool)
    keymask[0, [3]] = True
    keymask[1, [5, 6]] = True
    x = torch.tensor([[1, 3, 1, 5, 6, 1], [-1, 5, 1, 1, 1, 1]])      # -1: no token (padding)
    assert key_gates(keymask, x).tolist() == [[[False, True, True, True, True, True], [False] * 6],
                                             [[False, False, False, True, True, True], [False, True, True, True, True, True]]]
    assert key_gates(keymask, x, "majority")[0, 0].tolist() == [False, True, True, True, False, False]
    mods = modkit.keyed(modkit.gpt())
    y = modkit.ids(2, 8)
    assert torch.equal(mods.key_gates(y), key_gates(mods.keyed.keymask, y))


def test_keyed_module_changes_nothing_before_its_keys_and_acts_after(modkit):
    """The input delta of a token that is not a key acts only once the gate is open."""
    model = modkit.gpt()
    model.eval()
    mods = modkit.keyed(model, rows={d: list(range(64)) for d in modkit.DOMAINS})
    modkit.randomise_modules(mods)
    plain = modkit.plain_ids()
    keyed = plain.clone()
    keyed[:, 4] = 12                                  # a forest key (only forest's) at position 4
    with torch.no_grad():
        with mods.using(on=[]):
            off_plain, off_keyed = model(plain)[0], model(keyed)[0]
        with mods.using(on=None):                     # every module on
            on_plain, on_keyed = model(plain)[0], model(keyed)[0]
        with mods.using(on=["sea", "space", "dino"]):
            others_keyed = model(keyed)[0]
    # text without any key: every module switched on changes nothing, bit for bit
    assert torch.equal(on_plain, off_plain)
    # forest's key at 4: positions 0-3 untouched, 4 on changed by forest only
    assert torch.equal(on_keyed[:, :4], off_keyed[:, :4])
    assert (on_keyed[:, 4:] - off_keyed[:, 4:]).abs().amax() > 1e-3
    assert torch.equal(others_keyed, off_keyed)


def test_keyed_gate_open_everywhere_equals_the_ungated_module(modkit):
    """A sequence starting with a key: keyed modules compute what ungated ones with the same weights do."""
    model, ref = modkit.gpt(), modkit.gpt()
    model.eval(), ref.eval()
    mods = modkit.keyed(model, rows=False)
    plain_mods = gr.add_modules(ref, "transformer.h.*.mlp", modkit.DOMAINS)
    modkit.randomise_modules(mods)
    ref.load_state_dict(model.state_dict())
    x = modkit.plain_ids()
    x[:, 0] = 12                                      # forest key first: forest's gate is open everywhere
    with torch.no_grad(), mods.using(on=["forest"]), plain_mods.using(on=["forest"]):
        assert torch.equal(model(x)[0], ref(x)[0])
    # with embedding deltas: a key first acts as keys that open every gate at the first token
    a, b = modkit.gpt(), modkit.gpt()
    a.eval(), b.eval()
    ma, mb = modkit.keyed(a), modkit.open_rows(b)
    modkit.randomise_modules(ma)
    b.load_state_dict(a.state_dict(), strict=False)
    with torch.no_grad(), ma.using(on=["forest"]), mb.using(on=["forest"]):
        assert torch.equal(a(x)[0], b(x)[0])


def test_keyed_routed_pass_equals_inference_strengths(modkit):
    model = modkit.gpt()
    model.eval()
    mods = modkit.keyed(model)
    modkit.randomise_modules(mods)
    x = modkit.ids()
    x[:, 2] = 9                                       # forest's and sea's key
    fwd = torch.tensor([[1.0, 1, 1, 0, 1]] * 4)
    with torch.no_grad():
        with mods.using(on=["forest", "sea", "dino"]):
            want = model(x)[0]
        with mods.route(forward=fwd, learn=fwd.bool()):
            got = model(x)[0]
    assert torch.allclose(got, want, atol=1e-5)


def test_routed_delta_is_added_once_on_core_frozen_rows(modkit):
    """Parameter routing re-enters the token embedding on core-frozen rows: the delta is still added once, so the
    value of a routed pass does not depend on which rows learn."""
    model = modkit.gpt()
    model.eval()
    mods = modkit.open_rows(model)
    modkit.randomise_modules(mods)
    x = modkit.ids(4)
    x[:, 1] = 9                                       # a row of forest and sea
    fwd = torch.tensor([[1.0, 1, 1, 0, 0]] * 4)
    frozen = fwd.bool().clone()
    frozen[:2, 0] = False                             # rows 0-1: the core is frozen (routed through functional_call)
    with torch.no_grad():
        with mods.route(forward=fwd, learn=fwd.bool()):
            a = model(x)[0]
        with mods.route(forward=fwd, learn=frozen):
            b = model(x)[0]
        with mods.using(on=["forest", "sea"]):
            c = model(x)[0]
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-5)


def test_rows_layout_follows_rows_replaced_not_copied(modkit):
    """The cached rows layout follows rows that replace the buffer (``load_state_dict(assign=True)``,
    or a plain assignment): a new tensor whose version counter equals the old one's is still new."""
    x = modkit.ids()
    other = modkit.gpt()
    omods = modkit.open_rows(other, {d: [r + 1 for r in modkit.ROWS[d]] for d in modkit.DOMAINS})
    modkit.randomise_modules(omods)
    other.eval()
    with torch.no_grad():
        with omods.using():
            want = other(x)[0]
        for how in ("assign", "setattr"):
            model = modkit.gpt()
            model.eval()
            mods = modkit.open_rows(model)
            model(x)                                           # the layout of ROWS is cached
            state = {k: v.clone() for k, v in other.state_dict().items()}
            if how == "assign":
                model.load_state_dict(state, assign=True)
            else:
                model.load_state_dict({k: v for k, v in state.items() if not k.endswith(".rows")}, strict=False)
                for d in modkit.DOMAINS:
                    model.aux_embed[d].rows = state[f"aux_embed.{d}.rows"]
            assert model.aux_embed.sea.rows.tolist() == [10, 21, 22]
            with mods.using():
                assert torch.equal(model(x)[0], want), how


def test_rows_equal_a_full_delta_that_is_zero_elsewhere_gradient_only_on_rows(modkit):
    """Same function and gradients as a delta on every row that is zero outside the rows: the
    row parameter's gradient is the full delta's gradient on those rows, in a mixed routed batch
    where a module runs on a row without learning from it."""
    rows_model, full_model = modkit.gpt(), modkit.gpt()
    rmods = modkit.open_rows(rows_model)
    fmods = modkit.open_rows(full_model, {d: list(range(64)) for d in modkit.DOMAINS})
    modkit.randomise_modules(rmods)
    with torch.no_grad():
        for (n, p), q in zip(rows_model.named_parameters(), full_model.parameters()):
            if n.startswith("aux_embed."):
                q.zero_()
                q[torch.tensor(modkit.ROWS[n.split(".")[1]])] = p
            else:
                q.copy_(p)
    x = modkit.ids(3, seed=5)
    x[:, :4] = torch.tensor([3, 9, 30, 40])          # row tokens on the input too
    fwd = torch.tensor([[1., 1, 0, 0, 0], [1, 1, 1, 0, 1], [1, 0, 0, 1, 0]])
    learn = torch.tensor([[True, True, False, False, False], [False, False, True, False, True],
                          [True, False, False, True, False]])
    grads = []
    for model, mods in ((rows_model, rmods), (full_model, fmods)):
        with mods.route(forward=fwd, learn=learn):
            logits, loss = model(x, x)
        loss.backward()
        grads.append((logits, {d: model.aux_embed[d].weight.grad for d in modkit.DOMAINS}))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for d in modkit.DOMAINS:
        g_rows, g_full = grads[0][1][d], grads[1][1][d]
        assert torch.allclose(g_rows, g_full[torch.tensor(modkit.ROWS[d])], atol=1e-5), d
    # forest learns on row 0 only, and its full delta's gradient reaches rows it does not have
    outside = torch.ones(64, dtype=torch.bool)
    outside[torch.tensor(modkit.ROWS["forest"])] = False
    assert grads[1][1]["forest"][outside].abs().sum() > 0 and grads[0][1]["forest"].abs().sum() > 0


def test_off_module_contributes_nothing_and_only_its_rows_move(modkit):
    """A delta switched off (per example, or at inference) contributes nothing; switched on, with
    the MLP modules silent, it moves only the logits of its own rows on a text without its tokens."""
    model = modkit.gpt()
    model.eval()
    mods = modkit.open_rows(model)
    modkit.randomise_modules(mods)
    with torch.no_grad():
        for _, mlp in mods.blocks:                   # only the embedding deltas act
            for m in mlp.aux_modules.values():
                m.down.weight.zero_()
    x = modkit.ids(4, seed=3)
    x[torch.isin(x, torch.tensor(modkit.ROWS["forest"]))] = 1      # no forest token on the input
    with torch.no_grad():
        with mods.using(on=[]):
            none = model(x)[0]
        with mods.using(on=["forest"]):
            forest = model(x)[0]
        cols = torch.zeros(64, dtype=torch.bool)
        cols[torch.tensor(modkit.ROWS["forest"])] = True
        assert torch.equal(forest[..., ~cols], none[..., ~cols])
        assert not torch.allclose(forest[..., cols], none[..., cols])
        fwd = torch.tensor([[1., 1, 0, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 1]])
        with mods.route(forward=fwd, learn=fwd.bool()):
            routed = model(x)[0]
        model.aux_embed.forest.weight.zero_()
        with mods.route(forward=fwd, learn=fwd.bool()):
            routed0 = model(x)[0]
    forest_on = fwd[:, 1].bool()
    assert torch.equal(routed0[~forest_on], routed[~forest_on])
    assert not torch.allclose(routed0[forest_on], routed[forest_on])


def test_key_rule_majority_keeps_the_domain_with_most_keys_so_far(modkit):
    model = modkit.gpt()
    first = modkit.keyed(model)
    mods_m = gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", modkit.DOMAINS, keys=modkit.KEYS, key_rule="majority")
    x = torch.tensor([[20, 2, 4, 30, 21, 30, 30, 2]])   # sea, then space once, sea again, then space twice
    g = mods_m.key_gates(x)[:, 0]
    assert g[1].tolist() == [True, True, True, True, True, True, False, False]        # sea
    assert g[2].tolist() == [False, False, False, True, False, True, True, True]      # space (ties at 3, 5: both)
    assert not g[0].any() and not g[3].any()
    assert first.key_gates(x)[2, 0].tolist() == [False, False, False, True, True, True, True, True]
    # text with one domain's keys only: both rules agree
    y = torch.tensor([[1, 20, 2, 21, 2]])
    assert torch.equal(first.key_gates(y), mods_m.key_gates(y))
    with pytest.raises(ValueError, match="key_rule must be one of"):
        gr.add_modules(modkit.gpt(), "transformer.h.*.mlp", modkit.DOMAINS, keys=modkit.KEYS, key_rule="last")


def test_keyed_mlp_called_after_a_forward_does_not_reuse_its_gates(modkit):
    """The gates of a forward are dropped after it: an MLP called on its own later raises instead of using
    the last forward's gates (of other tokens), also after a forward that raised; export keeps no hook."""
    model = modkit.gpt()
    model.eval()
    mods = modkit.keyed(model)
    modkit.randomise_modules(mods)
    x = modkit.plain_ids()
    x[:, 2] = 12
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():
        model(x)
        with pytest.raises(RuntimeError, match="keyed modules need the token ids"):
            mlp(torch.randn(3, 10, 16))
        with pytest.raises(Exception):
            model(x, torch.zeros(2, 2, dtype=torch.long))       # targets of a wrong shape: the forward raises
        with pytest.raises(RuntimeError, match="keyed modules need the token ids"):
            mlp(torch.randn(3, 10, 16))
    out = mods.export()
    assert not out._forward_hooks and not out._forward_pre_hooks and not out._forward_pre_hooks_with_kwargs
    with torch.no_grad(), mods.using(on=[]):
        assert torch.equal(out(x)[0], model(x)[0])


def test_keyed_on_hf_gpt2_reads_input_ids(modkit, hf_gpt2):
    model = hf_gpt2
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS, keys=modkit.KEYS)
    modkit.randomise_modules(mods)
    plain = modkit.plain_ids()
    keyed = plain.clone()
    keyed[:, 3] = 30                                  # a space key
    with torch.no_grad():
        with mods.using(on=[]):
            off_plain, off_keyed = model(input_ids=plain).logits, model(input_ids=keyed).logits
        with mods.using(on=["space"]):
            on_plain, on_keyed = model(input_ids=plain).logits, model(input_ids=keyed).logits
    assert torch.equal(on_plain, off_plain)
    assert torch.equal(on_keyed[:, :3], off_keyed[:, :3])
    assert (on_keyed[:, 3:] - off_keyed[:, 3:]).abs().amax() > 1e-4


def test_keyed_deltas_on_hf_gpt2_found_through_its_embeddings(modkit, hf_gpt2):
    """A Hugging Face model's deltas sit on get_input_embeddings() / get_output_embeddings(): zero at start, then
    they act from the key on, move only their rows' logits when the MLP modules are silent, and isolate."""
    model = hf_gpt2
    x = modkit.plain_ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS, keys=modkit.KEYS, embed_delta=modkit.ROWS)
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, before)
    modkit.randomise_modules(mods)
    with torch.no_grad():
        for _, mlp in mods.blocks:                    # only the embedding deltas act
            for m in mlp.aux_modules.values():
                m.down.weight.zero_()
    keyed = x.clone()
    keyed[:, 3] = 30                                  # a space key; space's rows are 30-33
    with torch.no_grad():
        with mods.using(on=[]):
            off = model(input_ids=keyed).logits
        with mods.using(on=["space"]):
            on = model(input_ids=keyed).logits
    cols = torch.zeros(64, dtype=torch.bool)
    cols[torch.tensor(modkit.ROWS["space"])] = True
    assert torch.equal(on[:, :3], off[:, :3])                         # before the key: nothing
    assert torch.equal(on[:, 3:, ~cols], off[:, 3:, ~cols]) is False  # the input delta at the key moves later logits
    assert (on[:, 3:, cols] - off[:, 3:, cols]).abs().amax() > 1e-4
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    core, sea = modkit.snapshot(mods.core_params()), modkit.snapshot(mods.module_params("sea"))
    space = model.aux_embed.space.weight.detach().clone()
    with mods.route(torch.tensor([2, 2, 2]), p_cr=1.0):
        model(input_ids=keyed).logits.square().mean().backward()
    opt.step()
    assert modkit.same(core, mods.core_params()) and modkit.same(sea, mods.module_params("sea"))
    assert not torch.equal(space, model.aux_embed.space.weight)
    stock = mods.export()
    assert not any("aux" in n for n, _ in stock.named_parameters())
    with torch.no_grad(), mods.using(on=[]):
        assert torch.equal(stock(input_ids=keyed).logits, model(input_ids=keyed).logits)


def test_keyed_hf_gpt2_refuses_a_cached_continuation(modkit, hf_gpt2):
    """With a key/value cache a forward sees only the new tokens, so a key earlier in the sequence would not
    open the gate (the module silently off): refused; generate(use_cache=False) gives the full-forward tokens."""
    model = hf_gpt2
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS, keys=modkit.KEYS)
    modkit.randomise_modules(mods)
    x = modkit.plain_ids(1, 8)
    x[:, 2] = 30                                      # a space key in the prompt
    with torch.no_grad(), mods.using(on=["space"]):
        o = model(input_ids=x[:, :-1], use_cache=True)
        with pytest.raises(ValueError, match="without a key/value cache"):
            model(input_ids=x[:, -1:], past_key_values=o.past_key_values, use_cache=True)
        got = model.generate(x[:, :5], max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0)
        seq = x[:, :5]
        for _ in range(3):                            # greedy decoding by full forwards
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, seq)


def test_keyed_hf_gpt2_key_at_a_padded_position_opens_no_gate(modkit, hf_gpt2):
    """Left padding: a key token at a position the attention mask hides is no token of the text."""
    model = hf_gpt2
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS, keys=modkit.KEYS)
    modkit.randomise_modules(mods)
    x = modkit.plain_ids(2, 8)
    mask = torch.ones_like(x)
    mask[:, :2] = 0
    padded_key = x.clone()
    padded_key[:, 1] = 30                             # a space key, but padding
    with torch.no_grad(), mods.using(on=["space"]):
        a = model(input_ids=x, attention_mask=mask).logits
        b = model(input_ids=padded_key, attention_mask=mask).logits
        real_key = padded_key.clone()
        real_key[:, 4] = 30                           # a real key opens the gate from there on
        c = model(input_ids=real_key, attention_mask=mask).logits
        with mods.using(on=[]):
            c_off = model(input_ids=real_key, attention_mask=mask).logits
    assert torch.allclose(a[:, 2:], b[:, 2:], atol=1e-6)
    assert torch.equal(c[:, 2:4], c_off[:, 2:4]) and (c[:, 4:] - c_off[:, 4:]).abs().amax() > 1e-4


def test_keyed_hf_gpt2_gradient_checkpointing_recomputes_with_the_forwards_gates(modkit, hf_gpt2):
    """Activation checkpointing reruns the MLPs in backward, after the model's forward ended: they use that
    forward's gates (the same gradients as without checkpointing), while an MLP called alone still raises."""
    model = hf_gpt2
    mods = gr.add_modules(model, "transformer.h.*.mlp", modkit.DOMAINS, keys=modkit.KEYS)
    modkit.randomise_modules(mods)
    x = modkit.plain_ids(2, 8)
    x[:, 2] = 30
    model.train()
    model(input_ids=x).logits.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert want["transformer.h.0.mlp.aux_modules.space.down.weight"].abs().amax() > 0
    model.zero_grad(set_to_none=True)
    model.gradient_checkpointing_enable()
    model(input_ids=x, use_cache=False).logits.square().sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6), n
    with pytest.raises(RuntimeError, match="keyed modules need the token ids"):
        model.transformer.h[0].mlp(torch.randn(2, 8, 16))
