"""What vitsparse knows about a ViT: its transformer blocks and where their weights live.

A ViTGraph is pure data, derived from the Relax module (see ``extract.py``) so that a PyTorch and an
ONNX import of the same network give the same geometry. The weight names are the names of
``main``'s Relax parameters; every linear weight is stored PyTorch-style as ``(out, in)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

# The linear layers of a block as timm names them, in `BlockInfo.weight_names` order.
BLOCK_LAYERS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class BlockInfo:
    """One transformer block: the Relax parameter names of its four linear layers and its sizes.

    ``num_heads * head_dim`` is the width of the attention (``qkv`` produces three times that); it
    equals ``embed_dim`` in an unpruned ViT and may be smaller after head pruning.
    """

    index: int
    qkv_weight: str
    qkv_bias: str | None
    proj_weight: str
    proj_bias: str | None
    fc1_weight: str
    fc1_bias: str | None
    fc2_weight: str
    fc2_bias: str | None
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_dim: int

    @property
    def attn_dim(self) -> int:
        """Width of the attention: ``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    def weight_names(self) -> tuple[str, ...]:
        """The four linear weight names in execution order (qkv, proj, fc1, fc2)."""
        return (self.qkv_weight, self.proj_weight, self.fc1_weight, self.fc2_weight)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> BlockInfo:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class ViTGraph:
    """Geometry of an imported Vision Transformer.

    Attributes
    ----------
    model_id
        Name of the model (timm name, module class name or ONNX file stem).
    blocks
        The transformer blocks in execution order.
    embed_dim, num_heads
        Token width and head count of block 0 (blocks may differ after pruning).
    patch_size, image_size, num_patches
        Patch-embedding geometry; ``num_patches = (H // patch) * (W // patch)``.
    num_prefix_tokens
        Tokens in front of the patches (class token, distillation token, register tokens).
    num_tokens
        Sequence length inside the blocks: ``num_prefix_tokens + num_patches``.
    num_classes
        Output width of the classifier head (0 when the model has none).
    param_map
        Relax parameter name -> PyTorch parameter name, ``""`` where unknown (ONNX input).
    """

    model_id: str
    blocks: tuple[BlockInfo, ...]
    embed_dim: int
    num_heads: int
    patch_size: int
    image_size: tuple[int, int]
    num_patches: int
    num_prefix_tokens: int
    num_tokens: int
    num_classes: int
    param_map: dict[str, str] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def to_json(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {
            "model_id": self.model_id,
            "blocks": [b.to_json() for b in self.blocks],
            "embed_dim": self.embed_dim,
            "num_heads": self.num_heads,
            "patch_size": self.patch_size,
            "image_size": list(self.image_size),
            "num_patches": self.num_patches,
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_tokens": self.num_tokens,
            "num_classes": self.num_classes,
            "param_map": dict(self.param_map),
        }

    @classmethod
    def from_json(cls, data: dict) -> ViTGraph:
        return cls(
            model_id=data["model_id"],
            blocks=tuple(BlockInfo.from_json(b) for b in data["blocks"]),
            embed_dim=data["embed_dim"],
            num_heads=data["num_heads"],
            patch_size=data["patch_size"],
            image_size=tuple(data["image_size"]),
            num_patches=data["num_patches"],
            num_prefix_tokens=data["num_prefix_tokens"],
            num_tokens=data["num_tokens"],
            num_classes=data["num_classes"],
            param_map=dict(data.get("param_map", {})),
        )

    def summary(self) -> str:
        """A few human-readable lines: overall geometry, then one line per block."""
        h, w = self.image_size
        lines = [
            f"{self.model_id}: {self.depth} blocks, embed {self.embed_dim}, "
            f"{self.num_heads} heads, image {h}x{w}, patch {self.patch_size}, "
            f"tokens {self.num_tokens} ({self.num_prefix_tokens} prefix + {self.num_patches} "
            f"patches), classes {self.num_classes}"
        ]
        for b in self.blocks:
            lines.append(
                f"  block {b.index:2d}: heads {b.num_heads} x {b.head_dim}, mlp {b.mlp_dim}"
            )
        return "\n".join(lines)
