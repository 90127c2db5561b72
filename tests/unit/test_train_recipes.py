"""`backfill train encoder NAME [recipe options]` and `backfill train compat` for any model pair.

The option parsing and validation run without data; the training tests use the quick recipe (sklearn
digits, one or two epochs of tiny models) and take seconds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from models.artifacts import ArtifactError, load_compat, load_encoder
from models.data import load
from models.encoders import ARCH_DEFAULTS, ConfigError, EncoderConfig
from models.train import Recipe, check_dataset, encoder_config, head_labels

TINY_MIXER = ["--arch", "mixer", "--width", "16", "--depth", "1", "--emb-dim", "10", "--epochs", "1"]
TINY_CNN_5_9 = ["--classes", "5,6,7,8,9", "--emb-dim", "6", "--width", "4", "--depth", "1", "--seed", "3"]


def invoke(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.output


def train(out: Path, name: str, *options: str) -> Path:
    code, output = invoke("train", "encoder", name, "--quick", "--threads", "1", "--out", str(out), *options)
    assert code == 0, output
    assert f"wrote {out / name}" in output and "heldout accuracy" in output
    return out / name


# ------------------------------------------------------------------------------------------ recipes


def test_v1_v2_without_options_are_the_shipped_recipes() -> None:
    for recipe in (Recipe(), Recipe.quick()):
        assert encoder_config("v1", recipe) == recipe.v1
        assert encoder_config("v2", recipe) == recipe.v2
    assert Recipe().v1.classes == (0, 1, 2, 3, 4) and Recipe().v1.n_classes == 5
    assert Recipe().v2.classes is None and Recipe().v2.n_classes == 10


def test_options_override_the_named_recipe_and_other_names_start_from_v2() -> None:
    recipe = Recipe()
    v1 = encoder_config("v1", recipe, {"emb_dim": 40, "seed": 7})
    assert v1 == replace(recipe.v1, emb_dim=40, seed=7) and v1.classes == (0, 1, 2, 3, 4)
    a1 = encoder_config("a1", recipe, {"classes": [5, 6, 7, 8, 9], "width": 12, "scale": 8.0})
    assert a1 == replace(recipe.v2, classes=(5, 6, 7, 8, 9), n_classes=5, width=12, scale=8.0)
    # switching arch without width/depth takes the new arch's defaults; given ones win
    b2 = encoder_config("b2", recipe, {"arch": "mixer", "emb_dim": 64})
    assert (b2.arch, b2.width, b2.depth, b2.emb_dim) == ("mixer", *ARCH_DEFAULTS["mixer"].values(), 64)
    assert encoder_config("b3", recipe, {"arch": "mixer", "depth": 2}).depth == 2
    # the manifest's config rebuilds the recipe
    assert EncoderConfig(**{**a1.to_dict(), "classes": (5, 6, 7, 8, 9)}) == a1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"classes": [5, 5, 6]}, "classes"),
        ({"classes": [3]}, "classes"),
        ({"classes": [0, 10]}, "classes"),
        ({"arch": "vit"}, "arch"),
        ({"depth": 5}, "depth"),
        ({"width": 0}, "width"),
        ({"scale": 0.0}, "scale"),
        ({"lr": -1.0}, "lr"),
        ({"batch_size": 1}, "batch_size"),
    ],
)
def test_invalid_recipes_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        encoder_config("x1", Recipe(), overrides)
    assert e.value.field == field


# ------------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("classes", ["5,5,6", "3", "0,10", "-1,2", "a,b", "1,,2"])
def test_bad_classes_exit_2_naming_the_option(tmp_path: Path, classes: str) -> None:
    code, output = invoke("train", "encoder", "x1", "--quick", "--out", str(tmp_path), "--classes", classes)
    assert code == 2, output
    assert "--classes" in output and "Traceback" not in output
    assert not (tmp_path / "x1").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["x1", "--arch", "vit"], "--arch"),
        (["x1", "--depth", "5"], "--depth"),
        (["x1", "--emb-dim", "1"], "--emb-dim"),
        (["x1", "--scale", "0"], "--scale"),
        (["x1", "--batch-size", "1"], "--batch-size"),
        (["../x1"], "name"),
        (["compat-a-b"], "name"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tmp_path: Path, args: list[str], option: str) -> None:
    code, output = invoke("train", "encoder", *args, "--quick", "--out", str(tmp_path))
    assert code == 2, output
    assert option in output and "Traceback" not in output


def test_compat_of_a_missing_encoder_exits_2(tmp_path: Path) -> None:
    code, output = invoke("train", "compat", "--quick", "--out", str(tmp_path), "--old", "nope", "--new", "v2")
    assert code == 2 and "nope" in output, output
    code, output = invoke("train", "compat", "--quick", "--out", str(tmp_path), "--old", "v2", "--new", "v2")
    assert code == 2 and "--new" in output, output


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cnn on classes 5-9 (old) and a tiny mixer on all classes (new), trained through the CLI."""
    out = tmp_path_factory.mktemp("pair")
    train(out, "o59", *TINY_CNN_5_9)
    train(out, "mix", *TINY_MIXER)
    return out


def test_a_mixer_trains_through_the_cli_and_loads(pair: Path) -> None:
    enc = load_encoder(pair / "mix")
    assert enc.dim == 10
    x, _ = load("digits", "test")
    e = enc.embed(x[:64])
    assert e.shape == (64, 10) and e.dtype == np.float32 and np.isfinite(e).all()
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert enc.module.logits(torch.from_numpy(e)).shape == (64, 10)
    cfg = enc.manifest["config"]
    assert (cfg["arch"], cfg["module"], cfg["width"], cfg["depth"]) == ("mixer", "MixerEncoder", 16, 1)
    assert cfg["classes"] == list(range(10)) and cfg["n_classes"] == 10 and cfg["epochs"] == 1
    assert enc.manifest["data"]["dataset"] == "digits"
    assert 0.0 <= enc.manifest["metrics"]["heldout_accuracy"] <= 1.0


def test_a_subset_cnn_records_its_classes_and_heads_them(pair: Path) -> None:
    enc = load_encoder(pair / "o59")
    m = json.loads((pair / "o59" / "manifest.json").read_text())
    assert m["config"]["classes"] == [5, 6, 7, 8, 9] and m["config"]["n_classes"] == 5 and m["dim"] == 6
    assert m["metrics"]["heldout_n"] < 300  # scored on its own classes of the 300 calibration images
    x, _ = load("digits", "test")
    logits = enc.module.logits(torch.from_numpy(enc.embed(x[:8])))
    assert logits.shape == (8, 5)
    # dataset labels -> head indices; labels the head never saw are ignored (-100) by h's cross-entropy
    np.testing.assert_array_equal(head_labels(enc, np.array([5, 9, 0, 7, 4])), [0, 4, -100, 2, -100])
    assert list(head_labels(load_encoder(pair / "mix"), np.arange(10))) == list(range(10))


@pytest.mark.parametrize(("old", "new"), [("o59", "mix"), ("mix", "o59")])
def test_a_compat_pack_trains_between_any_two_encoders(pair: Path, old: str, new: str) -> None:
    code, output = invoke(
        "train", "compat", "--quick", "--threads", "1", "--out", str(pair), "--old", old, "--new", new
    )
    assert code == 0, output
    pack = load_compat(pair / f"compat-{old}-{new}")
    dims = {"o59": 6, "mix": 10}
    assert (pack.from_dim, pack.to_dim) == (dims[old], dims[new])
    x, _ = load("digits", "test")
    o, n = load_encoder(pair / old).embed(x[:32]), load_encoder(pair / new).embed(x[:32])
    for got, dim in ((pack.reverse(n), dims[old]), (pack.forward(o), dims[new])):
        assert got.shape == (32, dim) and np.isfinite(got).all()
    assert np.isfinite(pack.uncertainty(o)).all()
    assert set(pack.manifest["calibration"]) >= {"reverse", "forward"}


def test_compat_refuses_encoders_of_another_dataset(pair: Path) -> None:
    with pytest.raises(ArtifactError, match="digits"):
        check_dataset(Recipe(), load_encoder(pair / "mix"))
    check_dataset(Recipe.quick(), load_encoder(pair / "mix"))
