"""A text progress bar for long criterion jobs, written as lines through a ``say`` callback (so it
reads the same in a terminal, a CI log and a test)."""

from __future__ import annotations

from collections.abc import Callable


class ProgressBar:
    """``[label] [#####.....]  50% 5/10``, said at start, at every ``step`` of the way and at the
    end; ``say=None`` says nothing."""

    def __init__(
        self,
        label: str,
        total: int,
        say: Callable[[str], None] | None,
        *,
        width: int = 20,
        step: float = 0.25,
    ):
        self.label, self.total, self.say = label, max(int(total), 0), say
        self.width, self.step = width, step
        self.done, self._next = 0, 0.0
        self._show()

    def advance(self, count: int = 1, note: str = "") -> None:
        """``count`` more done; ``note`` (e.g. a running loss) follows the bar when it shows."""
        self.done = min(self.total, self.done + count)
        self._show(note)

    def _show(self, note: str = "") -> None:
        if self.say is None:
            return
        fraction = 1.0 if self.total == 0 else self.done / self.total
        if fraction + 1e-12 < self._next and self.done < self.total:
            return
        while self._next <= fraction + 1e-12:
            self._next += self.step
        filled = round(fraction * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"{self.label} [{bar}] {fraction:4.0%} {self.done}/{self.total}"
        self.say(f"{line} {note}" if note else line)
