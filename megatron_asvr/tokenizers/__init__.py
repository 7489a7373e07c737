"""Text tokenizers and LLaVA's conversation templates."""

from megatron_asvr.tokenizers.templates import (
    IMAGE_PLACEHOLDER,
    IMAGE_TAG,
    ConversationTemplate,
    TemplatedTokens,
    TokenizationMismatch,
    Turn,
    get_template,
    place_image_tags,
    tokenize_with_images,
)
from megatron_asvr.tokenizers.text import (
    HFJsonTokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    load_text_tokenizer,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "IMAGE_TAG",
    "ConversationTemplate",
    "HFJsonTokenizer",
    "SentencePieceTokenizer",
    "TemplatedTokens",
    "TextTokenizer",
    "TokenizationMismatch",
    "Turn",
    "get_template",
    "load_text_tokenizer",
    "place_image_tags",
    "tokenize_with_images",
]
