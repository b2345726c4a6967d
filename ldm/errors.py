"""The one exception type for bad user input: its message is a single line that says what to do."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from a user (file, flag, size, prompt). Scripts print it as one line and exit 1."""


def with_article(noun: str) -> str:
    """`noun` after "a" or "an", for messages that name a stage: "an autoencoder", "a text_encoder"."""
    return f"{'an' if noun.startswith(tuple('aeiou')) else 'a'} {noun}"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty: what a one-line
    error quotes of a failure deep inside a library."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def excerpt(text: str, limit: int = 60) -> str:
    """`text` quoted, its start only when it is longer than `limit` characters: a message that quotes a
    caption or prompt stays one short line."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
