"""Tokenizer and processor files of an HF LLaVA directory.

The text tokenizer's own files are copied (``tokenizer.model`` and / or
``tokenizer.json``, ``tokenizer_config.json``, ...); llava-hf's ``<image>`` and
``<pad>`` tokens (``convert.hf_vocab``) are added to ``tokenizer_config.json``'s
``added_tokens_decoder`` (and to ``tokenizer.json``'s ``added_tokens``) unless
the tokenizer already has them. A SentencePiece-only tokenizer also gets a
``tokenizer.json`` (transformers 5 reads LLaVA tokenizers from that file
alone; without it, it silently builds a different tokenizer). The processor files let
``AutoProcessor.from_pretrained`` expand ``<image>`` to the image's patches and
preprocess images as the encoder expects (SigLIP / SigLIP2: a square resize with the
encoder's ``vision.resample``, bicubic for SigLIP, bilinear for SigLIP2, mean = std = 0.5;
CLIP: OpenAI CLIP's resize, crop and statistics).
"""

import json
import shutil
from pathlib import Path
from typing import Dict, List

from megatron_asvr.config import ConfigError, VisionConfig
from megatron_asvr.convert.hf_config import PROCESSOR_CONFIG, RESAMPLE_CODES, SELECT_STRATEGY
from megatron_asvr.convert.hf_vocab import IMAGE_TOKEN, PAD_TOKEN, HFVocab
from megatron_asvr.tokenizers import load_text_tokenizer

TEXT_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json")
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def text_tokenizer_files(source) -> List[Path]:
    """The text-tokenizer files of directory ``source`` (a tokenizer.model / .json file: just it)."""
    source = Path(source)
    if source.is_file():
        return [source]
    files = [source / name for name in TEXT_TOKENIZER_FILES if (source / name).is_file()]
    if not any(f.name in ("tokenizer.model", "tokenizer.json") for f in files):
        raise FileNotFoundError(f"{source}: no tokenizer.model or tokenizer.json")
    return files


def copy_tokenizer(source, destination) -> List[str]:
    """Copy the tokenizer files of ``source`` into ``destination``; return their names."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    files = text_tokenizer_files(source)
    for file in files:
        shutil.copyfile(file, destination / file.name)
    return [f.name for f in files]


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _tokens_to_add(directory: Path, config: dict, vocab: HFVocab) -> Dict[int, str]:
    """{id: content} of llava-hf's tokens the tokenizer lacks; an id taken by another token is an error."""
    added = {int(i): entry["content"] for i, entry in config.get("added_tokens_decoder", {}).items()}
    size = max([load_text_tokenizer(directory).vocab_size, *[i + 1 for i in added]])
    wanted = {vocab.image_token_index: IMAGE_TOKEN}
    if vocab.pad_token_id is not None:
        wanted[vocab.pad_token_id] = PAD_TOKEN
    missing = {}
    for token_id, content in sorted(wanted.items()):
        if token_id in added:
            if added[token_id] != content:
                raise ConfigError(f"{directory}: token {token_id} is {added[token_id]!r}, llava-hf needs {content!r}")
        elif token_id != size + len(missing):
            raise ConfigError(
                f"{directory}: the tokenizer has {size} tokens, so {content} cannot get id {token_id}: "
                f"give the LM vocabulary of the tokenizer (llm.vocab_size={size})"
            )
        else:
            missing[token_id] = content
    return missing


def write_tokenizer(source, directory, vocab: HFVocab, max_length: int) -> List[str]:
    """Copy the tokenizer of ``source`` into ``directory`` with llava-hf's tokens; return the file names."""
    directory = Path(directory)
    names = copy_tokenizer(source, directory)
    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else {"tokenizer_class": "LlamaTokenizer"}
    missing = _tokens_to_add(directory, config, vocab)
    decoder = config.setdefault("added_tokens_decoder", {})
    for token_id, content in missing.items():
        decoder[str(token_id)] = _added_token(content)
    if vocab.pad_token_id is not None:
        config["pad_token"] = PAD_TOKEN
    config.setdefault("model_max_length", max_length)
    _write_json(config_path, config)
    json_path = directory / "tokenizer.json"
    if not json_path.is_file():
        _write_tokenizer_json(directory)
    elif missing:
        tokenizer = _read_json(json_path)
        tokenizer.setdefault("added_tokens", []).extend(
            {"id": token_id, **_added_token(content)} for token_id, content in missing.items()
        )
        _write_json(json_path, tokenizer)
    return sorted(set(names) | {config_path.name, json_path.name})


def _write_tokenizer_json(directory: Path) -> None:
    """tokenizer.json of a SentencePiece tokenizer (``legacy`` and added tokens as its config says).

    transformers 5 loads llava's tokenizer from tokenizer.json only (``TokenizersBackend``);
    its own conversion of the SentencePiece model is the reference for that file.
    """
    try:
        from transformers import LlamaTokenizer
    except ImportError as err:
        raise ConfigError(
            f"{directory}: writing tokenizer.json (which transformers 5 needs for LLaVA) needs transformers: "
            f"pip install transformers, or give a tokenizer that has a tokenizer.json"
        ) from err
    LlamaTokenizer.from_pretrained(str(directory)).backend_tokenizer.save(str(directory / "tokenizer.json"))


def write_processor(directory, vision: VisionConfig) -> None:
    """processor_config.json (LlavaProcessor) and preprocessor_config.json (the image processor)."""
    directory = Path(directory)
    size = vision.image_size
    if vision.family == "siglip":
        image = {
            "image_processor_type": "SiglipImageProcessor",
            "do_resize": True, "size": {"height": size, "width": size}, "resample": RESAMPLE_CODES[vision.resample],
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "do_convert_rgb": True,
        }
    else:
        image = {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True, "size": {"shortest_edge": size}, "resample": RESAMPLE_CODES[vision.resample],
            "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD,
            "do_convert_rgb": True,
        }
    image["processor_class"] = "LlavaProcessor"
    _write_json(directory / PROCESSOR_CONFIG, image)
    _write_json(directory / "processor_config.json", {
        "processor_class": "LlavaProcessor",
        "patch_size": vision.patch_size,
        "vision_feature_select_strategy": SELECT_STRATEGY[vision.family],
        "image_token": IMAGE_TOKEN,
        "num_additional_image_tokens": 0 if vision.family == "siglip" else 1,
    })
