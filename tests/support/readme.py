"""The README's code samples, as tests check them."""

from __future__ import annotations

from tests.support.proc import REPO


def handler_example() -> str:
    """The Python block of the README's "Writing a handler" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Writing a handler", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]
