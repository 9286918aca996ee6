"""The one style of every command (``python -m llama.<command>`` and its ``llama-<command>`` script): argparse,
options named like the Python parameters they set (``--max_seq_len``), ``--help`` listing each with its default,
and bad input reported in one line, ``<prog>: error: <message>``, with exit status 1 (argparse's own usage errors
exit with 2). ``python -m llama.train`` builds its options from the training configuration (``--section.key``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

USER_ERRORS = (ValueError, OSError, ImportError)  # bad input, unreadable files, a missing extra: the message says which


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says what the default is."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A command's parser: ``doc`` (its module docstring) up to the first blank line describes it."""
    return argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0], allow_abbrev=False, formatter_class=HelpFormatter,
    )


def run(prog: str, work: Callable, *args, **kwargs):
    """``work(*args, **kwargs)``; a user error ends the process with one line naming what was wrong."""
    try:
        return work(*args, **kwargs)
    except USER_ERRORS as error:
        sys.exit(f"{prog}: error: {error}")
