"""The one way pruning reads a number out of a spec string (``flops=0.5``, ``0.7@4,7,10``,
``32x32:0.5``): a full match of the spec's pattern, and the group that holds the number."""

from __future__ import annotations

import re

from vitsparse.errors import PlanError


def match_number(pattern: re.Pattern, text, group: int | str, error: str) -> tuple[re.Match, float]:
    """``pattern``'s full match of ``text`` and ``float`` of its ``group``; PlanError(``error``)
    when ``text`` is not a string, does not match, or that group is not a number."""
    match = pattern.fullmatch(text) if isinstance(text, str) else None
    try:
        return match, float(match.group(group))
    except (AttributeError, ValueError):
        raise PlanError(error) from None
