"""The multiply-accumulates a Relax module's ``main`` runs in its matmuls and 2-D convolutions,
read from their shapes (what the analytic count of `vitsparse.pruning.flops` predicts)."""

from __future__ import annotations

import math

from vitsparse._tvm import IRModule, relax, struct_shape, tvm


def relax_macs(mod: IRModule) -> dict[str, int]:
    """``{"matmul": MACs, "conv2d": MACs}`` of ``mod``'s ``main``."""
    total = {"matmul": 0, "conv2d": 0}

    def visit(node):
        if not (isinstance(node, relax.Call) and isinstance(node.op, tvm.ir.Op)):
            return
        if node.op.name == "relax.matmul":
            total["matmul"] += math.prod(struct_shape(node)) * struct_shape(node.args[0])[-1]
        elif node.op.name == "relax.nn.conv2d":
            weight = struct_shape(node.args[1])
            total["conv2d"] += math.prod(struct_shape(node)) * math.prod(weight[1:])

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return total
