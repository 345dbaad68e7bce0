"""Structured logging for the node: JSON lines in production, console text for development.

This is the only module that configures logging. Every log line carries UIDs and AE titles,
never patient names or IDs: `drop_phi` removes a deny-list of keys as a safety net, and
`patient_hash` gives a keyed hash to correlate a patient's lines without revealing the ID.
Messages of other libraries and of exceptions can quote values, so the receiver and the
worker bind the patient identifiers of the instance or job in hand
(`bind_patient_identifiers`), and every line is searched for them and has them replaced.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import structlog
from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pynetdicom import _config as pynetdicom_config

from node.store import make_private_directory

# Keys that would carry PHI or report text. Code must not log them; this list catches mistakes.
PHI_KEYS = frozenset(
    {
        "patient_name",
        "patient_id",
        "patient_birth_date",
        "patient_birth_name",
        "patient_address",
        "other_patient_ids",
        "other_patient_names",
        "accession_number",
        "referring_physician_name",
        "institution_address",
        "findings_text",
        "report_text",
        "dataset",
    }
)


# Attributes whose values identify a patient. Their values are replaced in every log line of
# the thread that bound them.
PATIENT_IDENTIFIER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "AccessionNumber",
)
# Shorter values and name components are not replaced, because they would match common words.
_MIN_REDACTED_LENGTH = 2
REDACTED = "[removed]"

_bound_identifiers: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "patient_identifiers", default=frozenset()
)
_bound_pattern: contextvars.ContextVar[re.Pattern[str] | None] = contextvars.ContextVar(
    "patient_identifier_pattern", default=None
)


def drop_phi(logger: object, method_name: str, event_dict: dict) -> dict:
    """Remove deny-listed keys from a log event (a structlog processor)."""
    for key in PHI_KEYS.intersection(event_dict):
        event_dict[key] = "[removed]"
    return event_dict


def _element_texts(dataset: Dataset, keyword: str, encoding: str) -> list[str]:
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in dataset:
        return []
    element = dataset.get_item(tag)
    if isinstance(element, RawDataElement):
        # Decoded here without pydicom, whose validation warnings would quote the value
        # before it is bound.
        raw_value = element.value or b""
        values = raw_value.decode(encoding, errors="replace").split("\\")
    elif element.value is None:
        values = []
    elif element.VM > 1:
        values = [str(value) for value in element.value]
    else:
        values = [str(element.value)]
    return [value.strip(" \x00") for value in values]


def _variants(value: str) -> set[str]:
    """Return the forms in which a value may be quoted: whole, per name component, with
    the carets shown as spaces, and a DA value as an ISO date."""
    variants = {value, value.replace("^", " ").strip()}
    for group in value.split("="):
        variants.update({group, group.replace("^", " ")})
        variants.update(group.split("^"))
    if len(value) == 8 and value.isdigit():
        variants.add(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return {variant.strip() for variant in variants if len(variant.strip()) >= _MIN_REDACTED_LENGTH}


def patient_identifier_values(dataset: Dataset) -> set[str]:
    """Return the identifying values of a data set, in the forms a message may quote them.

    The values are read without decoding pydicom elements, so that a value invalid for its
    VR is not quoted in a pydicom warning first. Values under ISO 2022 code extensions are
    decoded with the first character set only.
    """
    try:
        encodings = convert_encodings(dataset.get("SpecificCharacterSet") or "")
    except (LookupError, ValueError, TypeError):
        # An unusable Specific Character Set: Latin-1 still finds the ASCII forms.
        encodings = ["iso8859"]
    found: set[str] = set()
    for keyword in PATIENT_IDENTIFIER_KEYWORDS:
        for value in _element_texts(dataset, keyword, encodings[0]):
            found.update(_variants(value))
    return found


def bind_patient_identifiers(dataset: Dataset) -> None:
    """Add a data set's identifying values to those replaced in this thread's log lines.

    Call it inside `patient_identifiers_redacted`, which removes them again.
    """
    values = _bound_identifiers.get() | patient_identifier_values(dataset)
    _bound_identifiers.set(values)
    alternatives = "|".join(re.escape(value) for value in sorted(values, key=len, reverse=True))
    # A value is replaced only where it is not part of a longer word or a dotted UID.
    _bound_pattern.set(re.compile(rf"(?<![\w.])(?:{alternatives})(?![\w.])") if values else None)


@contextlib.contextmanager
def patient_identifiers_redacted() -> Iterator[None]:
    """Replace the values bound inside the block in this thread's log lines, then unbind them."""
    values_token = _bound_identifiers.set(frozenset())
    pattern_token = _bound_pattern.set(None)
    try:
        yield
    finally:
        _bound_pattern.reset(pattern_token)
        _bound_identifiers.reset(values_token)


def redact_patient_identifiers(text: str) -> str:
    """Return `text` with the identifying values bound in this thread replaced."""
    pattern = _bound_pattern.get()
    return pattern.sub(REDACTED, text) if pattern is not None else text


def redact_bound_identifiers(logger: object, method_name: str, event_dict: dict) -> dict:
    """Replace bound identifying values in every string of a log event (a structlog processor)."""
    if _bound_pattern.get() is None:
        return event_dict
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = redact_patient_identifiers(value)
    return event_dict


def configure_logging(log_format: str = "json", level: str = "info", stream=None) -> None:
    """Route structlog, the standard `logging` module (pynetdicom, apscheduler, highdicom,
    pydicom) and Python warnings to one stream.

    Parameters
    ----------
    log_format
        "json" for one JSON object per line, "console" for readable text.
    level
        Minimum level: "debug", "info", "warning" or "error".
    stream
        Where lines go; standard error by default.
    """
    stream = stream or sys.stderr
    shared_processors = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_phi,
    ]
    renderer = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            *shared_processors,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared_processors],
        # Every line passes here, from structlog or the standard library, with its
        # exception rendered as text, so the bound identifiers are replaced in all of it.
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_bound_identifiers,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # pynetdicom logs every PDU at info level, apscheduler and alembic every run and highdicom
    # every module it copies, so they log at warning unless the node logs at debug.
    library_level = logging.DEBUG if numeric_level <= logging.DEBUG else max(numeric_level, logging.WARNING)
    for library in ("pynetdicom", "apscheduler", "alembic", "highdicom"):
        logging.getLogger(library).setLevel(library_level)
    # pydicom's debug output lists element values once its config.debugging is on.
    logging.getLogger("pydicom").setLevel(max(numeric_level, logging.INFO))
    # pynetdicom prints the identifier data sets of C-FIND, C-GET and C-MOVE messages.
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    # Warnings of pydicom and highdicom quote values; as log lines they are redacted.
    logging.captureWarnings(True)
    # highdicom 0.28 warns about each single-component person name and quotes it.
    warnings.filterwarnings(
        "ignore", message=r"The string .* is unlikely to represent the intended person name", category=UserWarning
    )


def load_or_create_hash_key(data_dir: Path) -> bytes:
    """Return the node's secret key for patient hashes, creating it (mode 0600) on first use."""
    key_path = data_dir / "patient_hash.key"
    try:
        return bytes.fromhex(key_path.read_text().strip())
    except FileNotFoundError:
        pass
    make_private_directory(data_dir)
    key = secrets.token_bytes(32)
    descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as key_file:
        key_file.write(key.hex())
    return key


def patient_hash(key: bytes, patient_id: str, issuer_of_patient_id: str = "") -> str:
    """Return a 12-character keyed hash (HMAC-SHA256) of a patient identity, for log lines."""
    message = f"{patient_id}\\{issuer_of_patient_id}".encode("utf-8", "surrogateescape")
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:12]
