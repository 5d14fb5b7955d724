"""PruneEmbedding: keep one set of embedding (residual-stream) channels in the whole model.

Every weight on the residual stream keeps the kept channels along its embedding axis: the patch
projection's output channels, class/distillation tokens and position embedding, every LayerNorm
(which then normalises over the kept channels), the input columns of qkv, fc1 and the classifier
heads, the output rows of proj and fc2, and LayerScale gammas. Run before BindParams
(``passes._slicing``).
"""

from __future__ import annotations

import re

from vitsparse._tvm import tvm
from vitsparse.errors import PlanError
from vitsparse.passes._slicing import Slicing, SlicingPass

# PyTorch parameter name -> its embedding axis.
_EMBED_AXES = (
    (r"patch_embed\.proj\.(weight|bias)", 0),
    (r"(cls_token|dist_token|reg_token|pos_embed)", -1),
    (r"(blocks\.\d+\.)?(norm\d?|norm_pre|fc_norm|patch_embed\.norm)\.(weight|bias)", 0),
    (r"blocks\.\d+\.attn\.qkv\.weight", 1),
    (r"blocks\.\d+\.attn\.proj\.(weight|bias)", 0),
    (r"blocks\.\d+\.mlp\.fc1\.weight", 1),
    (r"blocks\.\d+\.mlp\.fc2\.(weight|bias)", 0),
    (r"blocks\.\d+\.ls\d\.gamma", 0),
    (r"(head|head_dist)\.weight", 1),
)
# Parameters of the residual stream's neighbours that have no embedding axis.
_UNTOUCHED = (
    r"blocks\.\d+\.attn\.qkv\.bias",
    r"blocks\.\d+\.mlp\.fc1\.bias",
    r"(head|head_dist)\.bias",
)


def embedding_axis(torch_name: str) -> int | None:
    """The embedding axis of a timm ViT parameter (None: it has none)."""
    for pattern, axis in _EMBED_AXES:
        if re.fullmatch(pattern, torch_name):
            return axis
    if any(re.fullmatch(p, torch_name) for p in _UNTOUCHED):
        return None
    raise PlanError(f"embedding pruning does not know parameter {torch_name!r}")


@tvm.transform.module_pass(opt_level=0, name="vitsparse.PruneEmbedding")
class PruneEmbedding(SlicingPass):
    """Slice the embedding channels ``structure`` drops out of ``main``."""

    def slicing(self, mod) -> Slicing:
        kept = self.structure.embed
        if kept is None:
            return Slicing()
        slices = {}
        for param in mod["main"].params[1:]:
            torch_name = self.graph.param_map.get(param.name)
            if torch_name is None:
                continue
            axis = embedding_axis(torch_name)
            if axis is None:
                continue
            rank = len(param.ty.shape.values)
            slices[param.name] = (axis % rank, list(kept.kept))
        return Slicing(slices)
