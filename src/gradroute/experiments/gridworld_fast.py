"""The gridworld trainer's fast path: a graph-free rollout that keeps its activations, and the
backward pass through the routed mixture of experts carried by hand over all steps of a rollout.

It computes what ``gradroute.experiments.gridworld.update`` computes with autograd and
``gradroute.route`` (the gradient of one update; ``tests/test_gridworld_fast.py`` checks the two
against each other), and is kept because it runs faster than that in the same benchmark run
(``benchmarks/gridworld_speed.py``: ``hand_over_autograd_*``; docs/gridworld.md, "Speed"). Read
``gridworld.py`` to learn the method; read this file only to change the speed.

How the gradient is routed here: d loss / d expert state ``e`` at step ``i`` is ``coef[e, i] *
d_logits[i] @ head.weight``, where ``coef`` is the gate's mix weight times the routing weight of
``i``'s episode for that expert (what ``route()`` on each expert state in ``MoEPolicy.mix`` does),
and d loss / d gate logit is scaled by the gate's routing weight likewise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------
# the policy's layers, fused
# ------------------------------------------------------------------------------------------
def fused_weights(policy):
    """The first layer of every expert *and* of the gate as one ``(obs_dim + 1, experts*hidden
    [+ gate width])`` matrix whose last row is the bias (one matmul per step for all of them,
    on observations with a column of ones appended; the weight gradient of that matmul then
    carries the bias gradient in its last row), and the experts' second layer, in the compute
    dtype. One cast per update is shared by every step of a rollout (the graph keeps it, so
    gradients reach the fp32 master weights)."""
    dt = torch.bfloat16 if policy.precision == "bf16" else torch.float32
    E, D, H = policy.w1.shape
    w1, b1 = policy.w1.transpose(0, 1).reshape(D, E * H), policy.b1.reshape(E * H)
    if policy.gate is not None:
        gw1, gb1 = gate_first_layer(policy.gate)
        w1 = torch.cat((w1, gw1), 1)
        b1 = torch.cat((b1, gb1))
    return torch.cat((w1, b1[None]), 0).to(dt), policy.w2.to(dt), policy.b2.to(dt)


def gate_first_layer(gate):
    """``(W, b)`` with ``relu(x @ W + b)`` the gate's first hidden layer for flat observations ``x``: its
    1x1 convolution is linear, so it is folded into the first linear layer (gradients still reach the
    conv's own weights)."""
    w, b = gate.fc1.weight.t(), gate.fc1.bias
    if gate.conv is None:
        return w, b
    c = gate.conv.weight[:, :, 0, 0]                              # (out, in) channel mix
    eye = torch.eye(gate.cells, dtype=c.dtype, device=c.device)
    mix = torch.kron(c.t().contiguous(), eye)                                 # flat (in*cells, out*cells)
    return mix @ w, gate.conv.bias.repeat_interleave(gate.cells) @ w + b


def gate_rest(gate, y: torch.Tensor) -> torch.Tensor:
    """Gate logits ``(B,)`` from the first hidden layer (after its ReLU); a second hidden layer
    runs in ``y``'s dtype, the output layer in fp32."""
    if gate.fc2 is not None:
        y = torch.relu(F.linear(y, gate.fc2.weight.to(y.dtype), gate.fc2.bias.to(y.dtype)))
    return gate.out(y.float()).squeeze(-1)


# ------------------------------------------------------------------------------------------
# rollout and backward
# ------------------------------------------------------------------------------------------
def _work_buffer(bufs: dict, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """``bufs[name]`` when it has this shape and dtype, else a new uninitialised tensor stored
    there (:func:`rollout`'s and :func:`_expert_backward`'s buffers kept across updates)."""
    b = bufs.get(name)
    if b is None or b.shape != shape or b.dtype != dtype:
        b = bufs[name] = torch.empty(shape, dtype=dtype)
    return b


def rollout(policy, env, obs: torch.Tensor, T: int, gen: torch.Generator,
            buffers: dict | None = None):
    """``T`` steps of every env, without an autograd graph. One update per rollout means the
    rollout's forward pass *is* the training forward pass: it keeps the activations that the
    backward pass needs (:func:`backward` carries the gradient by hand through them with one matmul
    per layer over all ``T*N`` steps, instead of recomputing or keeping ``T`` small graphs).
    Returns the next obs and a dict: ``x`` (T*N, obs_dim + 1) the observations with a column of
    ones and ``y`` (T*N,
    experts*hidden [+ gate width]) the first hidden layer of the experts and the gate, ``h``
    (experts, T*N, hidden) expert states, ``mix`` (T*N, hidden) their gated mix (``h[0]`` with
    one expert), ``y2`` (T*N, 256) the original gate's second hidden layer (or None), all in the
    compute dtype and after their ReLU; ``gl`` (T*N,) gate logits (or None) and ``logits`` (T*N,
    actions) in fp32; ``obs`` (T, N, obs_dim) in fp32 and (T, N) ``act``, ``done``, ``reached``,
    ``overseen``.

    ``buffers``: a dict kept by the caller across rollouts; the activation and observation
    buffers are reused from it (fresh multi-MB allocations cost page faults on every rollout), so
    the previous rollout's batch is overwritten: pass it only when that batch is no longer needed."""
    gate = policy.gate
    N = obs.shape[0]
    acts, dones, reached, overseen = [], [], [], []
    with torch.no_grad():
        w1, w2, b2 = fused_weights(policy)                # w1: (obs_dim + 1, ...), bias last
        E, H, dt = w2.shape[0], w2.shape[2], w1.dtype
        D = w1.shape[0] - 1
        A = policy.head.out_features
        # preallocated (T*N, ...) buffers: every step writes its rows in place (no concatenation)
        bufs = {} if buffers is None else buffers

        def empty(name, *shape, dtype=dt):
            return _work_buffer(bufs, name, shape, dtype)
        obs_all = empty("obs", T, N, D, dtype=torch.float32)
        x_all = empty("x", T * N, D + 1)                    # the observations and a column of ones
        x_all[:, D].fill_(1)
        y_all = empty("y", T * N, w1.shape[1])
        h_all = empty("h", E, T * N, H)
        logits_all = empty("logits", T * N, A, dtype=torch.float32)
        y2_all = gl_all = None
        mix_all = h_all[0]
        if gate is not None:
            mix_all = empty("mix", T * N, H)
            gl_all = empty("gl", T * N, 1, dtype=torch.float32)
            if gate.fc2 is not None:
                fc2_wt, fc2_b = gate.fc2.weight.to(dt).t(), gate.fc2.bias.to(dt)
                y2_all = empty("y2", T * N, fc2_b.shape[0])
        # the Gumbel noise of every step in one call (the same numbers as T calls of sample_actions)
        u = torch.rand((T, N, A), generator=gen).clamp_(1e-20, 1.0)
        gumbel = u.log_().neg_().log_().neg_()
        # every view the steps write into or read from, made in a few bulk calls (one slice per
        # step and buffer from Python costs ~1 us each, ~30 per step)
        xs, ys, mixs, logit_s = (b.split(N) for b in (x_all, y_all, mix_all, logits_all))
        obs_s = obs_all.unbind(0)
        ys_e = [y_all[:, e * H:(e + 1) * H].split(N) for e in range(E)]   # each expert's columns
        hs_e = [h_all[e].split(N) for e in range(E)]                      # each expert's rows
        w2_e, b2_e = w2.unbind(0), b2[:, 0].unbind(0)
        if gate is not None:
            ygs, gls = y_all[:, E * H:].split(N), gl_all.split(N)
            y2s = y2_all.split(N) if y2_all is not None else None
            out_wt, out_b = gate.out.weight.t(), gate.out.bias
        head_wt, head_b = policy.head.weight.t(), policy.head.bias
        gum = gumbel.unbind(0)
        for t in range(T):
            obs_s[t].copy_(obs.view(N, -1))
            xs[t][:, :D].copy_(obs_s[t])
            _relu_(torch.mm(xs[t], w1, out=ys[t]))
            for e in range(E):
                _relu_(torch.addmm(b2_e[e], ys_e[e][t], w2_e[e], out=hs_e[e][t]))
            if gate is not None:
                yg = ygs[t]
                if y2s is not None:
                    yg = _relu_(torch.addmm(fc2_b, yg, fc2_wt, out=y2s[t]))
                gl = torch.addmm(out_b, yg.float(), out_wt, out=gls[t])
                _mix(hs_e[0][t], hs_e[1][t], gl.view(N), out=mixs[t])
            logits = torch.addmm(head_b, mixs[t].float(), head_wt, out=logit_s[t])
            act = (logits + gum[t]).argmax(-1)
            acts.append(act)
            obs, _, term, trunc, info = env.step(act)
            dones.append(term | trunc)
            reached.append(info["reached"])
            overseen.append(info["overseen"])
    batch = {"x": x_all, "y": y_all, "h": h_all, "mix": mix_all, "y2": y2_all,
             "gl": None if gl_all is None else gl_all.view(T * N), "logits": logits_all,
             "obs": obs_all, "act": torch.stack(acts), "done": torch.stack(dones),
             "reached": torch.stack(reached), "overseen": torch.stack(overseen)}
    return obs, batch


def _mix(h_d: torch.Tensor, h_g: torch.Tensor, gate_logit: torch.Tensor, out=None) -> torch.Tensor:
    """``g*h_d + (1-g)*h_g``, g = sigmoid(gate_logit), as one ``lerp`` in the states' dtype (one
    pass and one rounding; ``h_g + g*(h_d - h_g)`` as sub then addcmul was two passes, ~1%
    slower per update); the rollout computes it once per step and stores it for the backward
    pass (the head's gradient)."""
    w = torch.sigmoid(gate_logit).unsqueeze(-1).to(h_d.dtype)
    return torch.lerp(h_g, h_d, w) if out is None else torch.lerp(h_g, h_d, w, out=out)


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32}


def _as_int(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as signed integers of the same size: a float's sign is its integer's sign, and
    among non-negative floats the order is the integers' order."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def _relu_(t: torch.Tensor) -> torch.Tensor:
    """ReLU in place, done on the integer view of ``t``'s bits: for bf16 eager ``clamp_min_``
    converts every element to fp32 and back (24 vs 4 us for 256 x 768 at 1 thread). The same
    result as ``torch.relu_`` except that a NaN with the sign bit set becomes 0."""
    _as_int(t).clamp_min_(0)
    return t


def _relu_grad_(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The gradient at a ReLU's input from the gradient ``grad`` at its output ``out`` (autograd's
    rule, ``threshold_backward``), in place on ``grad`` (a buffer reused across chunks: fresh multi-MB
    tensors cost page faults on every allocation), on the integer views of both (``out <= 0``
    is the same test on a float's bits; 3.3x faster than bf16 ``threshold_backward`` for
    2,048 x 768)."""
    g = _as_int(grad)
    torch.ops.aten.threshold_backward.grad_input(g, _as_int(out), 0, grad_input=g)
    return grad


def _add_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    g = g.to(p.dtype).view_as(p)
    p.grad = g if p.grad is None else p.grad + g


def _expert_backward(policy, batch: dict, coef: torch.Tensor, d_logits: torch.Tensor,
                     gate_coef=None, d_gl_extra=None, chunk: int = 2048, buffers: dict | None = None) -> None:
    """Hand backward from the action logits through the shared head, the gated mix, the experts
    and the gate. ``d_logits`` (T*N, actions) is d loss / d logits; d loss / d expert state ``e``
    at row ``i`` is ``coef[e, i] * d_logits[i] @ head.weight`` (``coef`` (experts, T*N): the mix
    weight times the routing weight), one matmul with an inner size of 4 per chunk for all
    experts; d loss / d gate logit is ``gate_coef * <h_d - h_g, d_logits @ head.weight> +
    d_gl_extra``, taken as ``<(h_d - h_g) @ head.weight.T, d_logits>`` (``gate_coef`` (T*N,): the
    gate's routing weight times sigmoid'; ``d_gl_extra``: the gate BCE's gradient or None). The
    head's gradient is accumulated here too, from the rollout's mix. Rows are taken ``chunk`` at
    a time, so elementwise passes stay in cache while the matmuls stay large; the weight
    gradients of the fused first layer and the stacked second layer are summed in fp32 and handed
    to autograd at the compute-dtype weights of :func:`fused_weights`, which carries
    them through the casts, the concatenation and the gate's folded 1x1 conv.

    Every chunk-sized intermediate is written into a work buffer; ``buffers`` (a dict the caller
    keeps across updates, as :func:`train` does with the rollout's) keeps them from one update to
    the next: freshly allocated multi-MB tensors went back to the OS when freed and cost ~2,000-
    7,000 page faults per update at 256 envs (docs/notes/2026-12-06-gridworld-speed.md)."""
    y_all, h_all, x_all, mix_all = batch["y"], batch["h"], batch["x"], batch["mix"]
    dt, E, H = y_all.dtype, policy.w2.shape[0], policy.w2.shape[2]
    w1, w2, b2 = fused_weights(policy)
    w2t = w2.detach().transpose(1, 2)
    head_w = policy.head.weight.detach()
    head_w_dt = head_w.to(dt)
    A = head_w.shape[0]
    gate = policy.gate
    fc2_w = None
    if gate is not None:
        out_w = gate.out.weight.detach()
        fc2_w = gate.fc2.weight.detach().to(dt) if gate.fc2 is not None else None
    R, W1 = y_all.shape
    D, rows = x_all.shape[1], min(chunk, R)
    Wg = W1 - E * H                                      # the gate's first-layer width (0 without a gate)
    ws = {} if buffers is None else buffers

    def buf(name, *shape, dtype=dt):
        return _work_buffer(ws, "bw_" + name, shape, dtype)
    d_y_buf = buf("d_y", rows, W1)                       # d loss / d first layer (after its ReLU)
    d_h_buf = buf("d_h", E * rows, H)                    # d loss / d expert states, expert after expert
    a_buf = buf("a", E * rows, A)                        # coef * d_logits, expert after expert
    g_w1, g_w2 = buf("g_w1", D, W1), buf("g_w2", E, H, H)          # one chunk's weight gradients
    acc = {"w1": torch.zeros(D, W1), "w2": torch.zeros(E, H, H),                          # fp32 sums
           "b2": torch.zeros(E, 1, H), "head_w": torch.zeros(head_w.shape)}
    if gate is not None:
        Wo = fc2_w.shape[0] if fc2_w is not None else Wg                # width of the gate's output layer's input
        diff_buf, yg_f_buf, d_yg_buf = buf("diff", rows, H), buf("yg_f", rows, Wo, dtype=torch.float32), buf("d_yg", rows, Wo)
        acc["out_w"], acc["out_b"] = torch.zeros(Wo), torch.zeros(())
        if fc2_w is not None:
            g_fc2 = buf("g_fc2", Wo, Wg)
            acc["fc2_w"], acc["fc2_b"] = torch.zeros(Wo, Wg), torch.zeros(Wo)
    for lo in range(0, R, chunk):
        sl = slice(lo, lo + chunk)
        y, x, h, dl = y_all[sl], x_all[sl], h_all[:, sl], d_logits[sl]
        C = y.shape[0]
        d_y = d_y_buf[:C]                   # each layer's input gradient is written into its columns
        acc["head_w"].add_(dl.t().to(dt) @ mix_all[sl])
        a = torch.mul(coef[:, sl, None], dl, out=a_buf[:E * C].view(E, C, A)).view(E * C, A)
        # d loss / d expert states (E, C, H); MKL's fp32 matmul is very slow with an inner size of 4
        d_h = (torch.mm(a, head_w_dt, out=d_h_buf[:E * C]) if dt != torch.float32
               else torch.einsum("bk,kh->bh", a, head_w)).view(E, C, H)
        d_pre2 = _relu_grad_(d_h, h)
        for e in range(E):
            torch.mm(y[:, e * H:(e + 1) * H].t(), d_pre2[e], out=g_w2[e])
        acc["w2"].add_(g_w2)
        acc["b2"].add_(d_pre2.sum(1, keepdim=True))
        for e in range(E):
            torch.mm(d_pre2[e], w2t[e], out=d_y[:, e * H:(e + 1) * H])
        if gate is not None:
            # d loss / d gate logits
            hd = torch.sub(h[0], h[1], out=diff_buf[:C]) @ head_w_dt.t()
            d_g = gate_coef[sl] * (hd.float() * dl).sum(-1)
            if d_gl_extra is not None:
                d_g = d_g + d_gl_extra[sl]
            yg = batch["y2"][sl] if fc2_w is not None else y[:, E * H:]
            acc["out_w"].add_(d_g @ (yg if dt == torch.float32 else yg_f_buf[:C].copy_(yg)))
            acc["out_b"].add_(d_g.sum())
            if fc2_w is None:
                torch.mul(d_g[:, None], out_w, out=d_y[:, E * H:])     # fp32 product, rounded once to dt
            else:
                d_pre = _relu_grad_(torch.mul(d_g[:, None], out_w, out=d_yg_buf[:C]), yg)
                acc["fc2_w"].add_(torch.mm(d_pre.t(), y[:, E * H:], out=g_fc2))
                acc["fc2_b"].add_(d_pre.sum(0))
                torch.mm(d_pre, fc2_w, out=d_y[:, E * H:])
        d_pre1 = _relu_grad_(d_y, y)                                              # (C, E*H [+ gate])
        acc["w1"].add_(torch.mm(x.t(), d_pre1, out=g_w1))         # last row: the bias gradient
    _add_grad(policy.head.weight, acc["head_w"])
    _add_grad(policy.head.bias, d_logits.sum(0))
    if gate is not None:
        _add_grad(gate.out.weight, acc["out_w"])
        _add_grad(gate.out.bias, acc["out_b"])
        if fc2_w is not None:
            _add_grad(gate.fc2.weight, acc["fc2_w"])
            _add_grad(gate.fc2.bias, acc["fc2_b"])
    torch.autograd.backward([w1, w2, b2], [acc[k].to(dt) for k in ("w1", "w2", "b2")])



def backward(policy, batch: dict, route_w: torch.Tensor | None, d_logits: torch.Tensor, d_gate_logits,
             buffers: dict | None = None) -> None:
    """Accumulate into ``policy``'s ``.grad`` the gradient that reaches the actor from ``d_logits``
    (d loss / d action logits of every step of ``batch``, a :func:`rollout` batch) and
    ``d_gate_logits`` (d loss / d gate logits from terms on the gate logits themselves, the gate
    BCE; None if none), with the per-step routing weights ``route_w`` (T*N, 3) for (diamond expert,
    ghost expert, gate) or None (no routing)."""
    R = d_logits.shape[0]
    if batch["gl"] is None:                                           # one expert, no gate
        _expert_backward(policy, batch, torch.ones(1, R), d_logits, buffers=buffers)
        return
    rw = torch.ones(R, 3) if route_w is None else route_w
    g = torch.sigmoid(batch["gl"])
    coef = torch.stack((g * rw[:, 0], (1 - g) * rw[:, 1]))           # (2, T*N)
    _expert_backward(policy, batch, coef, d_logits, rw[:, 2] * g * (1 - g), d_gate_logits, buffers=buffers)
