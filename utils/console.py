"""What a run prints: progress bars on a terminal, messages that do not break them, warnings on stderr."""
from __future__ import annotations

import sys

from tqdm import tqdm


class Console:
    def __init__(self, quiet: bool = False, verbose: bool = False, silent: bool = False):
        """`silent`: print nothing at all, not even warnings (torchrun ranks other than 0)."""
        self.quiet = quiet or silent
        self.silent = silent
        self.show_verbose = verbose and not silent
        # Bars only for a person watching: not with --quiet, not into a file or a pipe.
        self.quiet_bars = self.quiet or not sys.stderr.isatty()

    def info(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg, file=sys.stdout)

    def verbose(self, msg: str) -> None:
        if self.show_verbose:
            tqdm.write(msg, file=sys.stdout)

    def warn(self, msg: str) -> None:
        if not self.silent:
            tqdm.write(f"warning: {msg}", file=sys.stderr)

    def table(self, text: str) -> None:
        if not self.silent:
            tqdm.write(text, file=sys.stdout)
