"""What the user sees: lines printed to the terminal and copied to log.txt; optional progress bars."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional


class Console:
    def __init__(self, progress: str = "auto", quiet: bool = False):
        self.log_path: Optional[Path] = None
        self._buffer = []  # lines printed before the run directory exists
        self.quiet = quiet
        self.progress = sys.stderr.isatty() if progress == "auto" else progress == "true"

    def attach(self, log_path: Path) -> None:
        """Start copying to log.txt (appending what was printed so far)."""
        self.log_path = Path(log_path)
        with self.log_path.open("a") as fh:
            fh.writelines(line + "\n" for line in self._buffer)
        self._buffer = []

    def detach(self) -> None:
        self.log_path = None

    def print(self, msg: str = "") -> None:
        if not self.quiet:
            print(msg, flush=True)
        if self.log_path is None:
            self._buffer.append(msg)
        else:
            with self.log_path.open("a") as fh:
                fh.write(msg + "\n")

    def bar(self, total: int, desc: str):
        """A tqdm progress bar, or None when bars are off."""
        if not self.progress or self.quiet:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)


class MutedConsole(Console):
    """The console of a distributed run's other ranks: rank 0 prints and writes log.txt."""

    def __init__(self):
        super().__init__(progress="false", quiet=True)

    def attach(self, log_path: Path) -> None:
        pass

    def print(self, msg: str = "") -> None:
        pass
