"""Test data that lives outside the repository (../shared/data, see its README)."""

import hashlib
import os
from pathlib import Path

LLAMA2_TOKENIZER_MD5 = "eeec4125e9c7560836b4873b6f8e3025"  # Vicuna-1.5's tokenizer.model


def shared_data_dir() -> Path:
    """$MEGATRON_ASVR_SHARED_DATA, else ../shared/data next to the repository."""
    override = os.environ.get("MEGATRON_ASVR_SHARED_DATA")
    return Path(override) if override else Path(__file__).resolve().parents[3] / "shared" / "data"


def llama2_tokenizer_model() -> Path:
    """The real Llama-2 / Vicuna-1.5 SentencePiece model, checked by md5."""
    path = shared_data_dir() / "llama2_tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"test data {path} is missing: set MEGATRON_ASVR_SHARED_DATA to the shared data folder")
    digest = hashlib.md5(path.read_bytes()).hexdigest()
    if digest != LLAMA2_TOKENIZER_MD5:
        raise ValueError(f"{path} has md5 {digest}, expected {LLAMA2_TOKENIZER_MD5}")
    return path
