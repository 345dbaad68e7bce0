"""Structured logging for the node: JSON lines in production, console text for development.

This is the only module that configures logging. Every log line carries UIDs and AE titles,
never patient names or IDs: `drop_phi` removes a deny-list of keys as a safety net, and
`patient_hash` gives a keyed hash to correlate a patient's lines without revealing the ID.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
from pathlib import Path

import structlog

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


def drop_phi(logger: object, method_name: str, event_dict: dict) -> dict:
    """Remove deny-listed keys from a log event (a structlog processor)."""
    for key in PHI_KEYS.intersection(event_dict):
        event_dict[key] = "[removed]"
    return event_dict


def configure_logging(log_format: str = "json", level: str = "info", stream=None) -> None:
    """Route structlog and the standard `logging` module (pynetdicom, apscheduler) to one stream.

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
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # pynetdicom logs every PDU at info level and dataset summaries at debug level, which
    # can include patient names; keep it at warning unless the node itself debugs.
    logging.getLogger("pynetdicom").setLevel(max(numeric_level, logging.WARNING))
    logging.getLogger("apscheduler").setLevel(max(numeric_level, logging.WARNING))
    # highdicom logs each module it copies at info level.
    logging.getLogger("highdicom").setLevel(max(numeric_level, logging.WARNING))


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
