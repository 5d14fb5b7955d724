"""The built-in digits dataset and ViT, image sources, and accuracy/fidelity evaluation."""

import numpy as np
import pytest
import torch

from vitsparse.cli import main
from vitsparse.data import digits
from vitsparse.data.sources import load_images
from vitsparse.errors import DataError, ModelError
from vitsparse.frontend import load_torch_model
from vitsparse.plan import PruningPlan, Structure, weights_hash
from vitsparse.pruning import compose_plan, structure_plan
from vitsparse.pruning.evaluate import evaluate


@pytest.fixture(scope="module")
def digits_model():
    # Trained once per machine (about two minutes, on one thread), then read from the cache.
    model, model_id = load_torch_model(digits.DIGITS_MODEL)
    return model, model_id


def test_digits_split_is_stratified_and_standardised():
    x_train, y_train = digits.digits_split("train")
    x_test, y_test = digits.digits_split("test")
    assert x_train.shape[1:] == (3, 32, 32) and len(y_train) + len(y_test) == 1797
    assert abs(len(y_test) / 1797 - 0.2) < 0.01
    assert set(np.bincount(y_test.numpy())) <= {35, 36, 37}  # every class held out alike
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-3
    with pytest.raises(ValueError, match="'train' or 'test'"):
        digits.digits_split("val")


def test_digits_vit_is_accurate_and_cached(digits_model):
    model, model_id = digits_model
    assert model_id == digits.DIGITS_MODEL
    report = evaluate(model, load_images("digits", image_size=32))
    assert report.top1_dense >= 0.95 and report.agreement is None
    again = digits.digits_vit()  # from the cache: the same weights, no training
    assert weights_hash(again) == weights_hash(model)
    assert list(digits.cache_dir().glob("digits_vit-*.pt"))
    with pytest.raises(ModelError, match="trained here"):
        load_torch_model(digits.DIGITS_MODEL, pretrained=True)


def test_fidelity_of_an_empty_and_a_real_plan(digits_model):
    model, model_id = digits_model
    data = load_images("digits", image_size=32, limit=120)
    whole = PruningPlan(
        model_id=model_id, weights_hash=weights_hash(model), method="hand", structure=Structure()
    )
    same = evaluate(model, data, whole)
    assert same.agreement == 1.0 and same.mean_kl < 1e-6 and same.top1_pruned == same.top1_dense
    plan = compose_plan(
        model, model_id=model_id, method="magnitude", structure=structure_plan(model, heads=0.25)
    )
    pruned = evaluate(model, data, plan)
    assert pruned.agreement < 1.0 and pruned.mean_kl > 1e-3
    assert pruned.top1_pruned < pruned.top1_dense


def test_synthetic_images_are_deterministic():
    a = load_images("synthetic", image_size=48, limit=5, seed=3)
    b = load_images("synthetic", image_size=48, limit=5, seed=3)
    assert a.images.shape == (5, 3, 48, 48) and a.labels is None
    assert torch.equal(a.images, b.images)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    data = load_images(tmp_path, image_size=32)
    assert data.images.shape == (6, 3, 32, 32) and sorted(data.labels.tolist()) == [0] * 3 + [1] * 3
    assert set(load_images(tmp_path, image_size=32, limit=4).labels.tolist()) == {0, 1}


def _folder(root, names):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in names:
        (root / label).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_eval_warns_when_the_folders_are_not_the_models_classes(tmp_path, capsys, digits_model):
    """Top-1 compares data label i with model class i: folders named after other classes make
    it meaningless, and eval says so; folders named 0..9 match the digits ViT."""
    wrong = _folder(tmp_path / "animals", ("cat", "dog"))
    with pytest.warns(UserWarning, match=r"label 0 is 'cat', the model has class '0'"):
        assert main(["eval", digits.DIGITS_MODEL, "--data", str(wrong)]) == 0
    out = capsys.readouterr().out
    assert "fidelity  - (no plan" in out  # the fidelity line is always there
    right = _folder(tmp_path / "digits", ("0", "1", "2"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["eval", digits.DIGITS_MODEL, "--data", str(right)]) == 0


@pytest.mark.parametrize(
    ("source", "size", "message"),
    [
        ("nowhere/images", 32, "is not a directory, nor one of 'digits'"),
        ("digits", 224, "the digits images are 32x32; this model takes 224x224"),
    ],
)
def test_bad_sources(source, size, message):
    with pytest.raises(DataError, match=message):
        load_images(source, image_size=size)


def test_empty_image_folder_is_an_error(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="holds no images|Found no valid file"):
        load_images(tmp_path, image_size=32)


def test_eval_cli(capsys, tmp_path, digits_model):
    plan_path = tmp_path / "plan.json"
    assert (
        main(
            [
                "prune",
                digits.DIGITS_MODEL,
                "--method",
                "magnitude",
                "--mlp",
                "0.5",
                "-o",
                str(plan_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "note" not in out  # the digits model is not timm's random init
    code = main(
        [
            "eval",
            digits.DIGITS_MODEL,
            "--data",
            "digits",
            "--plan",
            str(plan_path),
            "--limit",
            "100",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "top-1     dense" in out and "fidelity  top-1 agreement" in out
    assert (tmp_path / "eval.json").exists()
    code = main(["eval", digits.DIGITS_MODEL, "--data", str(tmp_path / "none")])
    assert code == 2 and "is not a directory" in capsys.readouterr().err
