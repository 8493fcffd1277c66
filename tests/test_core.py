import pytest
import torch

import gradroute as gr


def grad_of(x, w, upstream):
    x = x.clone().requires_grad_(True)
    y = gr.route(x, w)
    assert torch.equal(y, x)
    (y * upstream).sum().backward()
    return x.grad


@pytest.mark.parametrize("shape_w", [
    ("per_example", (4, 1, 1)),
    ("per_token", (4, 5, 1)),
    ("per_unit", (6,)),
    ("full", (4, 5, 6)),
])
def test_gradient_is_weight_times_upstream(shape_w):
    _, wshape = shape_w
    torch.manual_seed(0)
    x, up = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    w = torch.rand(wshape) * 2 - 1  # fractional and negative entries
    assert torch.allclose(grad_of(x, w, up), w * up)


@pytest.mark.parametrize("w", [0.0, 0.3, -0.75, 1.0, 2.0])
def test_scalar_weights(w):
    x, up = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.allclose(grad_of(x, w, up), w * up)


def test_matches_paper_formula():
    torch.manual_seed(0)
    x, up = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    w = torch.rand(4, 5, 1) - 0.5
    a = x.clone().requires_grad_(True)
    (gr.route_reference(a, w) * up).sum().backward()
    assert torch.allclose(grad_of(x, w, up), a.grad)


def test_bad_broadcast_names_both_shapes():
    x = torch.randn(4, 5, 6, requires_grad=True)
    with pytest.raises(ValueError, match=r"\(4,\).*\(4, 5, 6\)"):
        gr.route(x, torch.ones(4))
    with pytest.raises(ValueError, match="does not broadcast"):
        gr.route(x, torch.ones(4, 5, 6, 2))  # would expand x: not allowed


def test_bad_types():
    with pytest.raises(TypeError):
        gr.route([1.0, 2.0], 1.0)
    with pytest.raises(TypeError):
        gr.route(torch.ones(2, requires_grad=True), "0.5")


def test_no_grad_is_noop_and_still_validates():
    x = torch.randn(2, 3, requires_grad=True)
    with torch.no_grad():
        y = gr.route(x, torch.zeros(2, 1))
        assert y is x
        with pytest.raises(ValueError):
            gr.route(x, torch.zeros(3, 1))


def test_weight_gets_no_gradient_and_is_not_modified():
    x = torch.randn(3, 2, requires_grad=True)
    w = torch.full((3, 1), 0.5, requires_grad=True)
    gr.route(x, w).sum().backward()
    assert w.grad is None
    assert torch.allclose(x.grad, torch.full((3, 2), 0.5))


def test_double_backward():
    x = torch.randn(5, requires_grad=True)
    w = torch.linspace(-1, 1, 5)
    y = (gr.route(x, w) ** 3).sum()
    (g,) = torch.autograd.grad(y, x, create_graph=True)
    assert torch.allclose(g, 3 * x**2 * w)
    (h,) = torch.autograd.grad(g.sum(), x)
    # the second derivative crosses the routed edge twice: 6 x w^2, as the paper's formula gives
    assert torch.allclose(h, 6 * x * w**2)
    a = x.detach().clone().requires_grad_(True)
    (ga,) = torch.autograd.grad((gr.route_reference(a, w) ** 3).sum(), a, create_graph=True)
    (ha,) = torch.autograd.grad(ga.sum(), a)
    assert torch.allclose(h, ha)


def test_autocast_bfloat16():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.tensor([1.0, 0.0, -0.5, 0.25]).view(4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = gr.route(lin(x), w)
        assert h.dtype == torch.bfloat16
        h.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.all(x.grad[1] == 0)
    assert lin.weight.grad is not None


def test_torch_compile():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.tensor([1.0, 0.0, -0.75, 0.5]).view(4, 1)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, w):
        return (gr.route(x * 2, w) ** 2).sum()

    f(x, w).backward()
    assert torch.allclose(x.grad, 8 * x.detach() * w)


def test_weight_moved_to_input_device_and_int_weights():
    x = torch.randn(2, 3, requires_grad=True)
    gr.route(x, torch.tensor([[1], [0]])).sum().backward()  # integer tensor weight
    assert torch.equal(x.grad, torch.tensor([[1.0] * 3, [0.0] * 3]))


def test_route_factored_equals_materialised_weight():
    torch.manual_seed(0)
    x, up = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    for select in (torch.tensor([True, False, True]), torch.rand(3, 4)):
        row = torch.tensor([1.0, 1.0, -0.75, -0.75, 0.0])
        a = x.clone().requires_grad_(True)
        (gr.route_factored(a, select, row, default=1.0) * up).sum().backward()
        s = select.float().view(*select.shape, *([1] * (3 - select.ndim)))
        assert torch.allclose(a.grad, (1.0 + s * (row - 1.0)) * up)
    with pytest.raises(ValueError, match="units"):
        gr.route_factored(x.requires_grad_(), torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="leading shape"):
        gr.route_factored(x, torch.ones(4), torch.ones(5))
