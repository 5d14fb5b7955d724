"""PruningPlan (JSON, validation, the PyTorch reference) and the block-mask pruners."""

from __future__ import annotations

import base64
import copy
import dataclasses
import json

import numpy as np
import pytest
import timm
import torch

from vitsparse.errors import PlanError
from vitsparse.frontend.testing import tiny_vit
from vitsparse.jobs.prune import prune
from vitsparse.plan import (
    BlockMask,
    PruningPlan,
    apply_plan_to_torch,
    validate_plan,
    weights_hash,
)
from vitsparse.pruning import DEFAULT_LAYERS, block_mask_plan, parse_block_spec

TINY_LAYERS = [
    f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return tiny_vit(depth=2)


@pytest.fixture(scope="module")
def plan(tiny) -> PruningPlan:
    return block_mask_plan(tiny, model_id="tiny_vit", block=(16, 16), keep=0.5)


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _blocks(weight: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out, inp = weight.shape
    return weight.reshape(out // rows, rows, inp // cols, cols).transpose(0, 2, 1, 3)


# --- the plan and its JSON ------------------------------------------------------------------


def test_default_layers_are_the_block_linears(plan):
    assert list(plan.layers) == TINY_LAYERS
    assert plan.budget == {
        "blocks": "16x16",
        "keep": 0.5,
        "layers": list(DEFAULT_LAYERS),
        "seed": 0,
    }
    qkv = plan.layers["blocks.0.attn.qkv"]
    assert (qkv.out_features, qkv.in_features, qkv.kept.shape, qkv.n_blocks) == (
        192,
        64,
        (12, 4),
        48,
    )
    assert qkv.n_kept == 24 and qkv.density == 0.5
    assert plan.mean_density == 0.5 and plan.kept_mac_fraction == 0.5
    assert not qkv.kept.flags.writeable


def test_json_round_trip(plan, tmp_path):
    text = json.dumps(plan.to_json())
    again = PruningPlan.from_json(json.loads(text))
    assert again == plan
    assert list(again.layers) == list(plan.layers)
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert PruningPlan.load(path) == plan
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]  # no temporary left


def test_the_weights_seed_is_optional_in_the_file(plan):
    """Written only when set (older plans and plans of checkpoints have none), read back, and
    checked."""
    assert "weights_seed" not in plan.to_json()
    seeded = dataclasses.replace(plan, weights_seed=3)
    data = seeded.to_json()
    assert data["weights_seed"] == 3
    assert PruningPlan.from_json(json.loads(json.dumps(data))).weights_seed == 3
    with pytest.raises(PlanError, match="'weights_seed' must be an integer, got 'x'"):
        PruningPlan.from_json({**data, "weights_seed": "x"})


def test_bitmap_is_row_major_packbits(plan):
    mask = plan.layers["blocks.0.attn.qkv"]
    entry = plan.to_json()["layers"]["blocks.0.attn.qkv"]["kept"]
    raw = np.frombuffer(base64.b64decode(entry["bits"]), dtype=np.uint8)
    assert len(raw) == 48 // 8
    assert entry["shape"] == [12, 4] and entry["count"] == mask.n_kept
    bits = np.unpackbits(raw)[:48].reshape(12, 4).astype(bool)
    np.testing.assert_array_equal(bits, mask.kept)


def test_plan_is_immutable(plan):
    with pytest.raises(TypeError):
        plan.layers["blocks.0.attn.qkv"] = plan.layers["blocks.0.attn.proj"]
    with pytest.raises(ValueError):
        plan.layers["blocks.0.attn.qkv"].kept[0, 0] = True


def test_weights_hash_covers_linear_weights_only(tiny):
    model = copy.deepcopy(tiny)
    before = weights_hash(model)
    assert weights_hash(tiny_vit(depth=2)) == before  # same seed, same weights
    with torch.no_grad():
        model.blocks[0].attn.qkv.bias.add_(1.0)
        model.norm.weight.add_(1.0)
    assert weights_hash(model) == before
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[3, 5] += 1e-3
    assert weights_hash(model) != before


# --- apply_plan_to_torch --------------------------------------------------------------------


def test_apply_zeroes_exactly_the_pruned_blocks(tiny, plan):
    before = _state(tiny)
    pruned = apply_plan_to_torch(tiny, plan)
    after = _state(tiny)
    assert before.keys() == after.keys()
    for key in before:  # the input model is untouched
        np.testing.assert_array_equal(before[key], after[key])
    pruned_state = _state(pruned)
    for name, mask in plan.layers.items():
        dense = _blocks(before[f"{name}.weight"], mask.rows, mask.cols)
        masked = _blocks(pruned_state[f"{name}.weight"], mask.rows, mask.cols)
        np.testing.assert_array_equal(masked[mask.kept], dense[mask.kept])
        assert not masked[~mask.kept].any()
        assert np.count_nonzero(dense[~mask.kept]) == dense[~mask.kept].size  # really pruned
    for key in before:  # biases and every other tensor unchanged
        if key.removesuffix(".weight") not in plan.layers:
            np.testing.assert_array_equal(pruned_state[key], before[key])


def test_masked_output_and_one_layer_by_hand(tiny, plan):
    pruned = apply_plan_to_torch(tiny, plan)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = {}
    layer = pruned.get_submodule("blocks.1.mlp.fc1")
    handle = layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        dense_out, pruned_out = tiny(x), pruned(x)
    handle.remove()
    assert not torch.allclose(dense_out, pruned_out, atol=1e-3)
    dense_layer = tiny.get_submodule("blocks.1.mlp.fc1")
    w = dense_layer.weight.detach().numpy() * plan.layers["blocks.1.mlp.fc1"].element_mask()
    expected = seen["x"].numpy() @ w.T + dense_layer.bias.detach().numpy()
    np.testing.assert_allclose(seen["y"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_fully_pruned_layer_is_legal(tiny, plan):
    empty = BlockMask(rows=16, cols=16, out_features=64, in_features=128, kept=np.zeros((4, 8)))
    layers = {**plan.layers, "blocks.0.mlp.fc2": empty}
    hand_made = PruningPlan(
        model_id="tiny_vit", weights_hash=plan.weights_hash, method="manual", layers=layers
    )
    assert PruningPlan.from_json(hand_made.to_json()) == hand_made
    pruned = apply_plan_to_torch(tiny, hand_made)
    assert not pruned.blocks[0].mlp.fc2.weight.any()


# --- the pruners ----------------------------------------------------------------------------


def _model_with_known_qkv(values: np.ndarray) -> torch.nn.Module:
    """tiny_vit whose blocks.0 qkv weight (192x64, 32x32 blocks -> 6x2) has block (i, j) filled
    with +-values[i, j] (alternating signs inside a block, so L1 counts magnitudes)."""
    model = tiny_vit(depth=2)
    signs = np.where(np.indices((32, 32)).sum(axis=0) % 2 == 0, 1.0, -1.0)
    weight = np.kron(values, np.ones((32, 32))) * np.tile(signs, values.shape)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.copy_(torch.from_numpy(weight))
    return model


def test_magnitude_keeps_the_largest_l1_blocks():
    values = np.array([[5, 1], [2, 9], [7, 3], [4, 10], [0.5, 8], [6, 0.1]], dtype=np.float32)
    model = _model_with_known_qkv(values)
    plan = block_mask_plan(
        model, model_id="m", block=(32, 32), keep=0.5, layers=["blocks.0.attn.qkv"]
    )
    assert list(plan.layers) == ["blocks.0.attn.qkv"]
    np.testing.assert_array_equal(plan.layers["blocks.0.attn.qkv"].kept, values >= 5)
    # keep=0.25 of 12 blocks -> 3; keep=0.01 -> at least 1; keep=1 -> all
    counts = {
        keep: block_mask_plan(model, model_id="m", block=(32, 32), keep=keep, layers=["*qkv"])
        .layers["blocks.0.attn.qkv"]
        .kept
        for keep in (0.25, 0.01, 1.0)
    }
    np.testing.assert_array_equal(counts[0.25], values >= 8)
    np.testing.assert_array_equal(counts[0.01], values == 10)
    assert counts[1.0].all()


def test_magnitude_ties_go_to_the_first_block_in_row_major_order():
    values = np.array([[1, 3], [3, 1], [3, 1], [1, 1], [1, 1], [1, 1]], dtype=np.float32)
    model = _model_with_known_qkv(values)
    plan = block_mask_plan(model, model_id="m", block=(32, 32), keep=2 / 12, layers=["*.0.*qkv"])
    expected = np.zeros((6, 2), dtype=bool)
    expected[0, 1] = expected[1, 0] = True  # (2, 0) has the same score but comes later
    np.testing.assert_array_equal(plan.layers["blocks.0.attn.qkv"].kept, expected)


def test_random_is_reproducible_and_seed_dependent(tiny):
    def kept(seed, layers=None):
        p = block_mask_plan(
            tiny, model_id="t", block=(16, 16), method="random", seed=seed, layers=layers
        )
        return {name: m.kept for name, m in p.layers.items()}

    first, again, other = kept(0), kept(0), kept(1)
    assert all(np.array_equal(first[n], again[n]) for n in first)
    assert any(not np.array_equal(first[n], other[n]) for n in first)
    assert all(m.sum() == m.size // 2 for m in first.values())
    # a layer's mask does not depend on which other layers are selected
    alone = kept(0, layers=["blocks.1.mlp.fc2"])
    np.testing.assert_array_equal(alone["blocks.1.mlp.fc2"], first["blocks.1.mlp.fc2"])
    magnitude = block_mask_plan(tiny, model_id="t", block=(16, 16)).layers["blocks.0.attn.qkv"]
    assert not np.array_equal(first["blocks.0.attn.qkv"], magnitude.kept)


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["blocks.1.*"], TINY_LAYERS[4:]),
        (["*.fc1", "*.fc2"], [n for n in TINY_LAYERS if n.endswith(("fc1", "fc2"))]),
        (["blocks.0.attn.*"], TINY_LAYERS[:2]),
    ],
)
def test_layers_selects_a_subset(tiny, patterns, expected):
    plan = block_mask_plan(tiny, model_id="t", block=(8, 8), layers=patterns)
    assert list(plan.layers) == expected
    assert plan.budget["layers"] == patterns


def test_pattern_matching_no_linear_layer(tiny):
    with pytest.raises(PlanError, match=r"'blocks\.0\.attn'.*matches no linear layer"):
        block_mask_plan(tiny, model_id="t", layers=["blocks.0.attn"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 0.0}, r"keep must be a fraction in \(0, 1\], got 0.0"),
        ({"keep": 1.5}, r"keep must be a fraction in \(0, 1\], got 1.5"),
        ({"method": "taylor"}, r"unknown pruning method 'taylor'; known: magnitude, random"),
        ({"seed": -1}, r"seed must be a non-negative integer, got -1"),
        ({"block": (24, 24)}, r"layer 'blocks.0.attn.qkv': block 24x24 is not handled"),
    ],
)
def test_bad_pruner_arguments(tiny, kwargs, message):
    with pytest.raises(PlanError, match=message):
        block_mask_plan(tiny, model_id="t", **kwargs)


def test_block_that_does_not_divide_the_layer():
    narrow = tiny_vit(depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(
        PlanError,
        match=r"layer 'blocks.0.attn.qkv': block 64x64 does not divide "
        r"its weight of shape \(96, 32\)",
    ):
        block_mask_plan(narrow, model_id="t", block=(64, 64))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("32x32:0.5", ((32, 32), 0.5)),
        ("16X64:1", ((16, 64), 1.0)),
        (" 8x8 : 0.25 ", ((8, 8), 0.25)),
    ],
)
def test_parse_block_spec(spec, expected):
    assert parse_block_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["32x32", "32:0.5", "32x32:", "axb:0.5", "32x32:0.5.1", "", "32x32:half"]
)
def test_malformed_block_spec(spec):
    with pytest.raises(PlanError, match="is not ROWSxCOLS:KEEP"):
        parse_block_spec(spec)


def test_prune_rejects_onnx():
    from vitsparse.errors import ModelError

    with pytest.raises(ModelError, match="ONNX file"):
        prune("model.onnx", method="magnitude", blocks="32x32:0.5")


# --- invalid plans --------------------------------------------------------------------------


def _edit(data: dict, path: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = path.split("/")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def _rename_layer(data: dict, old: str, new: str) -> dict:
    data = copy.deepcopy(data)
    data["layers"] = {new if k == old else k: v for k, v in data["layers"].items()}
    return data


QKV = "layers/blocks.0.attn.qkv"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: _edit(d, "version", 3),
            r"plan version 3 is not supported; this vitsparse reads version\(s\) 1, 2",
        ),
        (lambda d: _edit(d, "version", "1"), r"plan version '1' is not supported"),
        (lambda d: _edit(d, "format", "other"), r"not a vitsparse pruning plan"),
        (
            lambda d: _edit(d, "heads", {}),
            r"plan \(version 2\): unknown field\(s\) 'heads'; known fields",
        ),
        (lambda d: {k: v for k, v in d.items() if k != "method"}, r"missing field\(s\) 'method'"),
        (lambda d: _edit(d, "weights_hash", "abc"), r"'weights_hash' must be 'sha256:'"),
        (
            lambda d: _edit(d, f"{QKV}/rows", 24),
            r"layer 'blocks.0.attn.qkv': block 24x16 is not handled",
        ),
        (
            lambda d: _edit(d, f"{QKV}/cols", 128),
            r"layer 'blocks.0.attn.qkv': block 16x128 is not handled",
        ),
        (
            lambda d: _edit(d, f"{QKV}/in_features", 72),
            r"layer 'blocks.0.attn.qkv': block 16x16 does not divide its weight of shape "
            r"\(192, 72\)",
        ),
        (
            lambda d: _edit(d, f"{QKV}/kept/bits", "AAAA"),
            r"layer 'blocks.0.attn.qkv': bitmap holds 3 byte\(s\), but shape \(12, 4\) needs 6",
        ),
        (
            lambda d: _edit(d, f"{QKV}/kept/bits", "!!"),
            r"layer 'blocks.0.attn.qkv': bitmap 'bits' is not valid base64",
        ),
        (
            lambda d: _edit(d, f"{QKV}/kept/shape", [4, 12]),
            r"layer 'blocks.0.attn.qkv': block bitmap has shape \(4, 12\), but a \(192, 64\) "
            r"weight in 16x16 blocks needs \(12, 4\)",
        ),
        (
            lambda d: _edit(d, f"{QKV}/kept/count", 3),
            r"layer 'blocks.0.attn.qkv': bitmap keeps 24 block\(s\) but 'count' says 3",
        ),
        (
            lambda d: _edit(d, f"{QKV}/density", 0.5),
            r"layer 'blocks.0.attn.qkv': unknown field\(s\) 'density'",
        ),
    ],
)
def test_invalid_plan_json(plan, edit, message):
    with pytest.raises(PlanError, match=message):
        PruningPlan.from_json(edit(plan.to_json()))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: _rename_layer(d, "blocks.1.mlp.fc2", "blocks.9.mlp.fc2"),
            r"layer 'blocks.9.mlp.fc2' is not a module of model 'tiny_vit'; "
            r"did you mean blocks.1.mlp.fc2",
        ),
        (
            lambda d: _rename_layer(d, "blocks.0.attn.qkv", "blocks.0.norm1"),
            r"layer 'blocks.0.norm1' is a LayerNorm, not a torch.nn.Linear",
        ),
        (
            lambda d: _rename_layer(d, "blocks.0.attn.qkv", "blocks.0.attn.proj_"),
            r"layer 'blocks.0.attn.proj_' is not a module",
        ),
        (
            lambda d: _rename_layer(
                _rename_layer(d, "blocks.0.mlp.fc1", "x"), "blocks.0.attn.qkv", "blocks.0.mlp.fc1"
            ),
            r"layer 'blocks.0.mlp.fc1': the plan's mask is for a weight of shape \(192, 64\), "
            r"but the model's weight has shape \(128, 64\)",
        ),
    ],
)
def test_plan_that_does_not_fit_the_model(tiny, plan, edit, message):
    bad = PruningPlan.from_json(edit(plan.to_json()))
    with pytest.raises(PlanError, match=message):
        validate_plan(bad, tiny)
    with pytest.raises(PlanError, match=message):
        apply_plan_to_torch(tiny, bad)


def test_weights_hash_mismatch(plan):
    other = tiny_vit(depth=2, seed=1)
    with pytest.raises(
        PlanError, match=r"computed for other weights of 'tiny_vit'.*check_hash=False"
    ):
        apply_plan_to_torch(other, plan)
    pruned = apply_plan_to_torch(other, plan, check_hash=False)
    assert (
        not pruned.blocks[0]
        .attn.qkv.weight.detach()
        .numpy()[~plan.layers["blocks.0.attn.qkv"].element_mask()]
        .any()
    )


def test_load_reports_the_file(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json")
    with pytest.raises(PlanError, match="plan.json' is not valid JSON"):
        PruningPlan.load(path)
    path.write_text(json.dumps({"format": "vitsparse-pruning-plan", "version": 7}))
    with pytest.raises(PlanError, match=r"plan.json': plan version 7 is not supported"):
        PruningPlan.load(path)


# --- a real model ---------------------------------------------------------------------------


def test_deit_tiny_magnitude_plan():
    model = timm.create_model("deit_tiny_patch16_224").eval()
    plan = prune(model, method="magnitude", blocks="32x32:0.5")
    assert plan.model_id == "deit_tiny_patch16_224"
    assert len(plan.layers) == 48
    assert plan.layers["blocks.11.mlp.fc1"].kept.shape == (768 // 32, 192 // 32)
    assert plan.mean_density == 0.5
    assert PruningPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    pruned = apply_plan_to_torch(model, plan)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(model(x), pruned(x), atol=1e-4)
    fc2 = pruned.blocks[5].mlp.fc2.weight.detach().numpy()
    assert np.count_nonzero(fc2) == fc2.size // 2
