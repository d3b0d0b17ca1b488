"""Free text a person reads back is refused with control or bidirectional formatting characters."""

from __future__ import annotations

import pytest
from agentid_server.domain.model import unreadable


@pytest.mark.parametrize(
    "text",
    ["", "Transfer 5 EUR to account 42", "line one\nline two\tend", "café ☕ 👩‍💻", "日本語"],
)
def test_ordinary_text_is_fine(text: str) -> None:
    assert unreadable(text) is None


@pytest.mark.parametrize(
    ("text", "code"),
    [("a\x00b", "U+0000"), ("\x1b[2J", "U+001B"), ("x\rY", "U+000D"), ("\x7f", "U+007F"),
     ("\x9b", "U+009B"), ("abc\u202edcb", "U+202E"), ("\u2066x\u2069", "U+2066")],
)  # fmt: skip
def test_controls_and_reordering_are_refused(text: str, code: str) -> None:
    problem = unreadable(text)
    assert problem is not None
    assert code in problem
