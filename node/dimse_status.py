"""Named DIMSE status codes the node returns or interprets.

Codes and meanings follow PS3.4 Annex B.2.3 (Storage Service Class statuses), PS3.4 C.4
(Query/Retrieve statuses) and PS3.7 Annex C (general status codes). The node never calls pynetdicom's `Status.add`, which would
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


class QueryRetrieveStatus(IntEnum):
    """Status codes of C-FIND, C-MOVE and C-GET responses that the node interprets.

    Codes and meanings follow PS3.4 C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE) and C.4.3.1.4
    (C-GET). Several codes share a value with a `DimseStatus` member but mean something else
    here, so they live in their own Enum.
    """

    SUCCESS = 0x0000
    """Matching or all sub-operations are complete without a failure."""

    PENDING = 0xFF00
    """A match or a sub-operation result follows; more responses come."""

    PENDING_WITH_WARNING = 0xFF01
    """Like PENDING, but the SCP did not support some optional keys (C-FIND)."""

    CANCEL = 0xFE00
    """Matching or sub-operations ended by a C-CANCEL."""

    SUB_OPERATIONS_COMPLETE_WITH_FAILURES = 0xB000
    """Warning: sub-operations are complete, but one or more failed (C-MOVE, C-GET)."""

    OUT_OF_RESOURCES = 0xA700
    """Refused: the SCP is out of resources (C-FIND)."""

    OUT_OF_RESOURCES_MATCHES = 0xA701
    """Refused: the SCP cannot calculate the number of matches (C-MOVE, C-GET)."""

    OUT_OF_RESOURCES_SUB_OPERATIONS = 0xA702
    """Refused: the SCP cannot perform the sub-operations (C-MOVE, C-GET)."""

    MOVE_DESTINATION_UNKNOWN = 0xA801
    """Refused: the SCP does not know the move destination AE title (C-MOVE)."""

    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    """Error: the identifier does not match the information model."""

    UNABLE_TO_PROCESS = 0xC000
    """Failed: the SCP could not process the request (any code 0xC000-0xCFFF)."""


def query_retrieve_status_name(status: int) -> str:
    """Return the `QueryRetrieveStatus` member name of a status, or its hex code."""
    if 0xC000 <= status <= 0xCFFF:
        return QueryRetrieveStatus.UNABLE_TO_PROCESS.name
    try:
        return QueryRetrieveStatus(status).name
    except ValueError:
        return f"0x{status:04X}"
