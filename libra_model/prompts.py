"""Libra conversation templates, prompt tokenisation around `<image>`, and stop-string handling.

`libra_v1` is the template of libra-v1.0-7b and the generic default, and `libra_llama_3` is
the template of libra-v1.0-3b. The prompt is tokenised in pieces around `<image>`, with a single BOS
in front and the placeholder id IMAGE_TOKEN_INDEX (-200) between the pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from libra_model.modeling_libra import IMAGE_TOKEN_INDEX
from libra_model.tokenization_libra import LibraTokenizer

IMAGE_PLACEHOLDER = "<image>"
LIBRA_SYSTEM_TEXT = (
    "The assistant specialized in comparing Chest X-ray images, identifying differences, and noting temporal changes."
)
# NOTE: these generic LLaVA system sentences are not verified against the released libra-v1.0-3b template, so the
# 3b prompt may differ from the release in this wording.
LLAVA_GENERIC_SYSTEM_TEXT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
DEFAULT_QUESTION = "Provide a detailed description of the findings in the radiology image."
LLAMA_3_MODEL_NAME_MARKER = "libra-v1.0-3b"


@dataclass(frozen=True)
class ConversationTemplate:
    """One Libra conversation format for a single question.

    Attributes
    ----------
    name : str
        Template name, the `conv_mode` of the release ("libra_v1" or "libra_llama_3").
    stop_string : str
        Text that ends the assistant turn. Generation stops when it appears.
    """

    name: str
    stop_string: str

    def render(self, question: str) -> str:
        """Return the prompt text for one question, with `<image>` before the question."""
        message = f"{IMAGE_PLACEHOLDER}\n{question}"
        if self.name == "libra_v1":
            return f"{LIBRA_SYSTEM_TEXT} USER: {message} ASSISTANT:"
        if self.name == "libra_llama_3":
            # The release joins the two system texts without a space and upper-cases the assistant role.
            prompt = (
                "<|begin_of_text|>"
                f"<|start_header_id|>system<|end_header_id|>\n\n{LLAVA_GENERIC_SYSTEM_TEXT}{LIBRA_SYSTEM_TEXT}<|eot_id|>"
                f"<|start_header_id|>user<|end_header_id|>\n\n{message}<|eot_id|>\n"
                "<|start_header_id|>ASSISTANT<|end_header_id|>\n\n"
            )
            return prompt.strip()
        raise ValueError(f"conversation template {self.name!r} has no renderer: use libra_v1 or libra_llama_3.")


TEMPLATES = {
    "libra_v1": ConversationTemplate(name="libra_v1", stop_string="</s>"),
    "libra_llama_3": ConversationTemplate(name="libra_llama_3", stop_string="<|eot_id|>"),
}


def select_conv_mode(model_name: str) -> str:
    """Choose the template from the checkpoint name: `libra_llama_3` for libra-v1.0-3b, else `libra_v1`.

    The released command line defaults to libra_v1 for every model, which overrides this choice.
    """
    if LLAMA_3_MODEL_NAME_MARKER in model_name.lower():
        return "libra_llama_3"
    return "libra_v1"


def get_template(conv_mode: str) -> ConversationTemplate:
    """Return the template named `conv_mode`.

    Raises
    ------
    ValueError
        If no template has that name.
    """
    try:
        return TEMPLATES[conv_mode]
    except KeyError as exc:
        raise ValueError(
            f"conversation mode {conv_mode!r} is unknown: use one of {', '.join(sorted(TEMPLATES))}."
        ) from exc


def build_question(indication: str | None = None, question: str = DEFAULT_QUESTION) -> str:
    """Return the question text, with the clinical indication appended when given."""
    if indication and indication.strip():
        return f"{question} Clinical indication: {indication.strip()}"
    return question


def tokenize_prompt(prompt: str, tokenizer: LibraTokenizer) -> list[int]:
    """Tokenise a prompt in pieces around `<image>` and join them with IMAGE_TOKEN_INDEX.

    Each piece is tokenised with the BOS the tokenizer adds. Only the first piece keeps that BOS,
    so the result has one BOS at the front and one placeholder per `<image>`.

    Parameters
    ----------
    prompt : str
        Rendered prompt text.
    tokenizer : LibraTokenizer
        Tokenizer of the checkpoint.

    Returns
    -------
    list of int
        Token ids with IMAGE_TOKEN_INDEX where `<image>` was.
    """
    pieces = [tokenizer.encode(piece, add_bos=True) for piece in prompt.split(IMAGE_PLACEHOLDER)]
    bos_token_id = tokenizer.bos_token_id
    ids: list[int] = []
    for index, piece_ids in enumerate(pieces):
        if index > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        if index > 0 and piece_ids and piece_ids[0] == bos_token_id:
            piece_ids = piece_ids[1:]
        ids.extend(piece_ids)
    return ids


def clean_generated_text(text: str, stop_string: str) -> str:
    """Strip the decoded text, remove one trailing stop string and strip again, as the release does."""
    text = text.strip()
    if text.endswith(stop_string):
        text = text[: -len(stop_string)]
    return text.strip()


class StopStringCriteria(StoppingCriteria):
    """Stop generation when the new tokens end with the stop string.

    A sequence stops when its last ids equal the stop string's ids, or when the decoded new
    tokens end with the stop string text, as in the release. Only tokens after the prompt are
    checked.

    Parameters
    ----------
    stop_string : str
        The template's stop string.
    tokenizer : LibraTokenizer
        Tokenizer used to encode the stop string and decode the new tokens.
    prompt_length : int
        Number of ids in the `input_ids` that generation receives before the first new token
        (0 when generation starts from embeddings).
    """

    def __init__(self, stop_string: str, tokenizer: LibraTokenizer, prompt_length: int = 0) -> None:
        self.stop_string = stop_string
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        stop_id = tokenizer.token_to_id(stop_string)
        self.stop_ids = [stop_id] if stop_id is not None else tokenizer.encode(stop_string, add_bos=False)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        """Return one flag per sequence, True where that sequence is finished."""
        finished = []
        for sequence in input_ids:
            new_ids = sequence[self.prompt_length :].tolist()
            if new_ids[-len(self.stop_ids) :] == self.stop_ids:
                finished.append(True)
                continue
            # The stop strings are ASCII, so they span at most one token per character.
            tail_text = self.tokenizer.decode(new_ids[-(len(self.stop_string) + 1) :], skip_special_tokens=False)
            finished.append(tail_text.endswith(self.stop_string))
        return torch.tensor(finished, dtype=torch.bool, device=input_ids.device)


__all__ = [
    "DEFAULT_QUESTION",
    "IMAGE_PLACEHOLDER",
    "TEMPLATES",
    "ConversationTemplate",
    "StopStringCriteria",
    "build_question",
    "clean_generated_text",
    "get_template",
    "select_conv_mode",
    "tokenize_prompt",
]
