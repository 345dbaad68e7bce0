"""Tests of the Libra tokenizer: SentencePiece-identical ids, decoding and the tokenizer.json fallback."""

from __future__ import annotations

import shutil

import pytest
import sentencepiece
from transformers import LlamaTokenizer

from libra_model.tokenization_libra import LibraTokenizer, TokenizerFilesNotFoundError

pytestmark = pytest.mark.usefixtures("block_network")

SAMPLE_TEXTS = [
    "The heart size is normal. The lungs are clear.",
    "USER: ",
    "\nProvide a detailed description of the findings in the radiology image. ASSISTANT:",
    "Compared with 2019-03-04: new 12 mm nodule (right apex).",
    "Épanchement pleural; 胸水 ☃",
    "  leading and trailing spaces  ",
]


@pytest.fixture
def tokenizer(tiny_checkpoint) -> LibraTokenizer:
    return LibraTokenizer.from_folder(tiny_checkpoint)


@pytest.fixture
def processor(tiny_checkpoint) -> sentencepiece.SentencePieceProcessor:
    return sentencepiece.SentencePieceProcessor(model_file=str(tiny_checkpoint / "tokenizer.model"))


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_encode_matches_sentencepiece(tokenizer, processor, text):
    assert tokenizer.encode(text, add_bos=True) == [processor.bos_id(), *processor.encode(text)]


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_decode_round_trips_text(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_bos=True)) == text


def test_special_token_ids_match_llama(tokenizer):
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == 2
    assert tokenizer.token_to_id("<unk>") == 0


def test_eos_text_in_prompt_becomes_eos_id(tokenizer):
    assert tokenizer.encode("clear.</s>", add_bos=False)[-1] == tokenizer.eos_token_id


def test_decode_skips_special_tokens(tokenizer):
    ids = tokenizer.encode("No effusion.", add_bos=True) + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "No effusion."
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>No effusion.</s>"


def test_missing_tokenizer_files_are_named(tiny_checkpoint, tmp_path):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", folder)
    with pytest.raises(TokenizerFilesNotFoundError) as error:
        LibraTokenizer.from_folder(folder)
    assert "tokenizer.model" in str(error.value)
    assert "tokenizer.json" in str(error.value)
    assert str(folder) in str(error.value)


def test_tokenizer_json_only_folder_gives_same_ids(tiny_checkpoint, tokenizer, tmp_path):
    # transformers converts the SentencePiece model to a tokenizer.json offline; the .model file is then removed.
    converted = LlamaTokenizer.from_pretrained(tiny_checkpoint, local_files_only=True)
    folder = tmp_path / "json-only"
    converted.save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)

    json_tokenizer = LibraTokenizer.from_folder(folder)

    for text in SAMPLE_TEXTS[:4]:
        assert json_tokenizer.encode(text, add_bos=True) == tokenizer.encode(text, add_bos=True)
