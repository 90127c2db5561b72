from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.artifacts import load_encoder, save_encoder
from models.data import DEBIAN_PACKAGE, DatasetMissing, fingerprint, load, load_digits_28, load_fashion_mnist
from models.encoders import CNNEncoder, EncoderConfig, embed, train_encoder


def test_digits_are_28x28_uint8() -> None:
    x, y = load_digits_28()
    assert x.shape == (1797, 28, 28) and x.dtype == np.uint8
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    xt, _ = load("digits", "train")
    xs, _ = load("digits", "test")
    assert len(xt) + len(xs) == 1797


def test_missing_fashion_mnist_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissing, match=DEBIAN_PACKAGE):
        load_fashion_mnist(tmp_path, "test")
    with pytest.raises(ValueError):
        load_fashion_mnist(tmp_path, "validation")


def test_fashion_mnist_when_installed() -> None:
    d = Path("/usr/share/datasets/fashion-mnist")
    if not (d / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist not installed")
    x, y = load_fashion_mnist(d, "test")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1000] * 10


def test_fingerprint_is_deterministic_and_content_sensitive() -> None:
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert fingerprint(a) == fingerprint(a.copy())
    b = a.copy()
    b[0, 0] = 99
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(a) != fingerprint(a.reshape(4, 3))


def test_encoder_output_is_normalised_and_loss_decreases() -> None:
    x, y = load("digits", "train")
    cfg = EncoderConfig(width=4, depth=1, emb_dim=8, epochs=3, batch_size=64, lr=5e-3, augment=False)
    model, info = train_encoder(x[:600], y[:600], cfg, progress=False)
    losses = info["loss_per_epoch"]
    assert losses[-1] < losses[0]
    e = embed(model, x[:50])
    assert e.shape == (50, 8)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


def test_torchscript_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = CNNEncoder(EncoderConfig(width=4, depth=2, emb_dim=8)).eval()
    save_encoder(model, tmp_path / "enc", {"name": "enc", "dim": 8})
    loaded = load_encoder(tmp_path / "enc")
    x, _ = load("digits", "test")
    ref = embed(model, x[:64])
    got = loaded.embed(x[:64])
    np.testing.assert_array_equal(ref, got)
    # the exported classifier head survives scripting too
    with torch.no_grad():
        t = torch.from_numpy(got)
        np.testing.assert_array_equal(model.logits(t).numpy(), loaded.module.logits(t).numpy())
