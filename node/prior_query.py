"""Prior query: Study Root C-FIND of one query source for the current patient's earlier chest studies.

The STUDY level query matches on Patient ID, Issuer of Patient ID, Modalities in Study and a
Study Date range. The node checks every match again (`reject_reason`), because a PACS may
match Patient ID with wildcards or ignore Issuer of Patient ID. For a
candidate study, SERIES and IMAGE level queries give the header evidence that the routing
rules need to choose its frontal image.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from pydicom.dataset import Dataset
from pynetdicom.association import Association

from node.config import QuerySourceSettings, RoutingSettings
from node.ingest import ACCEPTED_STORAGE_SOP_CLASSES
from node.priors import study_datetime
from node.query_retrieve import Deadline, QuerySourceClient
from node.routing import RoutedImage, route_study
from node.store import is_valid_uid

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PriorSearchRequest:
    """The current study whose prior is sought, as the index records it."""

    study_instance_uid: str
    patient_fk: int
    patient_id: str
    issuer_of_patient_id: str
    patient_hash: str
    study_date: str
    study_time: str


@dataclass(frozen=True)
class PriorCandidate:
    """One study-level C-FIND match that passed the node's own checks."""

    source: QuerySourceSettings
    study_instance_uid: str
    study_datetime: dt.datetime
    study_description: str


@dataclass(frozen=True)
class FrontalImage:
    """The image of a candidate study that routing chose as its frontal view."""

    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    frontal_reason: str


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return "" if value is None else str(value).strip()


def _integer(dataset: Dataset, keyword: str) -> int | None:
    try:
        return int(dataset.get(keyword))
    except (TypeError, ValueError):
        return None


def new_identifier(level: str, *values: str) -> Dataset:
    """Return a C-FIND identifier; UTF-8 is declared only when a value needs it."""
    identifier = Dataset()
    if any(not value.isascii() for value in values):
        identifier.SpecificCharacterSet = "ISO_IR 192"
    identifier.QueryRetrieveLevel = level
    return identifier


def find_candidates(
    client: QuerySourceClient,
    assoc: Association,
    deadline: Deadline,
    request: PriorSearchRequest,
    earliest: dt.datetime,
    modalities: Sequence[str],
) -> list[PriorCandidate]:
    """Query one source at STUDY level and return its most recent earlier studies.

    Parameters
    ----------
    client, assoc, deadline
        The source, an association with it that has the Study Root FIND context, and the
        time left for its queries.
    request
        The current study.
    earliest
        The oldest Study Date and Time still used as a prior (`max_prior_age_days`).
    modalities
        The Modalities in Study to ask for, from the routing rules.

    Returns
    -------
    list of PriorCandidate
        At most the source's `max_studies` matches that pass `reject_reason`, newest first.

    Raises
    ------
    QueryRetrieveError
        When the source fails, aborts or runs out of time.
    """
    current_time = study_datetime(request.study_date, request.study_time)
    identifier = new_identifier("STUDY", request.patient_id, request.issuer_of_patient_id)
    identifier.PatientID = request.patient_id
    identifier.IssuerOfPatientID = request.issuer_of_patient_id
    identifier.ModalitiesInStudy = list(modalities)
    # Same-day studies are ordered by Study Time below, so the range includes the current date.
    identifier.StudyDate = f"{earliest:%Y%m%d}-{current_time:%Y%m%d}"
    identifier.StudyTime = ""
    identifier.StudyDescription = ""
    identifier.AccessionNumber = ""
    identifier.StudyInstanceUID = ""
    matches = client.find(assoc, identifier, deadline)

    candidates = []
    rejected: Counter[str] = Counter()
    for match in matches:
        reason = reject_reason(match, request, earliest, current_time)
        if reason:
            rejected[reason] += 1
            continue
        candidates.append(
            PriorCandidate(
                source=client.source,
                study_instance_uid=_text(match, "StudyInstanceUID"),
                study_datetime=study_datetime(_text(match, "StudyDate"), _text(match, "StudyTime")),
                study_description=_text(match, "StudyDescription"),
            )
        )
    candidates.sort(key=lambda candidate: candidate.study_datetime, reverse=True)
    log.info(
        "prior_retrieval.studies_found",
        query_source=client.source.name,
        matches=len(matches),
        candidates=len(candidates),
        rejected=dict(rejected),
        patient_hash=request.patient_hash,
    )
    return candidates[: client.source.max_studies]


def reject_reason(
    match: Dataset, request: PriorSearchRequest, earliest: dt.datetime, current_time: dt.datetime
) -> str:
    """Return why a study-level C-FIND match cannot be the prior, or "" when it can."""
    study_instance_uid = _text(match, "StudyInstanceUID")
    if not is_valid_uid(study_instance_uid):
        return "invalid Study Instance UID"
    if study_instance_uid == request.study_instance_uid:
        return "the current study"
    # A PACS may match Patient ID with wildcards or ignore Issuer of Patient ID, so both are
    # compared exactly here. A match without Issuer of Patient ID counts as an empty issuer.
    if _text(match, "PatientID") != request.patient_id:
        return "other Patient ID"
    if _text(match, "IssuerOfPatientID") != request.issuer_of_patient_id:
        return "other Issuer of Patient ID"
    match_time = study_datetime(_text(match, "StudyDate"), _text(match, "StudyTime"))
    if match_time is None:
        return "no valid Study Date"
    if match_time >= current_time:
        return "not earlier than the current study"
    if match_time < earliest:
        return "older than max_prior_age_days"
    return ""


def find_frontal_image(
    client: QuerySourceClient,
    assoc: Association,
    deadline: Deadline,
    candidate: PriorCandidate,
    routing: RoutingSettings,
) -> FrontalImage | None:
    """Query a candidate's series and images and apply the routing rules to them.

    Returns the frontal image that routing chooses, or None (logged) when the candidate is
    not a chest study with a frontal image of a storage SOP class the node accepts.

    Raises
    ------
    QueryRetrieveError
        When the source fails, aborts or runs out of time.
    """
    modalities = {modality.upper() for modality in routing.modalities}
    series_query = new_identifier("SERIES")
    series_query.StudyInstanceUID = candidate.study_instance_uid
    for keyword in ("SeriesInstanceUID", "Modality", "BodyPartExamined", "SeriesDescription", "SeriesNumber"):
        setattr(series_query, keyword, "")

    images: list[RoutedImage] = []
    series_of_image: dict[str, str] = {}
    for series in client.find(assoc, series_query, deadline):
        modality = _text(series, "Modality").upper()
        series_instance_uid = _text(series, "SeriesInstanceUID")
        if modality not in modalities or not is_valid_uid(series_instance_uid):
            continue
        image_query = new_identifier("IMAGE")
        image_query.StudyInstanceUID = candidate.study_instance_uid
        image_query.SeriesInstanceUID = series_instance_uid
        for keyword in ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "ViewPosition", "ImageComments"):
            setattr(image_query, keyword, "")
        image_query.ViewCodeSequence = []
        for image in client.find(assoc, image_query, deadline):
            sop_instance_uid = _text(image, "SOPInstanceUID")
            sop_class_uid = _text(image, "SOPClassUID")
            if not is_valid_uid(sop_instance_uid) or sop_class_uid not in ACCEPTED_STORAGE_SOP_CLASSES:
                continue
            view_codes = image.get("ViewCodeSequence") or []
            series_of_image[sop_instance_uid] = series_instance_uid
            images.append(
                RoutedImage(
                    sop_instance_uid=sop_instance_uid,
                    sop_class_uid=sop_class_uid,
                    modality=modality,
                    body_part_examined=_text(series, "BodyPartExamined").upper(),
                    series_description=_text(series, "SeriesDescription"),
                    view_position=_text(image, "ViewPosition").upper(),
                    view_code_value=_text(view_codes[0], "CodeValue") if view_codes else "",
                    view_code_meaning=_text(view_codes[0], "CodeMeaning") if view_codes else "",
                    image_comments=_text(image, "ImageComments"),
                    instance_number=_integer(image, "InstanceNumber"),
                )
            )

    decision = route_study(images, candidate.study_description, routing)
    if not decision.is_reported:
        log.info(
            "prior_retrieval.candidate_skipped",
            candidate_study_instance_uid=candidate.study_instance_uid,
            reason=decision.reason,
        )
        return None
    sop_class_uid = next(image.sop_class_uid for image in images if image.sop_instance_uid == decision.frontal_sop_instance_uid)
    return FrontalImage(
        series_instance_uid=series_of_image[decision.frontal_sop_instance_uid],
        sop_instance_uid=decision.frontal_sop_instance_uid,
        sop_class_uid=sop_class_uid,
        frontal_reason=decision.frontal_reason,
    )
