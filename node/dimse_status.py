"""Named DIMSE status codes the node returns or interprets.

Codes and meanings follow PS3.4 Annex B.2.3 (Storage Service Class statuses) and PS3.7
Annex C (general status codes). The node never calls pynetdicom's `Status.add`, which would
change global state.
"""

from __future__ import annotations

from enum import IntEnum


class DimseStatus(IntEnum):
    """Status codes of C-STORE and C-ECHO responses."""

    SUCCESS = 0x0000
    """The instance is stored durably and indexed (PS3.7 C.1.1)."""

    PROCESSING_FAILURE = 0x0110
    """A general failure while processing the request (PS3.7 C.4.2)."""

    SOP_CLASS_NOT_SUPPORTED = 0x0122
    """The node does not store this SOP class (PS3.7 C.5.2)."""

    NOT_AUTHORIZED = 0x0124
    """The peer is not allowed to store this instance (PS3.7 C.5.4)."""

    DUPLICATE_SOP_INSTANCE = 0x0111
    """An instance with this SOP Instance UID but different content exists (PS3.7 C.4.1)."""

    OUT_OF_RESOURCES = 0xA700
    """Refused: no space to store the instance (PS3.4 B.2.3)."""

    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    """Error: the data set lacks required attributes or contradicts its SOP class (PS3.4 B.2.3)."""

    CANNOT_UNDERSTAND = 0xC000
    """Error: the data set cannot be parsed (PS3.4 B.2.3)."""

    COERCION_OF_DATA_ELEMENTS = 0xB000
    """Warning: stored, but some elements were changed (PS3.4 B.2.3)."""

    ELEMENTS_DISCARDED = 0xB006
    """Warning: stored, but some elements were discarded (PS3.4 B.2.3)."""

    DATA_SET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB007
    """Warning: stored, although the data set does not match the SOP class (PS3.4 B.2.3)."""


def status_category(status: int) -> str:
    """Return "success", "warning" or "failure" for a C-STORE response status (PS3.4 B.2.3)."""
    if status == DimseStatus.SUCCESS:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def status_name(status: int) -> str:
    """Return the member name of a known status, or its hex code."""
    try:
        return DimseStatus(status).name
    except ValueError:
        return f"0x{status:04X}"
