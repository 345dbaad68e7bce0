"""Worker helpers: the model's text is made safe for DICOM before it reaches the SR."""

from __future__ import annotations

import pytest

from node.worker import EMPTY_FINDINGS_TEXT, clean_findings_text


@pytest.mark.parametrize(
    ("text", "expected", "removed"),
    [
        ("Clear lungs.", "Clear lungs.", 0),
        ("Line one.\nLine two.\tTabbed.", "Line one.\nLine two.\tTabbed.", 0),
        ("Heart \x03size\x00 normal\x7f.", "Heart size normal.", 3),
        ("Pleural effusion \x85resolved.", "Pleural effusion resolved.", 1),
        ("Ärztlicher Befund: Lunge frei.", "Ärztlicher Befund: Lunge frei.", 0),
        ("\x01\x02", EMPTY_FINDINGS_TEXT, 2),
        ("   ", EMPTY_FINDINGS_TEXT, 0),
    ],
)
def test_clean_findings_text_removes_forbidden_control_characters(text, expected, removed):
    assert clean_findings_text(text) == (expected, removed)
