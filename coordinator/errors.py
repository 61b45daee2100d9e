"""Errors the coordinator reports to a person as one line (no traceback)."""


class UsageError(Exception):
    """Bad input from the user (a flag, a file, a combination); the message says what was expected."""
