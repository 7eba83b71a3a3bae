"""Log a failure once per cause, not every window: the window loop retries every window, and a file or stage
that stays broken would otherwise repeat the same warning (and traceback) forever."""

from __future__ import annotations


class OncePerCause:
    """Which (subject, cause) failures were already logged; a subject that works again is forgotten, so its
    next failure is logged again."""

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}

    def first(self, subject: str, cause: str) -> bool:
        """True the first time `subject` fails with `cause` (log it now)."""
        causes = self._seen.setdefault(subject, set())
        if cause in causes:
            return False
        causes.add(cause)
        return True

    def recovered(self, subject: str) -> None:
        self._seen.pop(subject, None)
