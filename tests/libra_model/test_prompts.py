"""Tests of the Libra prompt templates, piecewise tokenisation, stop strings and output cleaning."""

from __future__ import annotations

import pytest
import sentencepiece
import torch

from libra_model.modeling_libra import IMAGE_TOKEN_INDEX
from libra_model.prompts import (
    DEFAULT_QUESTION,
    StopStringCriteria,
    build_question,
    clean_generated_text,
    get_template,
    select_conv_mode,
    tokenize_prompt,
)
from libra_model.tokenization_libra import LibraTokenizer

LIBRA_V1_PROMPT = (
    "The assistant specialized in comparing Chest X-ray images, identifying differences, and noting temporal "
    "changes. USER: <image>\nProvide a detailed description of the findings in the radiology image. ASSISTANT:"
)
LIBRA_LLAMA_3_PROMPT = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language.The assistant specialized "
    "in comparing Chest X-ray images, identifying differences, and noting temporal changes.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nProvide a detailed description of the findings in the "
    "radiology image.<|eot_id|>\n<|start_header_id|>ASSISTANT<|end_header_id|>"
)


@pytest.fixture
def tokenizer(tiny_checkpoint) -> LibraTokenizer:
    return LibraTokenizer.from_folder(tiny_checkpoint)


@pytest.fixture
def processor(tiny_checkpoint) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))


def test_libra_v1_prompt_is_exact():
    assert get_template("libra_v1").render(DEFAULT_QUESTION) == LIBRA_V1_PROMPT


def test_libra_llama_3_prompt_is_exact():
    assert get_template("libra_llama_3").render(DEFAULT_QUESTION) == LIBRA_LLAMA_3_PROMPT


@pytest.mark.parametrize(
    ("conv_mode", "stop_string"), [("libra_v1", "</s>"), ("libra_llama_3", "<|eot_id|>")]
)
def test_template_stop_strings(conv_mode, stop_string):
    assert get_template(conv_mode).stop_string == stop_string


@pytest.mark.parametrize(
    ("model_name", "conv_mode"),
    [
        ("libra-v1.0-3b", "libra_llama_3"),
        ("Libra-v1.0-3B", "libra_llama_3"),
        ("libra-v1.0-7b", "libra_v1"),
        ("libra-tiny", "libra_v1"),
    ],
)
def test_select_conv_mode_by_name(model_name, conv_mode):
    assert select_conv_mode(model_name) == conv_mode


def test_unknown_conv_mode_raises():
    with pytest.raises(ValueError, match="libra_llama_3, libra_v1"):
        get_template("vicuna_v1")


def test_build_question_appends_indication():
    assert build_question("  fever and cough ") == f"{DEFAULT_QUESTION} Clinical indication: fever and cough"


def test_build_question_without_indication():
    assert build_question(None) == DEFAULT_QUESTION


def test_tokenize_prompt_has_one_bos_and_one_placeholder(tokenizer):
    ids = tokenize_prompt(LIBRA_V1_PROMPT, tokenizer)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(IMAGE_TOKEN_INDEX) == 1


def test_tokenize_prompt_joins_sentencepiece_pieces(tokenizer, processor):
    before, after = LIBRA_V1_PROMPT.split("<image>")
    expected = [processor.bos_id(), *processor.encode(before), IMAGE_TOKEN_INDEX, *processor.encode(after)]
    assert tokenize_prompt(LIBRA_V1_PROMPT, tokenizer) == expected


def test_tokenize_prompt_pieces_around_placeholder(tokenizer, processor):
    ids = tokenize_prompt(LIBRA_V1_PROMPT, tokenizer)
    placeholder = ids.index(IMAGE_TOKEN_INDEX)
    # The trailing space of "USER: " becomes a lone "▁", and the newline after the image gets a dummy prefix.
    assert processor.id_to_piece(ids[placeholder - 1]) == "▁"
    assert processor.id_to_piece(ids[placeholder + 1]) == "▁"
    assert processor.id_to_piece(ids[placeholder + 2]) == "<0x0A>"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The lungs are clear.</s> ", "The lungs are clear."),
        ("The lungs are clear.", "The lungs are clear."),
        ("Clear </s>", "Clear"),
    ],
)
def test_clean_generated_text(text, expected):
    assert clean_generated_text(text, "</s>") == expected


def test_stop_criteria_stops_on_eos_id(tokenizer):
    criteria = StopStringCriteria("</s>", tokenizer)
    ids = torch.tensor([tokenizer.encode("No effusion.", add_bos=False) + [tokenizer.eos_token_id]])
    assert criteria(ids, None).tolist() == [True]


def test_stop_criteria_continues_without_stop(tokenizer):
    criteria = StopStringCriteria("</s>", tokenizer)
    ids = torch.tensor([tokenizer.encode("No effusion.", add_bos=False)])
    assert criteria(ids, None).tolist() == [False]


def test_stop_criteria_matches_decoded_text(tokenizer):
    # "usion." alone tokenises with a dummy prefix, so only the decoded-text check can find it.
    criteria = StopStringCriteria("usion.", tokenizer)
    ids = tokenizer.encode("No effusion.", add_bos=False)
    assert ids[-len(criteria.stop_ids) :] != criteria.stop_ids
    assert criteria(torch.tensor([ids]), None).tolist() == [True]


def test_stop_criteria_ignores_prompt(tokenizer):
    prompt = tokenizer.encode("clear.", add_bos=False) + [tokenizer.eos_token_id]
    criteria = StopStringCriteria("</s>", tokenizer, prompt_length=len(prompt))
    ids = torch.tensor([prompt + tokenizer.encode(" No", add_bos=False)])
    assert criteria(ids, None).tolist() == [False]
