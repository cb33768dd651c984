"""The root of every error cscvision raises on purpose.

Each stage's error classes derive from :class:`CscvisionError` and, where callers of
0.1.0 caught them as such, from the built-in they used to be (``ValueError``,
``RuntimeError``, ...), so ``except ValueError`` keeps working. The CLI catches the root
once and prints its one-line message; anything else is a bug and keeps its traceback.
:class:`cscvision.core.guard.Interrupted` is the one exception outside the root: it
derives from ``BaseException`` so that no ``except Exception`` swallows a SIGTERM.
"""

from __future__ import annotations


class CscvisionError(Exception):
    """A failure cscvision explains: the message names the file or flag and the fix."""
