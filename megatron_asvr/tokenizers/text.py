"""Text tokenizers with HF ``tokenizer(text).input_ids`` semantics.

Two back ends: a SentencePiece model file, tokenized exactly as the slow HF
``LlamaTokenizer`` of transformers 4.3x (the one LLaVA uses, ``use_fast=False``)
for both values of its ``legacy`` flag, and an HF ``tokenizers`` tokenizer.json,
tokenized as that file says.
"""

import hashlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

import sentencepiece as spm

SPIECE_UNDERLINE = "\u2581"  # "▁", SentencePiece's word-boundary piece


class TextTokenizer(ABC):
    """What the conversation templates need from a text tokenizer.

    ``legacy`` is HF's flag: True when text right after a special token gets the
    dummy-prefix piece like text at the start of a string (``</s>USER`` ->
    ``</s> ▁US ER``), False when it does not (``</s> USER``).
    """

    bos_id: int
    eos_id: int
    legacy: bool

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, BOS first; special tokens in ``text`` become their ids."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids."""

    @abstractmethod
    def describe(self) -> dict:
        """Identity of this tokenizer (format, file, md5, legacy) for manifests and reports."""


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class SentencePieceTokenizer(TextTokenizer):
    """A SentencePiece model tokenized like HF's slow ``LlamaTokenizer`` (transformers 4.3x).

    Special tokens (``<s>``, ``</s>``, ``<unk>``) are split out of the text first.
    ``legacy=True``: every remaining piece of text is encoded on its own with the
    dummy prefix. ``legacy=False``: one ``▁`` is put in front of the whole text and
    the model runs without its dummy prefix, so text after a special token gets none.
    A leading space is kept as its own ``▁`` piece in both settings (unlike the
    fast tokenizers, which fold it into the dummy prefix).
    """

    def __init__(self, model_path: str | Path, legacy: bool = True):
        self.model_path = Path(model_path)
        self.legacy = legacy
        proto = self.model_path.read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        self._special_ids = {
            self._sp.id_to_piece(i): i for i in (self.bos_id, self.eos_id, self._sp.unk_id()) if i >= 0
        }
        pattern = "|".join(re.escape(t) for t in sorted(self._special_ids, key=len, reverse=True))
        self._special_split = re.compile(f"({pattern})")
        self._underline_id = self._sp.piece_to_id(SPIECE_UNDERLINE)
        if not legacy:
            self._sp_no_prefix = spm.SentencePieceProcessor(model_proto=_without_dummy_prefix(proto))
            self._unk_text = self._sp.id_to_piece(self._sp.unk_id())
            self._unk_length = len(self._sp_no_prefix.encode(self._unk_text))

    def encode(self, text: str) -> list[int]:
        if self.legacy:
            return [self.bos_id] + self._encode_chunks(text, self._sp.encode)
        if not text:
            return [self.bos_id]
        text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        ids = self._encode_chunks(text, self._encode_without_prefix)
        if len(ids) > 1 and ids[0] == self._underline_id and ids[1] in self._special_ids.values():
            ids = ids[1:]
        return [self.bos_id] + ids

    def _encode_chunks(self, text: str, encode_chunk) -> list[int]:
        ids = []
        for chunk in self._special_split.split(text):
            if chunk in self._special_ids:
                ids.append(self._special_ids[chunk])
            elif chunk:
                ids.extend(encode_chunk(chunk))
        return ids

    def _encode_without_prefix(self, chunk: str) -> list[int]:
        """HF's trick: a leading space survives only behind ``<unk>``, which is then cut off."""
        if chunk.startswith((SPIECE_UNDERLINE, " ")):
            return self._sp_no_prefix.encode(self._unk_text + chunk)[self._unk_length :]
        return self._sp_no_prefix.encode(chunk)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([i for i in ids if i not in self._special_ids.values()])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def describe(self) -> dict:
        return {
            "format": "sentencepiece",
            "file": self.model_path.name,
            "md5": _md5(self.model_path),
            "legacy": self.legacy,
        }


def _without_dummy_prefix(proto: bytes) -> bytes:
    """The serialized model with ``add_dummy_prefix`` off (as HF does for legacy=False)."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto.FromString(proto)
    model.normalizer_spec.add_dummy_prefix = False
    return model.SerializeToString()


class HFJsonTokenizer(TextTokenizer):
    """An HF ``tokenizers`` tokenizer.json; BOS is put in front by this class.

    ``legacy`` is read off the tokenizer's behaviour (does text after ``</s>`` get
    the same ids as text at the start of a string?), so LLaVA's round counting
    agrees with what this file really produces.
    """

    def __init__(self, json_path: str | Path, bos_token: str = "<s>", eos_token: str = "</s>"):
        from tokenizers import Tokenizer

        self.json_path = Path(json_path)
        self._tok = Tokenizer.from_file(str(self.json_path))
        self.bos_id = self._token_id(bos_token)
        self.eos_id = self._token_id(eos_token)
        probe = "USER"
        alone = self._tok.encode(probe, add_special_tokens=False).ids
        after_eos = self._tok.encode(eos_token + probe, add_special_tokens=False).ids
        self.legacy = after_eos[1:] == alone

    def _token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.json_path}: special token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return [self.bos_id] + self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def describe(self) -> dict:
        return {
            "format": "tokenizers_json",
            "file": self.json_path.name,
            "md5": _md5(self.json_path),
            "legacy": self.legacy,
        }


def _token_content(value) -> str | None:
    """A tokenizer_config.json token entry: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def load_text_tokenizer(path: str | Path, legacy: bool | None = None) -> TextTokenizer:
    """The tokenizer at ``path``: a ``.model`` file, a tokenizer ``.json``, or a checkpoint directory.

    In a directory, ``tokenizer.model`` is preferred (LLaVA loads the slow tokenizer)
    over ``tokenizer.json``; ``legacy``, ``bos_token`` and ``eos_token`` come from its
    ``tokenizer_config.json``. An explicit ``legacy`` overrides the config; HF's
    default when neither gives one is ``True``. ``legacy`` cannot be set for a
    tokenizer.json: there it is a property of the file.
    """
    path = Path(path)
    config = {}
    if path.is_dir():
        config_path = path / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        if (path / "tokenizer.model").is_file():
            model_file = path / "tokenizer.model"
        elif (path / "tokenizer.json").is_file():
            model_file = path / "tokenizer.json"
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json in this directory")
    elif path.is_file():
        model_file = path
    else:
        raise FileNotFoundError(f"{path}: tokenizer not found")

    if model_file.suffix == ".json":
        if legacy is not None:
            raise ValueError(
                f"{model_file}: legacy cannot be set for a tokenizer.json; its pre-tokenizer decides it"
            )
        tokens = {
            key: _token_content(config[key]) for key in ("bos_token", "eos_token") if config.get(key)
        }
        return HFJsonTokenizer(model_file, **tokens)
    if legacy is None:
        legacy = config.get("legacy")
    return SentencePieceTokenizer(model_file, legacy=True if legacy is None else bool(legacy))
