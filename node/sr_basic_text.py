"""Basic Text SR IOD (PS3.3 A.35.1) on highdicom's SR base class."""

from __future__ import annotations

import pydicom
from highdicom.sr.sop import _SR
from highdicom.sr.utils import find_content_items
from pydicom.uid import BasicTextSRStorage

from node.sr_charset import _walk_datasets


class BasicTextSR(_SR):
    """Basic Text SR document (PS3.3 A.35.1), a class that highdicom 0.28 does not provide.

    Basic Text SR allows no NUM, SCOORD, SCOORD3D or TCOORD content items and no by-reference
    relationships (PS3.3 A.35.1.3.1). The constructor rejects such content and otherwise
    behaves as `highdicom.sr.EnhancedSR`, whose keyword parameters it takes.

    NOTE: this derives from highdicom's private `_SR` base, checked against highdicom 0.28.2.
    """

    def __init__(self, evidence, content, **kwargs) -> None:
        root = content if isinstance(content, pydicom.Dataset) else content[0]
        for value_type in ("NUM", "SCOORD", "SCOORD3D", "TCOORD"):
            if find_content_items(root, value_type=value_type, recursive=True):
                raise ValueError(
                    f"Basic Text SR does not allow {value_type} content items: "
                    "remove them or write an Enhanced or Comprehensive SR."
                )
        if any("ReferencedContentItemIdentifier" in item for item in _walk_datasets(root)):
            raise ValueError(
                "Basic Text SR does not allow by-reference relationships: include the "
                "target content item by value or write a Comprehensive SR."
            )
        super().__init__(
            evidence=evidence, content=content, sop_class_uid=BasicTextSRStorage, **kwargs
        )
