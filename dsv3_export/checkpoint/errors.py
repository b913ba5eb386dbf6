"""The one error type of checkpoint loading and saving."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (or a model that cannot be saved) as asked.

    The message always names the file, config key or tensor at fault, so that the CLI can print
    it as is and exit non-zero.
    """
