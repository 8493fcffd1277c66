"""The gridworld trainer's fast path (experiments/gridworld_fast.py) computes what the plain
update computes with autograd and gradroute.route."""
import pytest
import torch

from gradroute.envs.gridworld import GridworldVecEnv
from gradroute.experiments import gridworld as gw
from gradroute.experiments import gridworld_fast as fast

PLAIN = ("obs", "act", "done", "reached", "overseen")    # what the plain update reads from a batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(precision="fp32", **kw):
    return dict(dict(unfinished="keep", filter_mode="original", critic="linear", zero_bias=False,
                     precision=precision, single_expert_baselines=True, gate="original"), **kw)


def _grads(policy, batch, job, cfg, buffers=None):
    policy.zero_grad(set_to_none=True)
    gw.update(policy, batch, job, cfg, buffers=buffers)
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("job,unfinished,gate", [("routing", "keep", "original"), ("routing", "drop", "original"),
                                                 ("routing", "keep", "mlp64"), ("no_routing", "keep", "original"),
                                                 ("naive", "keep", "original"), ("filtering", "keep", "original")])
def test_hand_backward_equals_autograd_with_route(job, unfinished, gate):
    # The same batch through both updates: the hand backward (the batch's stored activations) and
    # autograd through route() in MoEPolicy.mix (the batch's observations only); fp32.
    torch.manual_seed(0)
    cfg = _cfg(unfinished=unfinished, gate=gate)
    policy = gw.make_policy(job, cfg)
    env = GridworldVecEnv(16, 0.5, return_final_obs=False)
    _, batch = fast.rollout(policy, env, env.reset(seed=0)[0], 32, torch.Generator().manual_seed(1))
    assert batch["overseen"].any() and (~batch["done"][-1]).any()   # routed rows and unfinished rows present
    hand = _grads(policy, batch, job, cfg, buffers={})
    plain = _grads(policy, {k: batch[k] for k in PLAIN}, job, cfg)
    assert hand.keys() == plain.keys() and len(hand) >= 6
    for n in plain:
        torch.testing.assert_close(hand[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_hand_backward_is_close_to_autograd_in_bf16():
    # bf16: the two round differently (fused vs separate matmuls, autocast); the directions agree
    torch.manual_seed(0)
    cfg = _cfg("bf16", filter_mode="overseen_only")
    policy = gw.make_policy("routing", cfg)
    env = GridworldVecEnv(32, 0.5, return_final_obs=False)
    _, batch = fast.rollout(policy, env, env.reset(seed=0)[0], 32, torch.Generator().manual_seed(1))
    hand = _grads(policy, batch, "routing", cfg, buffers={})
    plain = _grads(policy, {k: batch[k] for k in PLAIN}, "routing", cfg)
    for n in ("w1", "w2", "gate.fc1.weight", "gate.conv.weight", "head.weight"):
        cos = torch.nn.functional.cosine_similarity(hand[n].flatten(), plain[n].flatten(), 0)
        assert cos > 0.99, (n, float(cos))


def test_fast_rollout_acts_like_the_policy():
    # the rollout's stored logits are the policy's logits (fp32: up to summation order), and its
    # actions are sample_actions on them, step by step, with the same generator
    torch.manual_seed(0)
    policy = gw.make_policy("routing", _cfg())
    env = GridworldVecEnv(8, 0.5, return_final_obs=False)
    _, batch = fast.rollout(policy, env, env.reset(seed=0)[0], 6, torch.Generator().manual_seed(1))
    logits = batch["logits"].view(6, 8, 4)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(torch.stack([gw.sample_actions(lg, gen) for lg in logits]), batch["act"])
    with torch.no_grad():
        ref, gl = policy(batch["obs"].flatten(0, 1))
    torch.testing.assert_close(batch["logits"], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch["gl"], gl, rtol=1e-5, atol=1e-5)


def test_fused_gate_layer_equals_the_gate():
    # the gate's 1x1 conv folded into its first linear layer gives the gate's logits
    torch.manual_seed(0)
    gate = gw.Gate("original")
    with torch.no_grad():
        gate.conv.bias.normal_()                       # a non-zero conv bias exercises the folding
    x = GridworldVecEnv(32, 0.5).reset(seed=3)[0].flatten(1)
    w, b = fast.gate_first_layer(gate)
    torch.testing.assert_close(fast.gate_rest(gate, torch.relu(torch.addmm(b, x, w))), gate(x))


def test_fast_rollout_buffers_reused():
    # reused rollout buffers (as in train) give the same batch as fresh ones
    torch.manual_seed(0)
    policy = gw.make_policy("routing", _cfg("bf16"))
    batches, bufs = [], {}
    for reuse in (None, bufs, bufs):
        env = GridworldVecEnv(8, 0.5, return_final_obs=False)
        if reuse is not None:             # something else in the buffers first
            other = GridworldVecEnv(8, 0.5, return_final_obs=False)
            fast.rollout(policy, other, other.reset(seed=3)[0], 6, torch.Generator().manual_seed(5), reuse)
        _, batch = fast.rollout(policy, env, env.reset(seed=0)[0], 6, torch.Generator().manual_seed(1), reuse)
        batches.append({k: v.clone() for k, v in batch.items() if v is not None})
    for b in batches[1:]:
        assert b.keys() == batches[0].keys()
        for k in b:
            assert torch.equal(b[k], batches[0][k]), k


def _bf16_hand_grads(job="routing", gate="original", buffers=None, seed=0):
    torch.manual_seed(0)
    cfg = _cfg("bf16", filter_mode="overseen_only", gate=gate)
    policy = gw.make_policy(job, cfg)
    env = GridworldVecEnv(32, 0.5, return_final_obs=False)
    _, batch = fast.rollout(policy, env, env.reset(seed=seed)[0], 72, torch.Generator().manual_seed(1))
    return _grads(policy, batch, job, cfg, buffers={} if buffers is None else buffers)


@pytest.mark.parametrize("job,gate", [("routing", "original"), ("routing", "mlp64"), ("naive", "original")])
def test_backward_work_buffers_reused_across_updates(job, gate):
    # train() hands the backward one dict of work buffers for the whole run; gradients must not
    # depend on what an earlier update left in them (72 x 32 = 2,304 rows: a full 2,048-row chunk
    # and a short last one), on each network: original gate, small gate, single expert
    bufs = {}
    first = _bf16_hand_grads(job, gate, bufs, seed=3)
    assert any(k.startswith("bw_") for k in bufs)
    again, fresh = _bf16_hand_grads(job, gate, bufs), _bf16_hand_grads(job, gate)
    assert fresh.keys() == again.keys() and len(fresh) >= 8
    for n in fresh:
        assert torch.equal(again[n], fresh[n]), n
        assert not torch.equal(first[n], fresh[n]) or n.endswith("bias"), n    # a different batch before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_relu_on_integer_bits_equals_torch(dtype):
    # the rollout's ReLU and the backward's ReLU gradient work on the integer view of the floats
    x = torch.cat((torch.randn(1000), torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), -float("inf")]))).to(dtype)
    assert torch.equal(fast._relu_(x.clone()), torch.relu(x))
    out, grad = torch.relu(x), torch.randn(x.shape).to(dtype)
    assert torch.equal(fast._relu_grad_(grad.clone(), out), torch.ops.aten.threshold_backward(grad, out, 0))
    assert torch.equal(fast._relu_grad_(grad.clone(), x), torch.ops.aten.threshold_backward(grad, x, 0))
