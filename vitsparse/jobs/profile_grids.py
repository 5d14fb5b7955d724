"""The grids a cost table is measured over (`vitsparse.jobs.profile`): kernel shapes, block sizes
and densities, transformer-block shapes, and held-out points off the grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vitsparse.targets.cost_table import block_key, kernel_key


@dataclass(frozen=True)
class Grid:
    """The profiled points: kernels over tokens x k x n (x block x density for BSR), blocks over
    embed x heads x head_dim x mlp x tokens; then ``held_out`` random points of each kind."""

    tokens: tuple[int, ...]
    k: tuple[int, ...]
    n: tuple[int, ...]
    blocks: tuple[tuple[int, int], ...]
    densities: tuple[float, ...]
    embed: tuple[int, ...]
    heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    mlp: tuple[int, ...]
    block_tokens: tuple[int, ...]
    held_out: int
    name: str = "custom"

    @classmethod
    def for_geometry(cls, embed: int, heads: int, head_dim: int, mlp: int, tokens: int) -> Grid:
        """A small grid spanning what pruning makes of one model: its dense shapes down to a
        quarter of its widths (half its embedding, heads and head dim) and tokens, 16x16 blocks
        (about 80 points). Its name spells the geometry, so a cache of it is keyed by model."""

        def m16(value: float) -> int:
            return max(16, int(round(value / 16)) * 16)

        return cls(
            tokens=(max(2, tokens // 4), tokens),
            k=(m16(embed / 4), m16(max(embed, mlp))),
            n=(m16(embed / 4), m16(max(3 * embed, mlp))),
            blocks=((16, 16),),
            densities=(0.1, 0.3, 0.6, 0.9),
            embed=tuple(sorted({m16(embed / 2), embed})),
            heads=tuple(sorted({max(1, heads // 2), heads})),
            head_dim=tuple(sorted({max(8, head_dim // 2), head_dim})),
            mlp=tuple(sorted({m16(mlp / 4), mlp})),
            block_tokens=(max(2, tokens // 4), tokens),
            held_out=3,
            name=f"model-e{embed}-h{heads}-d{head_dim}-f{mlp}-t{tokens}",
        )

    def kernel_points(self) -> list[dict]:
        points = []
        for m in self.tokens:
            for k in self.k:
                for n in self.n:
                    points.append(dict(op="dense", m=m, k=k, n=n, block=None, density=1.0))
                    for block in self.blocks:
                        for d in self.densities:
                            points.append(
                                dict(op="bsr", m=m, k=k, n=n, block=list(block), density=d)
                            )
        return points

    def block_points(self) -> list[dict]:
        return [
            dict(embed=e, heads=h, head_dim=d, mlp=f, tokens=t)
            for e in self.embed
            for h in self.heads
            for d in self.head_dim
            for f in self.mlp
            for t in self.block_tokens
        ]

    def held_out_points(self, seed: int = 0) -> tuple[list[dict], list[dict]]:
        """``held_out`` random points of each kind inside the grid's ranges and off its nodes
        (fewer where the axes leave no room)."""
        rng = np.random.default_rng(seed)
        step = int(np.lcm.reduce([c for b in self.blocks for c in b])) if self.blocks else 16

        def pick(axis, multiple=1):
            lo, hi = min(axis), max(axis)
            value = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            return int(min(max(round(value / multiple) * multiple, lo), hi))

        def kernel(i):
            block = self.blocks[i % len(self.blocks)] if self.blocks else None
            m, k, n = pick(self.tokens), pick(self.k, step), pick(self.n, step)
            if block is None or i % 4 == 3:
                return dict(op="dense", m=m, k=k, n=n, block=None, density=1.0)
            d = round(float(rng.uniform(min(self.densities), max(self.densities))), 3)
            return dict(op="bsr", m=m, k=k, n=n, block=list(block), density=d)

        def block(_i):
            return dict(
                embed=pick(self.embed, 8),
                heads=pick(self.heads),
                head_dim=pick(self.head_dim, 8),
                mlp=pick(self.mlp, 8),
                tokens=pick(self.block_tokens),
            )

        out = []
        for make, nodes, key in (
            (kernel, self.kernel_points(), kernel_key),
            (block, self.block_points(), block_key),
        ):
            taken, points = {key(p) for p in nodes}, []
            for _ in range(100 * self.held_out):
                if len(points) == self.held_out:
                    break
                point = make(len(points))
                if key(point) not in taken:
                    taken.add(key(point))
                    points.append(point)
            out.append(points)
        return out[0], out[1]


GRIDS: dict[str, Grid] = {
    # DeiT-Tiny/Small shapes: 50 or 197 tokens, E 192..384, MLP up to 1536.
    "default": Grid(
        tokens=(50, 197),
        k=(192, 384, 768),
        n=(192, 768, 1536),
        blocks=((16, 16), (32, 32)),
        densities=(0.1, 0.3, 0.5, 0.7, 0.9),
        embed=(192, 384),
        heads=(3, 6),
        head_dim=(32, 64),
        mlp=(768, 1536),
        block_tokens=(50, 197),
        held_out=8,
        name="default",
    ),
    # A few seconds a point on this machine: for trying the command and for the tests.
    "small": Grid(
        tokens=(17, 50),
        k=(64, 128),
        n=(64, 128),
        blocks=((16, 16),),
        densities=(0.25, 0.75),
        embed=(64, 96),
        heads=(2,),
        head_dim=(16, 32),
        mlp=(128,),
        block_tokens=(17, 50),
        held_out=3,
        name="small",
    ),
}
