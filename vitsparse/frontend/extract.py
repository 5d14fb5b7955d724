"""Find a ViT's structure in a Relax module: patch embedding, transformer blocks, classifier head.

Works on ``main``'s dataflow bindings only, so a module from the PyTorch importer and one from the
ONNX importer are read the same way. A linear layer is ``matmul(x, permute_dims(W))`` with ``W`` a
parameter of shape ``(out, in)`` (what both importers produce for vitsparse, see ``importer.py``) or
``matmul(x, W)`` with ``W`` of shape ``(in, out)``, optionally followed by ``add`` with a 1-D bias
parameter. A block is four linears in a row: qkv (its output is reshaped to ``[..., 3, H, d]``),
proj, fc1 and fc2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vitsparse._tvm import IRModule, relax, struct_shape
from vitsparse.errors import NotAViTError
from vitsparse.frontend.vit_graph import BlockInfo, ViTGraph


@dataclass(frozen=True)
class _Linear:
    position: int  # index of the matmul among main's bindings
    weight: relax.Var
    bias: relax.Var | None
    in_dim: int
    out_dim: int
    output: relax.Var  # the value after the bias add (or the matmul when there is no bias)


class _Bindings:
    """``main``'s dataflow bindings with def-use links."""

    def __init__(self, func: relax.Function):
        num_input = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else 1
        self.inputs = list(func.params[:num_input])
        self.params = set(func.params[num_input:])
        self.order: list[relax.VarBinding] = []
        self.users: dict[relax.Var, list[relax.VarBinding]] = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                if not isinstance(binding, relax.VarBinding):
                    continue
                self.order.append(binding)
                for arg in _call_args(binding.value):
                    self.users.setdefault(arg, []).append(binding)

    def users_of(self, var: relax.Var, op_name: str) -> list[relax.VarBinding]:
        return [b for b in self.users.get(var, []) if _op_name(b.value) == op_name]


def extract_vit_graph(
    mod: IRModule,
    *,
    model_id: str,
    param_map: dict[str, str] | None = None,
    torch_model: torch.nn.Module | None = None,
) -> ViTGraph:
    """Read the ViT geometry out of ``mod["main"]`` (parameters must be function inputs).

    ``param_map`` (Relax name -> torch name) is stored in the result and, with ``torch_model``, used
    to cross-check each block's head count against the torch attention module's ``num_heads``.

    Raises
    ------
    NotAViTError
        No patch-embedding conv2d, no attention block, or block shapes that do not fit together.
    """
    func = mod["main"]
    graph = _Bindings(func)
    names = {v.name for v in graph.params}
    param_map = {name: "" for name in names} | {
        k: v for k, v in (param_map or {}).items() if k in names
    }
    ordered_map = {p.name: param_map[p.name] for p in func.params[len(graph.inputs) :]}

    linears = _find_linears(graph)
    if not linears:
        raise NotAViTError(
            f"model {model_id!r} is not a ViT: no linear layers (matmul with a weight "
            "parameter) found"
        )
    blocks, num_tokens, last = _group_blocks(graph, linears, model_id)
    image_size, patch_size, num_patches = _patch_embedding(graph, model_id)
    if num_tokens < num_patches:
        raise NotAViTError(
            f"model {model_id!r}: blocks see {num_tokens} tokens but the patch embedding makes "
            f"{num_patches} patches"
        )
    heads = [lin for lin in linears if lin.position > last]
    if torch_model is not None:
        _check_heads_against_torch(blocks, ordered_map, torch_model, model_id)
    return ViTGraph(
        model_id=model_id,
        blocks=tuple(blocks),
        embed_dim=blocks[0].embed_dim,
        num_heads=blocks[0].num_heads,
        patch_size=patch_size,
        image_size=image_size,
        num_patches=num_patches,
        num_prefix_tokens=num_tokens - num_patches,
        num_tokens=num_tokens,
        num_classes=heads[-1].out_dim if heads else 0,
        param_map=ordered_map,
    )


def _patch_embedding(graph: _Bindings, model_id: str) -> tuple[tuple[int, int], int, int]:
    x = graph.inputs[0]
    shape = struct_shape(x)
    if len(shape) != 4:
        raise NotAViTError(
            f"model {model_id!r}: expected an image input (batch, channels, H, W), "
            f"got shape {shape}"
        )
    for binding in graph.order:
        if _op_name(binding.value) != "relax.nn.conv2d":
            continue
        weight = binding.value.args[1]
        if weight not in graph.params:
            continue
        _, _, kh, kw = struct_shape(weight)
        _, _, oh, ow = struct_shape(binding.var)
        strides = [int(s) for s in binding.value.attrs.strides]
        if (kh, kw) != (strides[0], strides[1]) or kh != kw:
            raise NotAViTError(
                f"model {model_id!r} is not a ViT vitsparse can map: its first conv2d (kernel "
                f"{kh}x{kw}, stride {strides}) is not a square non-overlapping patch embedding"
            )
        return (shape[2], shape[3]), kh, oh * ow
    raise NotAViTError(f"model {model_id!r} is not a ViT: no patch-embedding conv2d found")


def _find_linears(graph: _Bindings) -> list[_Linear]:
    bound = {b.var: b.value for b in graph.order}
    linears = []
    for position, binding in enumerate(graph.order):
        call = binding.value
        if _op_name(call) != "relax.matmul":
            continue
        weight_layout = _weight_of(call.args[1], bound, graph.params)
        if weight_layout is None:
            continue
        weight, transposed = weight_layout
        rows, cols = struct_shape(weight)
        in_dim, out_dim = (cols, rows) if transposed else (rows, cols)
        bias, output = _bias_of(binding.var, out_dim, graph)
        linears.append(_Linear(position, weight, bias, in_dim, out_dim, output))
    return linears


def _weight_of(expr, bound, params) -> tuple[relax.Var, bool] | None:
    """``(param, transposed)`` when ``expr`` is a 2-D weight parameter, possibly permuted."""
    if expr in params:
        return (expr, False) if len(struct_shape(expr)) == 2 else None
    value = bound.get(expr)
    if _op_name(value) != "relax.permute_dims":
        return None
    source = value.args[0]
    axes = value.attrs.axes
    if source in params and len(struct_shape(source)) == 2:
        if axes is None or [int(a) for a in axes] == [1, 0]:
            return source, True
    return None


def _bias_of(mm: relax.Var, out_dim: int, graph: _Bindings) -> tuple[relax.Var | None, relax.Var]:
    for binding in graph.users_of(mm, "relax.add"):
        a, b = binding.value.args
        other = b if a.same_as(mm) else a
        if other in graph.params and struct_shape(other) == (out_dim,):
            return other, binding.var
    return None, mm


def _qkv_split(linear: _Linear, graph: _Bindings) -> tuple[int, int, int] | None:
    """``(tokens, heads, head_dim)`` when the linear's output is reshaped to [..., 3, H, d]."""
    frontier = [linear.output]
    for _ in range(4):  # the torch importer reshapes 2-D -> 3-D -> 5-D
        reshapes = [b for v in frontier for b in graph.users_of(v, "relax.reshape")]
        for binding in reshapes:
            shape = struct_shape(binding.var)
            if len(shape) >= 4 and shape[-3] == 3 and 3 * shape[-2] * shape[-1] == linear.out_dim:
                return shape[-4], shape[-2], shape[-1]
        frontier = [b.var for b in reshapes]
    return None


def _group_blocks(
    graph: _Bindings, linears: list[_Linear], model_id: str
) -> tuple[list[BlockInfo], int, int]:
    """Blocks in order, the token count of block 0, and the binding position of the last fc2."""
    blocks: list[BlockInfo] = []
    num_tokens = 0
    last = -1
    i = 0
    while i < len(linears):
        split = _qkv_split(linears[i], graph)
        if split is None:
            i += 1
            continue
        if i + 3 >= len(linears):
            raise NotAViTError(
                f"model {model_id!r}: attention block {len(blocks)} has a qkv projection but not "
                "the proj, fc1 and fc2 linear layers after it"
            )
        tokens, heads, head_dim = split
        qkv, proj, fc1, fc2 = linears[i : i + 4]
        block = _make_block(len(blocks), qkv, proj, fc1, fc2, heads, head_dim, model_id)
        blocks.append(block)
        num_tokens = num_tokens or tokens
        last = fc2.position
        i += 4
    if not blocks:
        raise NotAViTError(
            f"model {model_id!r} is not a ViT: no attention block found (no linear layer whose "
            "output is reshaped to [..., 3, heads, head_dim])"
        )
    return blocks, num_tokens, last


def _make_block(index, qkv, proj, fc1, fc2, heads, head_dim, model_id) -> BlockInfo:
    embed = qkv.in_dim
    attn = heads * head_dim
    problems = []
    if proj.in_dim != attn:
        problems.append(f"proj input {proj.in_dim} != heads {heads} x head_dim {head_dim}")
    if proj.out_dim != embed:
        problems.append(f"proj output {proj.out_dim} != embed_dim {embed}")
    if fc1.in_dim != embed:
        problems.append(f"fc1 input {fc1.in_dim} != embed_dim {embed}")
    if fc2.in_dim != fc1.out_dim:
        problems.append(f"fc2 input {fc2.in_dim} != fc1 output {fc1.out_dim}")
    if fc2.out_dim != embed:
        problems.append(f"fc2 output {fc2.out_dim} != embed_dim {embed}")
    if problems:
        raise NotAViTError(
            f"model {model_id!r}: block {index} does not have the ViT layout qkv/proj/fc1/fc2 "
            f"({'; '.join(problems)})"
        )

    def name(var: relax.Var | None) -> str | None:
        return None if var is None else var.name

    return BlockInfo(
        index=index,
        qkv_weight=qkv.weight.name,
        qkv_bias=name(qkv.bias),
        proj_weight=proj.weight.name,
        proj_bias=name(proj.bias),
        fc1_weight=fc1.weight.name,
        fc1_bias=name(fc1.bias),
        fc2_weight=fc2.weight.name,
        fc2_bias=name(fc2.bias),
        embed_dim=embed,
        num_heads=heads,
        head_dim=head_dim,
        mlp_dim=fc1.out_dim,
    )


def _check_heads_against_torch(
    blocks: list[BlockInfo], param_map: dict[str, str], model: torch.nn.Module, model_id: str
) -> None:
    """The head count read from the reshape must equal the torch attention module's num_heads."""
    for block in blocks:
        torch_name = param_map.get(block.qkv_weight, "")
        # "blocks.3.attn.qkv.weight" -> the attention module "blocks.3.attn"
        parts = torch_name.split(".")
        if len(parts) < 3:
            continue
        attn_name = ".".join(parts[:-2])
        try:
            attn = model.get_submodule(attn_name)
        except AttributeError:
            continue
        expected = getattr(attn, "num_heads", None)
        if isinstance(expected, int) and expected != block.num_heads:
            raise NotAViTError(
                f"model {model_id!r}: block {block.index} reshapes qkv into {block.num_heads} "
                f"heads of {block.head_dim}, but {type(attn).__name__} {attn_name!r} has "
                f"num_heads={expected}"
            )


def _op_name(expr) -> str | None:
    if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
        return str(expr.op.name)
    return None


def _call_args(expr) -> list:
    if not isinstance(expr, relax.Call):
        return []
    args = []
    for arg in expr.args:
        if isinstance(arg, relax.Tuple):
            args.extend(arg.fields)
        else:
            args.append(arg)
    return args
