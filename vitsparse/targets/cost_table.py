"""A target's cost table (``vitsparse profile`` measures it): latency, and energy where a meter
exists, of the dense and BSR kernels and of one transformer block over grids of shapes.

`CostTable.kernel_ms` and `CostTable.block_ms` interpolate between grid points: multilinear in
log(latency) over log(every axis), so a cost proportional to a product of sizes is exact. A
query outside the profiled range is an error naming the axis, not an extrapolation.
`CostTable.held_out_error` compares the interpolation with the held-out points measured off
the grid.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vitsparse._io import write_text_atomic
from vitsparse.errors import TargetError

FORMAT = "vitsparse-cost-table/1"
KERNEL_AXES = ("m", "k", "n", "density")
BLOCK_AXES = ("embed", "heads", "head_dim", "mlp", "tokens")


def kernel_key(p: dict) -> str:
    """A kernel point's name, e.g. ``"bsr m=197 k=192 n=768 block=32x32 density=0.3"``."""
    text = f"{p['op']} m={p['m']} k={p['k']} n={p['n']}"
    if p["op"] == "bsr":
        text += f" block={p['block'][0]}x{p['block'][1]} density={p['density']:g}"
    return text


def block_key(p: dict) -> str:
    """A block point's name, e.g. ``"block embed=192 heads=3 head_dim=64 mlp=768 tokens=197"``."""
    return "block " + " ".join(f"{a}={p[a]}" for a in BLOCK_AXES)


@dataclass
class CostTable:
    """Measured rows (each its point, ``key``, ``ms``, ``energy_j``) of a target and device."""

    target: dict
    device: str
    grid: str
    format: str = FORMAT
    kernels: list[dict] = field(default_factory=list)
    blocks: list[dict] = field(default_factory=list)
    held_out: dict = field(default_factory=lambda: {"kernels": [], "blocks": []})
    meter: str = ""
    emulated: str | None = None
    complete: bool = False
    seconds: float = 0.0  # building and measuring every row, over all runs that made the table

    # --- files -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        data = asdict(self)
        if self.complete:
            data["held_out_error"] = self.held_out_error()
        return write_text_atomic(path, json.dumps(data, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostTable:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TargetError(
                f"{path}: no such cost table (vitsparse profile writes one)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TargetError(f"{path}: not a cost table, not valid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TargetError(f"{path}: not a cost table (format is not {FORMAT!r})")
        data.pop("held_out_error", None)
        try:
            table = cls(**data)
            for row in table.kernels:
                _check_row(row, ("op", *KERNEL_AXES, "key", "ms"))
            for row in table.blocks:
                _check_row(row, (*BLOCK_AXES, "key", "ms"))
        except (TypeError, KeyError, ValueError) as err:
            raise TargetError(f"{path}: malformed cost table: {err}") from None
        return table

    # --- predictions -------------------------------------------------------------------------

    def kernel_ms(
        self,
        op: str,
        m: int,
        k: int,
        n: int,
        block: tuple[int, int] | None = None,
        density: float = 1.0,
        *,
        extrapolate: bool = False,
    ) -> float:
        """Predicted latency (ms) of a dense (``op="dense"``) or BSR kernel; outside the grid an
        error, or with ``extrapolate`` the log-linear continuation of its edge."""
        if op not in ("dense", "bsr"):
            raise TargetError(f"kernel op {op!r} is neither 'dense' nor 'bsr'")
        if op == "bsr" and block is None:
            raise TargetError("a BSR kernel needs its block size")
        block = list(block) if op == "bsr" else None
        what = op if op == "dense" else f"bsr {block[0]}x{block[1]}"
        query = dict(m=m, k=k, n=n, density=density if op == "bsr" else 1.0)
        return self._interpolator("kernels", what, op, block)(query, extrapolate)

    def block_ms(
        self, embed: int, heads: int, head_dim: int, mlp: int, tokens: int, *, extrapolate=False
    ) -> float:
        """Predicted latency (ms) of one transformer block (see `kernel_ms`)."""
        query = dict(embed=embed, heads=heads, head_dim=head_dim, mlp=mlp, tokens=tokens)
        return self._interpolator("blocks", "block")(query, extrapolate)

    def densities(self, block: tuple[int, int]) -> tuple[float, float]:
        """The lowest and highest BSR density profiled for ``block``."""
        values = [r["density"] for r in self.kernels if r["block"] == list(block)]
        if not values:
            raise TargetError(f"the cost table has no bsr {block[0]}x{block[1]} measurements")
        return min(values), max(values)

    def _interpolator(self, kind: str, what: str, op=None, block=None) -> _Interpolator:
        cache = self.__dict__.setdefault("_cache", {})
        key = (kind, what, len(getattr(self, kind)), tuple(self.held_out.get(kind, [])))
        if key not in cache:
            rows = self._grid_rows(kind)
            if kind == "kernels":
                rows = [r for r in rows if r["op"] == op and (op == "dense" or r["block"] == block)]
            cache[key] = _Interpolator(rows, KERNEL_AXES if kind == "kernels" else BLOCK_AXES, what)
        return cache[key]

    def held_out_error(self) -> dict:
        """Per kind: the held-out points' measured and predicted ms, and the median and max
        relative error (percent; None without held-out points)."""
        out = {}
        for kind in ("kernels", "blocks"):
            keys = set(self.held_out.get(kind, []))
            rows = []
            for r in getattr(self, kind):
                if r["key"] not in keys:
                    continue
                if kind == "kernels":
                    block = tuple(r["block"]) if r["block"] else None
                    pred = self.kernel_ms(r["op"], r["m"], r["k"], r["n"], block, r["density"])
                else:
                    pred = self.block_ms(*(r[a] for a in BLOCK_AXES))
                err = abs(pred - r["ms"]) / r["ms"] * 100
                rows.append({"key": r["key"], "ms": r["ms"], "predicted_ms": pred, "pct": err})
            errors = [r["pct"] for r in rows]
            out[kind] = {
                "points": len(rows),
                "median_pct": float(np.median(errors)) if errors else None,
                "max_pct": float(max(errors)) if errors else None,
                "rows": rows,
            }
        return out

    def _grid_rows(self, kind: str) -> list[dict]:
        held = set(self.held_out.get(kind, []))
        return [r for r in getattr(self, kind) if r["key"] not in held]


def _check_row(row: dict, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise KeyError(f"row {row.get('key', row)!r} lacks {missing}")
    if not float(row["ms"]) > 0:
        raise ValueError(f"row {row['key']!r} has latency {row['ms']!r}")


class _Interpolator:
    """Multilinear interpolation of log(ms) over log(axes) on the full grid that ``rows`` span;
    an axis with one value is constant. TargetError for a grid with holes (an interrupted
    profile) and, unless extrapolating, for a query outside the grid."""

    def __init__(self, rows: list[dict], axes: tuple[str, ...], what: str):
        from scipy.interpolate import RegularGridInterpolator

        if not rows:
            raise TargetError(f"the cost table has no {what} measurements")
        self.what = what
        self.values = {a: sorted({float(r[a]) for r in rows}) for a in axes}
        self.free = [a for a in axes if len(self.values[a]) > 1]
        cube = np.full([len(self.values[a]) for a in self.free], np.nan)
        for r in rows:
            cube[tuple(self.values[a].index(float(r[a])) for a in self.free)] = np.log(r["ms"])
        if np.isnan(cube).any():
            raise TargetError(
                f"the cost table's {what} grid has {int(np.isnan(cube).sum())} unmeasured "
                "points; finish it by re-running vitsparse profile with the same -o"
            )
        self.cube = cube
        grid = [np.log(self.values[a]) for a in self.free]
        self.interp = (
            RegularGridInterpolator(grid, cube, bounds_error=False, fill_value=None)
            if self.free
            else None
        )

    def __call__(self, query: dict, extrapolate: bool = False) -> float:
        for a in self.free:
            lo, hi = self.values[a][0], self.values[a][-1]
            if not extrapolate and not lo - 1e-9 <= float(query[a]) <= hi + 1e-9:
                raise TargetError(
                    f"{self.what}: {a}={query[a]} is outside the profiled range {lo:g}..{hi:g}"
                )
        if self.interp is None:
            return float(np.exp(self.cube))
        point = [np.log(max(float(query[a]), 1e-9)) for a in self.free]
        return float(np.exp(self.interp(point)[0]))
