"""A completion's text as it grows: where a stop string cuts it, and which part of it can be shown already."""

from __future__ import annotations


def stop_strings(stop: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Stop strings as a tuple: one string, a list of them, or none."""
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def stable_text(text: str, stop: tuple[str, ...], done: bool) -> str:
    """The part of a completion's ``text`` that can no longer change: all of it (cut at a stop string) when the
    completion is done; otherwise without a trailing incomplete UTF-8 character (decoded as U+FFFD) or a tail
    that could be the start of a stop string."""
    text = cut_at_stop(text, stop)
    if done:
        return text
    text = text.rstrip("\ufffd")
    held = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
    return text[: len(text) - held]
