"""Small helpers shared by test files (conftest.py holds only the fixtures)."""
import os
from pathlib import Path


def strip_paths(msg: str, *paths) -> str:
    """msg with every occurrence of the given paths replaced by <path>.

    Error messages name the files they are about, and pytest names a test's temporary
    folder after the test: a message under test_corrupt_checkpoint... contains the word
    "corrupt" whatever it says. Assertions on the words of a message match against what
    is left. Each path is removed as given, absolute and resolved (a message may use any),
    longest first so that a folder does not leave half of a longer path behind.
    """
    forms = set()
    for p in paths:
        p = os.fspath(p)
        forms.update({p, os.path.abspath(p), str(Path(p).resolve())})
    for form in sorted((f for f in forms if f), key=len, reverse=True):
        msg = msg.replace(form, "<path>")
    return msg
