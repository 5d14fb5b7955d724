"""Forward hooks that live exactly as long as a ``with`` block: how the criteria observe or gate
a model's activations (NViT's gates, UP-ViT's leave-one-out masks, CP-ViT's attention maps)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch

# (module, "forward" or "pre", hook): a forward hook or a forward pre-hook of the module.
Hook = tuple[torch.nn.Module, str, Callable]


@contextlib.contextmanager
def hooked(hooks: Iterable[Hook]) -> Iterator[None]:
    """Register every hook on entry and remove every one on exit, however the block ends."""
    handles = []
    try:
        for module, kind, fn in hooks:
            if kind not in ("forward", "pre"):
                raise ValueError(f"hook kind {kind!r} is not 'forward' or 'pre'")
            register = (
                module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            )
            handles.append(register(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()
