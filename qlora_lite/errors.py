"""The one base class of every error meant for the user.

Each stage keeps its own subclass beside the code that raises it (``DataError`` in data_formats.py,
``ModelLoadError`` in quant.py, ...), so ``except DataError`` reads where it is used. They all derive
from ``QloraLiteError``, which the click group turns into one ``Error: ...`` line with exit status 1:
a new error class needs no change to any command. Most also keep the builtin base they had
(ValueError, RuntimeError) so callers catching those keep working.

This module imports nothing heavy: the CLI group imports it, and ``qlora-lite --help`` must not
pay for torch.
"""

from __future__ import annotations


class QloraLiteError(Exception):
    """A problem the user can fix; the message says what was wrong, where, and what to do."""
