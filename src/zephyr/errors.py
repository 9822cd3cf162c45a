"""User-facing errors.

Anything a user can cause (a bad key, a missing column, an unreadable file, a model that is not there) raises a
`ZephyrError`. The CLI prints its message as one line and exits with status 2, never with a traceback.
"""

from __future__ import annotations


class ZephyrError(Exception):
    """A mistake in the user's input or environment, explained in one sentence with what to do."""


class ConfigError(ZephyrError):
    """A recipe or command-line key that is unknown, or a value out of range."""


class DataError(ZephyrError):
    """A data row that cannot be used, located by file, 1-based row number and field.

    str(err) reads `FILE, row N, field 'F': REASON`; any of the three locators may be missing.
    """

    def __init__(
        self, reason: str, *, file: str | None = None, row: int | None = None, field: str | None = None
    ):
        self.reason = reason
        self.file = file
        self.row = row
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        where = []
        if self.file is not None:
            where.append(str(self.file))
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field '{self.field}'")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def at(self, *, file: str | None = None, row: int | None = None) -> DataError:
        """The same error located at FILE / ROW (kept where already set), for callers that know the location."""
        return DataError(self.reason, file=self.file or file, row=self.row or row, field=self.field)
