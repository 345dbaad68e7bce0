"""Routing: decide whether a stable study gets a report, and which image is its frontal view.

A study is reported when it has a CR or DX image (by default), is a chest study by Body Part
Examined or by its descriptions, and has a frontal image. The frontal image is chosen by
View Position (PA before AP); without it, by View Code Sequence, then by series and image
descriptions. The decision and its reason are stored with the study.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from node.config import RoutingSettings

# SNOMED CT codes of View Code Sequence (CID 4010 "DX View").
_VIEW_CODE_PA = {"399348003", "R-10214"}
_VIEW_CODE_AP = {"399198007", "R-10206"}
_VIEW_CODE_LATERAL = {"399173006", "399260004", "R-10236", "R-10232"}

_WORD_PATTERN = re.compile(r"[A-Z0-9]+")


@dataclass(frozen=True)
class RoutedImage:
    """The header evidence of one image that routing looks at."""

    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    view_position: str
    view_code_value: str
    view_code_meaning: str
    image_comments: str
    instance_number: int | None


@dataclass(frozen=True)
class RoutingDecision:
    """Whether a study is reported; when it is, its frontal image and why that one."""

    is_reported: bool
    reason: str
    frontal_sop_instance_uid: str | None = None
    frontal_reason: str = ""


def _words(text: str) -> set[str]:
    return set(_WORD_PATTERN.findall(text.upper()))


def _view_rank(image: RoutedImage) -> tuple[int, str] | None:
    """Return (rank, reason) for a frontal image, lower rank preferred, or None if not frontal."""
    if image.view_position in ("PA", "AP"):
        rank = 0 if image.view_position == "PA" else 1
        return rank, f"View Position {image.view_position}"
    if image.view_position:
        # A stated non-frontal view position (LL, RL, oblique, decubitus) is final.
        return None
    meaning = image.view_code_meaning.lower()
    if image.view_code_value in _VIEW_CODE_PA or "postero-anterior" in meaning:
        return 2, f"View Code Sequence {image.view_code_value} ({image.view_code_meaning})"
    if image.view_code_value in _VIEW_CODE_AP or "antero-posterior" in meaning:
        return 3, f"View Code Sequence {image.view_code_value} ({image.view_code_meaning})"
    if image.view_code_value in _VIEW_CODE_LATERAL or "lateral" in meaning:
        return None
    for source, text in (("Series Description", image.series_description), ("Image Comments", image.image_comments)):
        words = _words(text)
        if words & {"LAT", "LATERAL", "LL", "RL"}:
            return None
        if "PA" in words:
            return 4, f"{source} names a PA view"
        if "AP" in words:
            return 5, f"{source} names an AP view"
        if "FRONTAL" in words:
            return 6, f"{source} names a frontal view"
    return None


def choose_frontal_image(images: Sequence[RoutedImage]) -> tuple[RoutedImage, str] | None:
    """Return the preferred frontal image of a study and the reason, or None when there is none.

    Ties between images of equal rank go to the lowest Instance Number, then the SOP Instance UID.
    """
    ranked = []
    for image in images:
        view = _view_rank(image)
        if view is not None:
            ranked.append((view[0], image.instance_number or 0, image.sop_instance_uid, image, view[1]))
    if not ranked:
        return None
    best = min(ranked, key=lambda entry: entry[:3])
    return best[3], best[4]


def route_study(images: Sequence[RoutedImage], study_description: str, settings: RoutingSettings) -> RoutingDecision:
    """Apply the routing rules to a stable study's images."""
    modalities = {modality.upper() for modality in settings.modalities}
    radiographs = [image for image in images if image.modality in modalities]
    if not radiographs:
        found = sorted({image.modality or "none" for image in images})
        return RoutingDecision(False, f"no {'/'.join(sorted(modalities))} image; modalities: {', '.join(found)}")

    body_parts = {part.upper() for part in settings.body_parts}
    keywords = {keyword.upper() for keyword in settings.description_keywords}
    chest_images = [
        image
        for image in radiographs
        if image.body_part_examined in body_parts
        or (not image.body_part_examined and _words(image.series_description) & keywords)
    ]
    if not chest_images and _words(study_description) & keywords:
        chest_images = [image for image in radiographs if not image.body_part_examined]
    if not chest_images:
        found = sorted({image.body_part_examined or "empty" for image in radiographs})
        return RoutingDecision(False, f"not a chest study: Body Part Examined {', '.join(found)}")

    frontal = choose_frontal_image(chest_images)
    if frontal is None:
        return RoutingDecision(False, "no frontal (PA or AP) chest image found in the study")
    image, frontal_reason = frontal
    return RoutingDecision(True, "chest radiograph study", image.sop_instance_uid, frontal_reason)
