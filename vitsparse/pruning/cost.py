"""A measured cost table (``vitsparse profile``) as the criteria's cost model, beside the
analytic one (`vitsparse.pruning.budget.FlopsCost`): the one channel through which measurements
on a target come back into pruning decisions."""

from __future__ import annotations

from pathlib import Path

from vitsparse.errors import TargetError
from vitsparse.pruning.flops import block_shapes
from vitsparse.targets.cost_table import CostTable


class TableCost:
    """A cost table as the pruning criteria's cost model (`vitsparse.pruning.budget.CostModel`,
    in ms): ``saving`` is the dense kernel's latency minus the BSR kernel's at the kept density
    (none above the highest profiled density), ``model_cost`` the sum of the blocks' latencies.
    Sizes beyond the grid, as heavy pruning reaches, are extrapolated log-linearly."""

    def __init__(self, table: CostTable, block: tuple[int, int] | None = None):
        self.table, self.block = table, block
        self._densities = table.densities(block) if block is not None else None

    @classmethod
    def load(cls, path: str | Path) -> TableCost:
        table = CostTable.load(path)
        if not table.complete:
            raise TargetError(f"{path}: the profile is unfinished; re-run vitsparse profile")
        return cls(table)

    def for_block(self, block: tuple[int, int]) -> TableCost:
        """This cost for BSR kernels of ``block`` (TargetError if the table has none)."""
        return TableCost(self.table, tuple(block))

    def saving(self, layer: str, shape: tuple[int, int], tokens: int, sparsity: float) -> float:
        if self.block is None:
            raise TargetError("TableCost.saving needs a block size (for_block)")
        out_f, in_f = shape
        dense = self.table.kernel_ms("dense", tokens, in_f, out_f, extrapolate=True)
        density = 1.0 - sparsity
        lo, hi = self._densities
        if density > hi:
            return 0.0
        sparse = self.table.kernel_ms(
            "bsr", tokens, in_f, out_f, self.block, max(density, lo), extrapolate=True
        )
        return max(dense - sparse, 0.0) if density > 0 else dense

    def model_cost(self, model, structure) -> float:
        return sum(
            self.table.block_ms(**shape, extrapolate=True)
            for shape in block_shapes(model, structure)
        )
