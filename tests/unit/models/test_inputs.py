"""Input specs: every model's preprocessing follows its manifest (channels, size, resize policy, mean/std), and
an ONNX export gives the TorchScript model's vectors. Each check is against an independent computation: PIL
and NumPy steps written out here, or the other runtime."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.fakes import TinyEncoder
from models.artifacts import ArtifactError, export_onnx, load_encoder, save_encoder
from models.preprocess import GRAY28, InputSpec, InvalidImage, decode, encode_png, preprocess
from models.validate import InvalidArtifact, check_encoder

RNG = np.random.default_rng(7)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _rgb(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "img",
    [
        Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)),
        Image.fromarray(RNG.integers(0, 256, (40, 33), dtype=np.uint8)),
        Image.fromarray(_rgb(28, 28)),
        Image.fromarray(_rgb(50, 20)),
        Image.fromarray(np.dstack([_rgb(30, 30), RNG.integers(0, 256, (30, 30, 1), dtype=np.uint8)]), "RGBA"),
        Image.fromarray(_rgb(28, 28)).convert("P"),
    ],
)
def test_the_shipped_spec_is_pil_gray_then_a_bilinear_stretch(img: Image.Image) -> None:
    """The 28 x 28 gray spec: PIL's gray conversion, then a bilinear resize when the size differs."""
    gray = img.convert("L")
    want = np.asarray(gray if gray.size == (28, 28) else gray.resize((28, 28), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(preprocess(_png(img)), want)


def test_colour_survives_decoding_and_gray_survives_an_rgb_spec() -> None:
    rgb = _rgb(20, 30)
    np.testing.assert_array_equal(decode(_png(Image.fromarray(rgb))), rgb)
    gray = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    spec = InputSpec(channels=3, size=(20, 30), mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_array_equal(spec.fit(gray), np.repeat(gray[..., None], 3, axis=2))


def test_crop_scales_the_shorter_side_then_takes_the_centre() -> None:
    img = _rgb(20, 40)  # h 20, w 40 -> 10 x 10 at crop_fraction 1: scale 0.5 -> 20 x 10, columns 5..15
    spec = InputSpec(channels=3, size=(10, 10), resize="crop", mean=(0, 0, 0), std=(1, 1, 1))
    scaled = np.asarray(Image.fromarray(img).resize((20, 10), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(spec.fit(img), scaled[:, 5:15])
    # crop_fraction 0.5: the shorter side goes to 20 (40 x 20), the crop keeps the centre 10 x 10
    half = InputSpec(channels=3, size=(10, 10), resize="crop", crop_fraction=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    scaled = np.asarray(Image.fromarray(img).resize((40, 20), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(half.fit(img), scaled[5:15, 15:25])


def test_pad_fits_the_longer_side_and_centres_on_black() -> None:
    img = np.full((20, 40), 200, np.uint8)  # -> 10 x 5 placed at rows 2..7 of a 10 x 10 black canvas
    out = InputSpec(size=(10, 10), resize="pad", interpolation="nearest").fit(img)
    assert out.shape == (10, 10)
    assert (out[2:7] == 200).all() and (out[:2] == 0).all() and (out[7:] == 0).all()


def test_batch_normalises_per_channel_in_nchw() -> None:
    spec = InputSpec(channels=3, size=(6, 5), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    imgs = RNG.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    want = (imgs.astype(np.float64) / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    got = spec.batch(imgs)
    assert got.shape == (4, 3, 6, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), atol=1e-5)
    mixed = [imgs[0], _rgb(12, 10)]  # decoded images of several sizes are fitted one by one
    assert spec.batch(mixed).shape == (2, 3, 6, 5)


def test_older_manifests_read_as_the_shipped_spec_and_bad_specs_name_their_field() -> None:
    assert InputSpec.from_manifest({"shape": [1, 28, 28], "dtype": "float32", "range": [0.0, 1.0]}) == GRAY28
    assert InputSpec.from_manifest(None) == GRAY28
    for bad, words in [
        ({"channels": 2}, "input.channels"),
        ({"size": [0, 28]}, "input.size"),
        ({"size": [28]}, "input.size"),
        ({"resize": "squash"}, "input.resize"),
        ({"crop_fraction": 1.5}, "input.crop_fraction"),
        ({"channels": 3, "mean": [0.5]}, "input.mean"),
        ({"std": [0.0]}, "input.std"),
        ({"interpolation": "lanczos9"}, "input.interpolation"),
    ]:
        with pytest.raises(ValueError, match=words.replace(".", r"\.")):
            InputSpec.from_manifest(bad)


def test_decode_still_refuses_what_no_spec_can_take() -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(InvalidImage, match=r"shape \(3, 28, 28\)"):
        decode(buf.getvalue())


def _rgb_encoder(directory: Path, name: str = "c3") -> Path:
    torch.manual_seed(3)
    spec = InputSpec(
        channels=3, size=(16, 12), resize="crop", crop_fraction=0.875, mean=(0.4, 0.5, 0.6), std=(0.2,) * 3
    )
    model = TinyEncoder(10, mix=False, in_features=3 * 16 * 12)
    return save_encoder(model, directory / name, {"name": name, "dim": 10, "input": spec.to_manifest()})


def test_an_encoder_runs_on_the_input_its_manifest_declares(tmp_path: Path) -> None:
    enc = load_encoder(_rgb_encoder(tmp_path))
    assert enc.spec.shape == (3, 16, 12)
    raw = [_png(Image.fromarray(_rgb(40, 30))), encode_png(RNG.integers(0, 256, (28, 28), dtype=np.uint8))]
    got = enc.embed([decode(r) for r in raw])
    # by hand: RGB; scale so the crop covers 16 x 12, over 0.875; centre crop; to [0, 1]; normalise.
    # 40 x 30: scale 0.4 / 0.875 -> 18 x 14, crop box (1, 1, 13, 17); 28 x 28: 0.571 / 0.875 -> 18 x 18, (3, 1, 15, 17)
    rows = []
    for r, (w, h), box in zip(raw, [(14, 18), (18, 18)], [(1, 1, 13, 17), (3, 1, 15, 17)], strict=True):
        img = Image.open(io.BytesIO(r)).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        a = np.asarray(img.crop(box), dtype=np.float32) / 255.0
        rows.append(((a - np.array([0.4, 0.5, 0.6])) / 0.2).transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(rows).astype(np.float32))
    with torch.no_grad():
        np.testing.assert_allclose(got, enc.module(x).numpy(), atol=1e-5)
    assert check_encoder(tmp_path / "c3").name == "c3"  # the probe batch follows the spec too


def test_onnx_export_gives_the_torchscript_vectors_and_validates(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    src = _rgb_encoder(tmp_path)
    out = export_onnx(src, tmp_path / "c3-onnx", name="c3o")
    ts, ox = load_encoder(src), load_encoder(out)
    assert ox.manifest["format"] == "onnx" and ox.spec == ts.spec and ox.name == "c3o"
    imgs = [decode(_png(Image.fromarray(_rgb(int(h), int(w))))) for h, w in RNG.integers(8, 64, (20, 2))]
    np.testing.assert_allclose(ox.embed(imgs), ts.embed(imgs), atol=1e-5)
    assert ox.embed(imgs[:1]).shape == (1, 10)  # a dynamic batch axis
    assert check_encoder(out).name == "c3o"
    (out / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(InvalidArtifact, match="not loadable"):
        check_encoder(out)
    with pytest.raises(ArtifactError, match="checksum"):
        load_encoder(out)
