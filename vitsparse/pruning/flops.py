"""FLOPs of a (pruned) ViT, counted analytically from the geometry and a plan (a Relax module's
are read off its matmuls and convolutions by `vitsparse.passes.macs`).

Convention: the multiply-accumulates (MACs) of the patch embedding, every linear layer, the two
attention matmuls and the classifier; ``flops = 2 * macs``. (DeiT's and CP-ViT's "FLOPs" are these
MACs: DeiT-S is 4.6 G.) Normalisation, softmax, GELU and residual adds are not counted. A
block-masked layer counts its kept blocks only (its density times its dense MACs). The analytic
count is of the plan as PyTorch runs it: where a block keeps q/k and v dims of different sizes the
compiled model pads the narrower to the wider (PruneHeads), which is not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vitsparse.plan import PruningPlan, Structure, check_against, geometry_of, load_plan

PARTS = ("patch_embed", "qkv", "attention", "proj", "mlp", "head")


@dataclass(frozen=True)
class FlopsReport:
    """MACs of one forward pass, in total and per part (``PARTS`` for the analytic count,
    ``matmul``/``conv2d`` for a Relax module)."""

    model: str
    batch: int
    by_part: dict[str, int] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return sum(self.by_part.values())

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def ratio(self, other: FlopsReport) -> float:
        """This model's MACs over ``other``'s."""
        return self.macs / other.macs


def flops(
    model: torch.nn.Module,
    plan: PruningPlan | Structure | str | None = None,
    *,
    batch: int = 1,
    model_id: str | None = None,
) -> FlopsReport:
    """MACs/FLOPs of ``model`` (a timm ViT) pruned by ``plan`` (a PruningPlan, its JSON file, or
    a bare `Structure`), counted from its geometry and the plan. (``vitsparse.flops`` also takes
    a model's name, and reads a Relax module's off its matmuls.)"""
    geo, structure, density = _resolve(model, plan, model_id)
    embed = geo.embed_dim if structure.embed is None else len(structure.embed.kept)
    prefix = geo.num_prefix_tokens
    tokens = structure.token_schedule(geo.num_patches, geo.depth)
    conv = model.patch_embed.proj
    parts = dict.fromkeys(PARTS, 0)
    parts["patch_embed"] = geo.num_patches * embed * conv.in_channels * math.prod(conv.kernel_size)
    for i in range(geo.depth):
        heads, qk, v, hidden = _block_dims(structure, geo, i)
        n_in, n_out = prefix + tokens[i], prefix + tokens[i + 1]

        def d(layer: str, i=i) -> float:
            return density.get(f"blocks.{i}.{layer}", 1.0)

        parts["qkv"] += round(n_in * embed * heads * (2 * qk + v) * d("attn.qkv"))
        parts["attention"] += heads * n_in * n_in * (qk + v)
        parts["proj"] += round(n_in * heads * v * embed * d("attn.proj"))
        parts["mlp"] += round(n_out * embed * hidden * (d("mlp.fc1") + d("mlp.fc2")))
    parts["head"] = embed * _classes(model)
    model_id = model_id or type(model).__name__
    return FlopsReport(model_id, batch, {k: v * batch for k, v in parts.items()})


def params(model: torch.nn.Module, plan: PruningPlan | Structure | str | None = None) -> int:
    """Weights of ``model`` pruned by ``plan``: the patch projection, every linear layer of the
    blocks (a block-masked layer counts its kept blocks) and the classifier. Biases, norms,
    tokens and position embeddings are not counted (well under 1% of a ViT)."""
    geo, structure, density = _resolve(model, plan)
    embed = geo.embed_dim if structure.embed is None else len(structure.embed.kept)
    conv = model.patch_embed.proj
    total = embed * conv.in_channels * math.prod(conv.kernel_size) + embed * _classes(model)
    for i in range(geo.depth):
        heads, qk, v, hidden = _block_dims(structure, geo, i)

        def d(layer: str, i=i) -> float:
            return density.get(f"blocks.{i}.{layer}", 1.0)

        total += round(embed * heads * (2 * qk + v) * d("attn.qkv"))
        total += round(heads * v * embed * d("attn.proj"))
        total += round(embed * hidden * (d("mlp.fc1") + d("mlp.fc2")))
    return total


def block_shapes(
    model: torch.nn.Module, plan: PruningPlan | Structure | str | None = None
) -> list[dict]:
    """Per transformer block of ``model`` pruned by ``plan``: its embed, heads, head dim (the
    larger of q/k and v: the compiled model pads the smaller), MLP width and input tokens, as
    `vitsparse.targets.cost_table.CostTable.block_ms` takes them."""
    geo, structure, _ = _resolve(model, plan)
    embed = geo.embed_dim if structure.embed is None else len(structure.embed.kept)
    tokens = structure.token_schedule(geo.num_patches, geo.depth)
    shapes = []
    for i in range(geo.depth):
        heads, qk, v, hidden = _block_dims(structure, geo, i)
        shapes.append(
            dict(
                embed=embed,
                heads=heads,
                head_dim=max(qk, v),
                mlp=hidden,
                tokens=geo.num_prefix_tokens + tokens[i],
            )
        )
    return shapes


def _resolve(model: torch.nn.Module, plan, model_id: str | None = None):
    """(geometry, structure, {layer: density}) of a timm ViT and a plan."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    model_id = model_id or type(model).__name__
    geo = geometry_of(model)
    if isinstance(plan, Structure):  # a bare structure: what criteria try while they search
        structure, density = plan, {}
    else:
        plan = load_plan(plan)
        structure = Structure() if plan is None or plan.structure is None else plan.structure
        density = {} if plan is None else {name: m.density for name, m in plan.layers.items()}
    check_against(structure, geo, model_id)  # counts only mean something for a plan that fits
    return geo, structure, density


def _block_dims(structure: Structure, geo, i: int) -> tuple[int, int, int, int]:
    """Kept (heads, q/k dim, v dim, MLP neurons) of block ``i``."""
    block = structure.block(i)
    return (
        _kept(block.heads, geo.num_heads[i]),
        _kept(block.qk_dims, geo.head_dim[i]),
        _kept(block.v_dims, geo.head_dim[i]),
        _kept(block.mlp, geo.mlp_dim[i]),
    )


def _classes(model) -> int:
    """Outputs of the classifier(s): the head, plus the distillation head where there is one."""
    heads = (getattr(model, "head", None), getattr(model, "head_dist", None))
    return sum(h.out_features for h in heads if isinstance(h, torch.nn.Linear))


def _kept(index_set, size: int) -> int:
    return size if index_set is None else len(index_set.kept)
