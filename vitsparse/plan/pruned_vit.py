"""The PyTorch reference of a structurally pruned timm ViT (the semantics the passes compile).

`apply_structure(model, structure)` returns a new module whose weights are physically sliced:

- heads and head dimensions: the qkv layer keeps, per kept head, its kept query/key dimensions
  and its kept value dimensions (output rows ordered q, k, v, each head-major); the projection
  keeps the matching input columns. The attention scale stays the original ``head_dim ** -0.5``.
- MLP neurons: fc1 keeps their rows (and bias), fc2 their columns.
- embedding channels (one set for the model): every tensor on the residual stream keeps them:
  the patch projection's output channels, class/distillation tokens, position embedding, every
  LayerNorm (which then normalises over the kept channels), the inputs of qkv, fc1 and the
  classifier heads, and the outputs of proj and fc2.
- tokens: see `vitsparse.plan.structure` (after the attention residual of a block, the top
  ``keep`` patch tokens by the block's rule, in their original order; prefix tokens stay).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vitsparse.errors import PlanError
from vitsparse.plan.structure import BlockStructure, Structure, ViTGeometry


def geometry_of(model: nn.Module) -> ViTGeometry:
    """The geometry of a timm VisionTransformer (raises PlanError for other models)."""
    blocks = getattr(model, "blocks", None)
    embed = getattr(model, "patch_embed", None)
    if blocks is None or embed is None or not hasattr(model, "_pos_embed"):
        raise PlanError(
            f"structural pruning needs a timm VisionTransformer; {type(model).__name__} is not one"
        )
    return ViTGeometry(
        embed_dim=int(model.embed_dim),
        num_heads=[int(b.attn.num_heads) for b in blocks],
        head_dim=[int(b.attn.head_dim) for b in blocks],
        mlp_dim=[int(b.mlp.fc1.out_features) for b in blocks],
        num_patches=int(embed.num_patches),
        num_prefix_tokens=int(model.num_prefix_tokens),
    )


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _index(kept, size: int) -> torch.Tensor:
    return torch.tensor(list(range(size)) if kept is None else list(kept.kept), dtype=torch.long)


class PrunedAttention(nn.Module):
    """Multi-head self-attention with kept heads and kept q/k and v dimensions; returns the
    output and the attention probabilities (B, heads, N, N)."""

    def __init__(self, attn: nn.Module, block: BlockStructure, embed: torch.Tensor):
        super().__init__()
        heads, dims = int(attn.num_heads), int(attn.head_dim)
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                raise PlanError(f"attention with a {name} layer is not supported by pruning")
        if getattr(attn, "gate", None) is not None:
            raise PlanError("gated attention is not supported by pruning")
        h = _index(block.heads, heads)
        qk = _index(block.qk_dims, dims)
        v = _index(block.v_dims, dims)
        w = attn.qkv.weight.detach().reshape(3, heads, dims, -1)[:, h][:, :, :, embed]
        b = None
        if attn.qkv.bias is not None:
            b = attn.qkv.bias.detach().reshape(3, heads, dims)[:, h]
        parts_w = [w[0][:, qk], w[1][:, qk], w[2][:, v]]
        weight = torch.cat([p.reshape(-1, len(embed)) for p in parts_w])
        bias = None
        if b is not None:
            bias = torch.cat(
                [b[0][:, qk].reshape(-1), b[1][:, qk].reshape(-1), b[2][:, v].reshape(-1)]
            )
        self.qkv = _linear(weight, bias)
        pw = attn.proj.weight.detach().reshape(-1, heads, dims)[embed][:, h][:, :, v]
        pb = None if attn.proj.bias is None else attn.proj.bias.detach()[embed]
        self.proj = _linear(pw.reshape(len(embed), -1), pb)
        self.heads, self.qk_dim, self.v_dim = len(h), len(qk), len(v)
        self.scale = float(attn.scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        qk_width = self.heads * self.qk_dim
        q, k, v = self.qkv(x).split([qk_width, qk_width, self.heads * self.v_dim], dim=-1)
        q = q.reshape(b, n, self.heads, self.qk_dim).transpose(1, 2)
        k = k.reshape(b, n, self.heads, self.qk_dim).transpose(1, 2)
        v = v.reshape(b, n, self.heads, self.v_dim).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.heads * self.v_dim)
        return self.proj(out), attn


class PrunedBlock(nn.Module):
    """A transformer block with sliced attention and MLP, and token pruning after attention."""

    def __init__(self, blk: nn.Module, block: BlockStructure, embed: torch.Tensor, prefix: int):
        super().__init__()
        self.norm1 = _layer_norm(blk.norm1, embed)
        self.attn = PrunedAttention(blk.attn, block, embed)
        self.ls1, self.ls2 = _layer_scale(blk.ls1, embed), _layer_scale(blk.ls2, embed)
        self.norm2 = _layer_norm(blk.norm2, embed)
        mlp = blk.mlp
        if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            raise PlanError("an MLP with a norm layer is not supported by pruning")
        hidden = _index(block.mlp, mlp.fc1.out_features)
        fc1_b = None if mlp.fc1.bias is None else mlp.fc1.bias.detach()[hidden]
        fc2_b = None if mlp.fc2.bias is None else mlp.fc2.bias.detach()[embed]
        self.mlp = nn.Module()  # keeps timm's layer names: blocks.<i>.mlp.fc1 / .fc2
        self.mlp.fc1 = _linear(mlp.fc1.weight.detach()[hidden][:, embed], fc1_b)
        self.mlp.act = copy.deepcopy(mlp.act)
        self.mlp.fc2 = _linear(mlp.fc2.weight.detach()[embed][:, hidden], fc2_b)
        self.tokens = block.tokens
        self.prefix = prefix

    def forward(self, x: torch.Tensor, cumulative: torch.Tensor | None):
        out, attn = self.attn(self.norm1(x))
        x = x + self.ls1(out)
        # CP-ViT: per head the strongest attention any query pays to the token, summed over heads.
        received = attn.amax(dim=2).sum(dim=1)[:, self.prefix :]
        cumulative = received if cumulative is None else cumulative + received
        if self.tokens is not None:
            if self.tokens.rule == "cls_attention":
                score = attn[:, :, 0, self.prefix :].mean(dim=1)
            else:
                score = cumulative
            # Ties (a head whose q or k weights are all pruned attends uniformly) go to the
            # earlier token: a stable sort, as the compiled model's argsort.
            order = torch.argsort(score, dim=-1, descending=True, stable=True)
            top = order[:, : self.tokens.keep].sort(dim=-1).values
            patches = x[:, self.prefix :].gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, : self.prefix], patches], dim=1)
            cumulative = cumulative.gather(1, top)
        mlp = self.mlp
        x = x + self.ls2(mlp.fc2(mlp.act(mlp.fc1(self.norm2(x)))))
        return x, cumulative


class PrunedViT(nn.Module):
    """A timm ViT with its structure pruned (built by `apply_structure`); module names follow
    timm's (``blocks.<i>.attn.qkv``, ``blocks.<i>.mlp.fc1``, ``head``)."""

    def __init__(self, model: nn.Module, structure: Structure):
        super().__init__()
        geo = geometry_of(model)
        unsupported = structural_support(model)
        if unsupported:
            raise PlanError(unsupported)
        embed = _index(structure.embed, geo.embed_dim)
        # DeiT III and register-token ViTs add the position embedding to the patches only.
        self.no_embed_class = bool(getattr(model, "no_embed_class", False))
        self.prefix = geo.num_prefix_tokens
        self.global_pool = getattr(model, "global_pool", "token")
        self.patch_embed = copy.deepcopy(model.patch_embed)
        _slice_conv_out(self.patch_embed, embed)
        self.cls_token = nn.Parameter(model.cls_token.detach()[..., embed].clone())
        dist = getattr(model, "dist_token", None)
        self.dist_token = None if dist is None else nn.Parameter(dist.detach()[..., embed].clone())
        reg = getattr(model, "reg_token", None)
        self.reg_token = None if reg is None else nn.Parameter(reg.detach()[..., embed].clone())
        self.pos_embed = nn.Parameter(model.pos_embed.detach()[..., embed].clone())
        self.norm_pre = _layer_norm(model.norm_pre, embed)
        self.blocks = nn.ModuleList(
            PrunedBlock(blk, structure.block(i), embed, self.prefix)
            for i, blk in enumerate(model.blocks)
        )
        self.norm = _layer_norm(model.norm, embed)
        self.fc_norm = _layer_norm(getattr(model, "fc_norm", nn.Identity()), embed)
        self.head = _slice_head(model.head, embed)
        head_dist = getattr(model, "head_dist", None)
        self.head_dist = None if head_dist is None else _slice_head(head_dist, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:
            x = torch.cat([*prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + self.pos_embed
        x = self.norm_pre(x)
        cumulative = None
        for blk in self.blocks:
            x, cumulative = blk(x, cumulative)
        x = self.norm(x)
        if self.head_dist is not None:  # DeiT distilled, inference: the two heads averaged
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        pooled = x[:, 0] if self.global_pool == "token" else x[:, self.prefix :].mean(dim=1)
        return self.head(self.fc_norm(pooled))


def structural_support(model: nn.Module) -> str | None:
    """Why structural pruning cannot handle ``model`` (a timm ViT), naming the feature; None
    where it can: class token (and DeiT's distillation token), register tokens, position
    embedding added with or without the prefix tokens (DeiT III), LayerScale, token or average
    pooling."""
    if getattr(model, "dynamic_img_size", False):
        return "structural pruning does not support timm ViTs with dynamic_img_size=True"
    if getattr(model, "cls_token", None) is None:
        return "structural pruning needs a class token (this ViT has class_token=False)"
    if getattr(model, "pos_embed", None) is None:
        return "structural pruning needs a learned position embedding (this ViT has none)"
    pool = getattr(model, "global_pool", "token")
    if pool not in ("token", "avg"):
        return f"structural pruning does not support global_pool={pool!r} (only 'token', 'avg')"
    return None


def apply_structure(model: nn.Module, structure: Structure) -> nn.Module:
    """A new module: ``model`` with ``structure`` applied (``model`` is not modified)."""
    return PrunedViT(model, structure).eval()


def _layer_norm(norm: nn.Module, embed: torch.Tensor) -> nn.Module:
    if isinstance(norm, nn.Identity):
        return norm
    if not isinstance(norm, nn.LayerNorm):
        raise PlanError(f"{type(norm).__name__} is not supported by embedding pruning")
    out = nn.LayerNorm(len(embed), eps=norm.eps, elementwise_affine=norm.elementwise_affine)
    if norm.elementwise_affine:
        with torch.no_grad():
            out.weight.copy_(norm.weight[embed])
            out.bias.copy_(norm.bias[embed])
    return out


def _layer_scale(ls: nn.Module, embed: torch.Tensor) -> nn.Module:
    if isinstance(ls, nn.Identity):
        return ls
    out = copy.deepcopy(ls)
    out.gamma = nn.Parameter(ls.gamma.detach()[embed].clone())
    return out


def _slice_conv_out(patch_embed: nn.Module, embed: torch.Tensor) -> None:
    proj = patch_embed.proj
    out = nn.Conv2d(
        proj.in_channels,
        len(embed),
        proj.kernel_size,
        proj.stride,
        proj.padding,
        bias=proj.bias is not None,
    )
    with torch.no_grad():
        out.weight.copy_(proj.weight[embed])
        if proj.bias is not None:
            out.bias.copy_(proj.bias[embed])
    patch_embed.proj = out
    patch_embed.norm = _layer_norm(patch_embed.norm, embed)


def _slice_head(head: nn.Module, embed: torch.Tensor) -> nn.Module:
    if not isinstance(head, nn.Linear):
        return head  # nn.Identity (no classifier)
    bias = None if head.bias is None else head.bias.detach()
    return _linear(head.weight.detach()[:, embed], bias)


def dense_state_dict(model: nn.Module, structure: Structure, pruned: nn.Module) -> dict:
    """The inverse of `apply_structure`: ``model``'s state dict (a copy) with every entry that
    ``pruned`` (``apply_structure(model, structure)``, trained since, say) kept replaced by
    ``pruned``'s value; the entries the structure removed keep ``model``'s. Loading it into
    ``model``'s architecture and applying ``structure`` again gives ``pruned``'s weights.

    Where each kept entry came from is found by applying the structure to a copy of ``model``
    whose every tensor holds its own element positions (in float64, exact to 2**53)."""
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    positions = copy.deepcopy(model).to(torch.float64)
    with torch.no_grad():
        for tensor in positions.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.arange(tensor.numel(), dtype=torch.float64).view_as(tensor))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # the pruned copy's new layers hold positions too
    try:
        where = PrunedViT(positions, structure).state_dict()
    finally:
        torch.set_default_dtype(previous)
    for name, value in pruned.state_dict().items():
        if name not in state or name not in where:
            raise PlanError(f"pruned parameter {name!r} has no counterpart in the dense model")
        index = where[name].reshape(-1).long()
        target = state[name].view(-1)
        target[index] = value.detach().reshape(-1).to(target.dtype)
    return state
