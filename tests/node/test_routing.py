"""Routing: chest CR/DX studies with a frontal image are reported, others are skipped with a reason."""

from __future__ import annotations

from dataclasses import replace

import pytest

from node.config import RoutingSettings
from node.routing import RoutedImage, choose_frontal_image, route_study

BASE = RoutedImage(
    sop_instance_uid="1.2.3.1",
    sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
    modality="CR",
    body_part_examined="CHEST",
    series_description="",
    view_position="PA",
    view_code_value="",
    view_code_meaning="",
    image_comments="",
    instance_number=1,
)


def test_route_chest_pa_reported():
    decision = route_study([BASE], "", RoutingSettings())
    assert decision.is_reported
    assert decision.frontal_sop_instance_uid == "1.2.3.1"
    assert decision.frontal_reason == "View Position PA"


def test_frontal_prefers_pa_over_ap():
    ap = replace(BASE, sop_instance_uid="1.2.3.2", view_position="AP", instance_number=0)
    image, reason = choose_frontal_image([ap, BASE])
    assert image.sop_instance_uid == "1.2.3.1"
    assert reason == "View Position PA"


def test_frontal_lateral_view_position_not_frontal():
    lateral = replace(BASE, view_position="LL", series_description="PA")
    assert choose_frontal_image([lateral]) is None


@pytest.mark.parametrize(
    ("changes", "expected_reason"),
    [
        ({"view_position": "", "view_code_value": "399348003", "view_code_meaning": "postero-anterior"}, "View Code Sequence 399348003"),
        ({"view_position": "", "series_description": "view: PA"}, "Series Description names a PA view"),
        ({"view_position": "", "image_comments": "AP portable"}, "Image Comments names an AP view"),
        ({"view_position": "", "series_description": "Frontal chest"}, "Series Description names a frontal view"),
    ],
)
def test_frontal_chosen_without_view_position(changes, expected_reason):
    image, reason = choose_frontal_image([replace(BASE, **changes)])
    assert reason.startswith(expected_reason)


def test_route_lateral_only_study_skipped():
    lateral = replace(BASE, view_position="", view_code_value="399173006", view_code_meaning="lateral")
    decision = route_study([lateral], "", RoutingSettings())
    assert not decision.is_reported
    assert decision.reason == "no frontal (PA or AP) chest image found in the study"


def test_route_non_chest_body_part_skipped():
    decision = route_study([replace(BASE, body_part_examined="HIP")], "HIP JOINT", RoutingSettings())
    assert not decision.is_reported
    assert decision.reason == "not a chest study: Body Part Examined HIP"


def test_route_ct_modality_skipped():
    decision = route_study([replace(BASE, modality="CT")], "", RoutingSettings())
    assert not decision.is_reported
    assert "modalities: CT" in decision.reason


def test_route_empty_body_part_with_chest_description_reported():
    decision = route_study([replace(BASE, body_part_examined="")], "CHEST 2 VIEWS", RoutingSettings())
    assert decision.is_reported
