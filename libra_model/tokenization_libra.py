"""Tokenizer of a Libra checkpoint folder, with the ids of the released slow LLaMA tokenizer.

A folder with `tokenizer.model` is read with sentencepiece itself. transformers 5.25 has no slow
LlamaTokenizer any more: its LlamaTokenizer converts the model to a tokenizers BPE, and its
SentencePieceBackend decodes byte-fallback pieces such as `<0x0A>` literally. Calling
sentencepiece directly gives the released ids by construction. A folder with only
`tokenizer.json` (the libra-v1.0-3b release) is read with the tokenizers library.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece
from tokenizers import Tokenizer

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ADDED_TOKENS_FILE = "added_tokens.json"


class TokenizerFilesNotFoundError(FileNotFoundError):
    """A checkpoint folder has neither tokenizer.model nor tokenizer.json."""


class LibraTokenizer:
    """Encode prompts and decode generated ids for a Libra checkpoint.

    Use `LibraTokenizer.from_folder`. The special tokens (`<unk>`, `<s>`, `</s>`) and the
    tokens added on top of the SentencePiece vocabulary (from `added_tokens.json` or the
    `added_tokens_decoder` of `tokenizer_config.json`) are split out of the text before
    SentencePiece encodes it, as the slow tokenizer does.

    Attributes
    ----------
    bos_token_id, eos_token_id : int or None
        Ids of the BOS and EOS tokens.
    eos_token : str or None
        Text of the EOS token, `</s>` for LLaMA.
    """

    def __init__(
        self,
        *,
        sentencepiece_model: sentencepiece.SentencePieceProcessor | None = None,
        fast_tokenizer: Tokenizer | None = None,
        added_tokens: dict[str, int] | None = None,
        special_token_ids: set[int] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        if (sentencepiece_model is None) == (fast_tokenizer is None):
            raise ValueError("LibraTokenizer needs exactly one of sentencepiece_model and fast_tokenizer.")
        self._sentencepiece = sentencepiece_model
        self._fast = fast_tokenizer
        self._added_tokens = dict(added_tokens or {})
        self._added_token_texts = {token_id: text for text, token_id in self._added_tokens.items()}
        self._special_token_ids = set(special_token_ids or ())
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        if self._added_tokens:
            alternatives = sorted(self._added_tokens, key=len, reverse=True)
            self._added_token_pattern = re.compile("(" + "|".join(re.escape(text) for text in alternatives) + ")")
        else:
            self._added_token_pattern = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> LibraTokenizer:
        """Load the tokenizer of a checkpoint folder.

        Parameters
        ----------
        folder : str or pathlib.Path
            Folder with `tokenizer.model` (preferred) or `tokenizer.json`, and optionally
            `tokenizer_config.json` and `added_tokens.json`.

        Returns
        -------
        LibraTokenizer

        Raises
        ------
        TokenizerFilesNotFoundError
            If the folder has neither tokenizer.model nor tokenizer.json.
        """
        folder = Path(folder)
        tokenizer_config = _read_json(folder / TOKENIZER_CONFIG_FILE)
        bos_token = _token_text(tokenizer_config.get("bos_token"))
        eos_token = _token_text(tokenizer_config.get("eos_token"))

        if (folder / SENTENCEPIECE_FILE).is_file():
            model = sentencepiece.SentencePieceProcessor(model_file=str(folder / SENTENCEPIECE_FILE))
            added_tokens = {
                text: token_id
                for text, token_id in _read_json(folder / ADDED_TOKENS_FILE).items()
                if token_id >= model.get_piece_size()
            }
            special_ids = {model.bos_id(), model.eos_id(), model.unk_id(), model.pad_id()} - {-1}
            # The slow tokenizer matches the text of its special tokens too, so "</s>" in a prompt becomes the EOS id.
            for token_id in special_ids:
                added_tokens.setdefault(model.id_to_piece(token_id), token_id)
            for token_id, entry in tokenizer_config.get("added_tokens_decoder", {}).items():
                token_id = int(token_id)
                if token_id >= model.get_piece_size():
                    added_tokens[entry["content"]] = token_id
                if entry.get("special"):
                    special_ids.add(token_id)
            return cls(
                sentencepiece_model=model,
                added_tokens=added_tokens,
                special_token_ids=special_ids,
                bos_token=bos_token or model.id_to_piece(model.bos_id()),
                eos_token=eos_token or model.id_to_piece(model.eos_id()),
            )

        if (folder / TOKENIZER_JSON_FILE).is_file():
            fast_tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_JSON_FILE))
            return cls(fast_tokenizer=fast_tokenizer, bos_token=bos_token, eos_token=eos_token)

        raise TokenizerFilesNotFoundError(
            f"{SENTENCEPIECE_FILE} and {TOKENIZER_JSON_FILE} are both missing from {folder}: copy the "
            "checkpoint's tokenizer.model (or tokenizer.json) into that folder."
        )

    def token_to_id(self, token: str) -> int | None:
        """Return the id of one token, or None when it is not in the vocabulary."""
        if token in self._added_tokens:
            return self._added_tokens[token]
        if self._fast is not None:
            return self._fast.token_to_id(token)
        token_id = self._sentencepiece.piece_to_id(token)
        if token_id == self._sentencepiece.unk_id() and token != self._sentencepiece.id_to_piece(token_id):
            return None
        return token_id

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Encode text into ids, with one BOS in front when `add_bos` is set.

        For tokenizer.json folders, `add_bos` switches the tokenizer's post-processor, which is
        where those tokenizers add their BOS.
        """
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=add_bos).ids

        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        pieces = self._added_token_pattern.split(text) if self._added_token_pattern else [text]
        for piece in pieces:
            if not piece:
                continue
            if piece in self._added_tokens:
                ids.append(self._added_tokens[piece])
            else:
                # NOTE: text after an added token gets SentencePiece's dummy-prefix space, as in the slow
                # tokenizer's legacy mode. The Libra prompts contain no added tokens, so their ids are unaffected.
                ids.extend(self._sentencepiece.encode(piece))
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        """Decode ids into text, dropping BOS, EOS and other special tokens when asked."""
        ids = [int(token_id) for token_id in ids]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=skip_special_tokens)

        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            is_special = token_id in self._special_token_ids
            if skip_special_tokens and is_special:
                continue
            if token_id in self._added_token_texts or is_special:
                # SentencePiece decodes control tokens such as <s> to nothing, so their text is added here.
                parts.append(self._sentencepiece.decode(run))
                run = []
                parts.append(self._added_token_texts.get(token_id) or self._sentencepiece.id_to_piece(token_id))
            else:
                run.append(token_id)
        parts.append(self._sentencepiece.decode(run))
        return "".join(parts)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def _token_text(value: str | dict | None) -> str | None:
    """Return the text of a special token entry, which tokenizer_config.json stores as a string or a dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


__all__ = ["LibraTokenizer", "TokenizerFilesNotFoundError"]
