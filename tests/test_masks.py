import pytest
import torch

import gradroute as gr


def test_region_mask_forms():
    assert gr.region_mask(slice(2, 4), 6).tolist() == [False, False, True, True, False, False]
    assert gr.region_mask([0, 5], 6).tolist() == [True, False, False, False, False, True]
    assert gr.region_mask(range(1, 6, 2), 6).nonzero().flatten().tolist() == [1, 3, 5]
    m = torch.tensor([True, False, True])
    assert torch.equal(gr.region_mask(m, 3), m)


@pytest.mark.parametrize("units,n", [([6], 6), (slice(0, 9), 6), (torch.ones(4, dtype=torch.bool), 6), ([[0, 1]], 6)])
def test_region_mask_errors(units, n):
    with pytest.raises(ValueError):
        gr.region_mask(units, n)


def test_region_weights_route_x_to_u():
    sel = torch.tensor([True, False])
    w = gr.region_weights(sel, slice(0, 2), 4)
    assert w.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_region_weights_era_pattern_per_token_soft():
    sel = torch.tensor([[1.0, 0.0, 0.5]])  # per token, soft
    w = gr.region_weights(sel, [3], 4, inside=1.0, outside=-0.75)
    assert torch.allclose(w[0, 0], torch.tensor([-0.75, -0.75, -0.75, 1.0]))
    assert torch.allclose(w[0, 1], torch.ones(4))
    assert torch.allclose(w[0, 2], torch.tensor([0.125, 0.125, 0.125, 1.0]))


def test_region_weights_rejects_out_of_range_select():
    with pytest.raises(ValueError, match="select"):
        gr.region_weights(torch.tensor([2.0]), [0], 3)


def test_example_weights_shape_and_values():
    w = gr.example_weights(torch.tensor([0, 1, 2]), {1: 0.0, 2: -0.75}, ndim=3)
    assert w.shape == (3, 1, 1)
    assert w.flatten().tolist() == [1.0, 0.0, -0.75]
    with pytest.raises(ValueError):
        gr.example_weights(torch.zeros(2, 2), {0: 1.0})


def test_token_mask():
    ids = torch.tensor([[5, 1, 7], [7, 7, 2]])
    assert gr.token_mask(ids, {7, 2}).tolist() == [[False, False, True], [True, True, True]]
    with pytest.raises(ValueError):
        gr.token_mask(ids, [])


def test_label_subset_exact_count_and_determinism():
    pos = torch.arange(100) % 3 == 0  # 34 positives
    a = gr.label_subset(pos, 0.5, torch.Generator().manual_seed(1))
    b = gr.label_subset(pos, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert int(a.sum()) == 17 and bool((a & ~pos).sum() == 0)
    assert int(gr.label_subset(pos, 0.0).sum()) == 0
    assert torch.equal(gr.label_subset(pos, 1.0), pos)
    with pytest.raises(ValueError):
        gr.label_subset(pos, 1.5)


def test_routed_gradient_of_region_weights_end_to_end():
    x = torch.randn(2, 3, 4, requires_grad=True)  # (batch, seq, units)
    w = gr.region_weights(torch.tensor([True, False]), [0], 4).unsqueeze(1)
    gr.route(x, w).sum().backward()
    assert x.grad[0].tolist() == [[1, 0, 0, 0]] * 3
    assert x.grad[1].tolist() == [[1, 1, 1, 1]] * 3
