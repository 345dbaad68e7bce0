"""Choose the Specific Character Set of the draft SR and keep source bytes that do not decode.

The SR keeps the source image's character set when all of its text encodes under it, and
otherwise switches to ISO_IR 192 (UTF-8). Its log events keep the `sr_builder.` prefix of the SR
building stage.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import pydicom
import structlog
from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

log = structlog.get_logger(__name__)

UTF8_CHARACTER_SET = "ISO_IR 192"
_DEFAULT_REPERTOIRE_TERMS = frozenset({"", "ISO_IR 6", "ISO 2022 IR 6"})
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


def _select_character_set(sr: pydicom.Dataset, frontal_header: pydicom.Dataset) -> None:
    """Copy the source's Specific Character Set, or use UTF-8 if some text needs it.

    A source without Specific Character Set uses the default repertoire (ASCII). pydicom
    decodes and encodes such values as Latin-1, so the check uses ASCII instead.
    """
    source_character_set = frontal_header.get("SpecificCharacterSet")
    codecs = _python_codecs(source_character_set)
    if codecs is not None and all(_fits(text, codecs) for text in _text_values(sr)):
        if source_character_set is not None:
            sr.add(copy.deepcopy(frontal_header["SpecificCharacterSet"]))
        return
    sr.SpecificCharacterSet = UTF8_CHARACTER_SET
    # A PersonName keeps the bytes it was first encoded to and reuses them when it has no
    # encodings of its own, so each name is rebuilt from its text to be encoded as UTF-8.
    for dataset in _walk_datasets(sr):
        for element in dataset:
            if element.VR == "PN" and not element.is_empty:
                if element.VM > 1:
                    element.value = [PersonName(str(name)) for name in element.value]
                else:
                    element.value = PersonName(str(element.value))
    log.info(
        "sr_builder.character_set_changed",
        sop_instance_uid=sr.SOPInstanceUID,
        source_character_set=source_character_set,
        specific_character_set=UTF8_CHARACTER_SET,
    )


def _undecodable_text_values(dataset: pydicom.Dataset) -> dict[BaseTag, bytes]:
    """Return the raw bytes of the top-level text values that do not decode under the data
    set's Specific Character Set.

    pydicom decodes such a value with replacement characters and keeps only the re-encoded
    text, so the bytes are read from elements that are not yet decoded. Elements decoded
    before the call are skipped.
    """
    character_set = dataset.get("SpecificCharacterSet")
    if _python_codecs(character_set) is None:
        return {}
    # The codecs pydicom decodes with, which for the default repertoire is Latin-1.
    codecs = convert_encodings(character_set or "")
    # NOTE: values under ISO 2022 code extensions (several Defined Terms) are not checked,
    # so invalid bytes there are still replaced in the SR.
    if len(codecs) != 1:
        return {}
    undecodable = {}
    for tag in dataset.keys():
        element = dataset.get_item(tag)
        if not isinstance(element, RawDataElement) or not element.value:
            continue
        try:
            value_representation = element.VR or dictionary_VR(tag)
        except KeyError:
            continue
        if value_representation not in _TEXT_VRS:
            continue
        try:
            element.value.decode(codecs[0])
        except UnicodeDecodeError:
            undecodable[tag] = element.value
    return undecodable


def _restore_undecodable_values(
    sr: pydicom.Dataset, frontal_header: pydicom.Dataset, undecodable_values: dict[BaseTag, bytes]
) -> None:
    """Write the source's own bytes for copied values that pydicom could not decode.

    This happens only while the SR keeps the source's Specific Character Set. Under
    ISO_IR 192 the invalid bytes cannot be carried, so the value keeps its replacement
    characters and a warning names the attribute.
    """
    character_set_kept = sr.get("SpecificCharacterSet") == frontal_header.get("SpecificCharacterSet")
    for tag, raw_value in undecodable_values.items():
        if tag not in sr or tag not in frontal_header:
            continue
        element = sr[tag]
        if str(element.value) != str(frontal_header[tag].value):
            # The SR has its own value for this attribute, such as its Series Description.
            continue
        context = {
            "keyword": element.keyword,
            "sop_instance_uid": sr.SOPInstanceUID,
            "source_sop_instance_uid": frontal_header.SOPInstanceUID,
            "source_character_set": frontal_header.get("SpecificCharacterSet"),
        }
        if character_set_kept:
            sr[tag] = pydicom.DataElement(tag, element.VR, raw_value)
            log.warning("sr_builder.undecodable_value_copied", **context)
        else:
            log.warning("sr_builder.undecodable_value_replaced", **context)


def _python_codecs(character_set: str | Sequence[str] | None) -> list[str] | None:
    """Return Python codecs for the Defined Terms, or None if one of them is unknown."""
    if character_set is None:
        terms = [""]
    elif isinstance(character_set, str):
        terms = [character_set]
    else:
        terms = list(character_set) or [""]
    codecs = []
    for term in terms:
        term = term.strip()
        if term in _DEFAULT_REPERTOIRE_TERMS:
            codecs.append("ascii")
        elif term in python_encoding:
            codecs.append(python_encoding[term])
        else:
            return None
    return codecs


def _fits(text: str, codecs: Sequence[str]) -> bool:
    """Return whether `text` encodes under the character sets, switching between them per
    character as ISO 2022 code extension allows when there are several."""
    if any(_encodes(text, codec) for codec in codecs):
        return True
    if len(codecs) == 1:
        return False
    return all(any(_encodes(character, codec) for codec in codecs) for character in text)


def _encodes(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeError:
        return False
    return True


def _text_values(dataset: pydicom.Dataset) -> Iterator[str]:
    for item in _walk_datasets(dataset):
        for element in item:
            if element.VR not in _TEXT_VRS or element.is_empty:
                continue
            values = element.value if element.VM > 1 else [element.value]
            for value in values:
                yield str(value)


def _walk_datasets(dataset: pydicom.Dataset) -> Iterator[pydicom.Dataset]:
    yield dataset
    for element in dataset:
        if element.VR == "SQ":
            for item in element.value:
                yield from _walk_datasets(item)
