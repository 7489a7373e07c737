"""A synthetic LLaVA corpus of any size, mixed like LLaVA-1.5's two stages, for the data path at scale.

    write_scale_corpus(out_dir, records, seed) -> counts     out_dir/corpus.jsonl + out_dir/images/

Records come in the proportions of the ``both`` mixture of ``benchmark.lengths`` (the 558K
captions plus the 665K instruction mix, scaled to ``records``): one caption exchange per image for
the captions, multi-turn conversations for the instruction sets (several questions of one image
merged into one record for the VQA sets, as LLaVA-1.5 merges them), text-only chats for ShareGPT.
A record's text is as long as its draw from ``benchmark.lengths`` (its questions and answers
together), in common English words that are one Llama token each; the draws are capped so that
the conversation template's own tokens still fit ``seq_length``. Images are a small pool of real
files (PNG and JPEG of a few dozen pixels, in the 665K mix's folders) referenced over and over, so
that the disk holds ~1 KB per record. Deterministic from ``seed``; the records are written as a
stream, a chunk at a time.
"""

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image

from megatron_asvr.benchmark.lengths import DISTRIBUTIONS, draw_lengths

MIXTURE = "both"
# component: (image folder or None for text only, exchanges (fewest, most), share of the text in questions)
LAYOUT: Dict[str, Tuple[Optional[str], Tuple[int, int], float]] = {
    "llava_558k_blip_captions": ("llava_pretrain", (1, 1), 0.3),
    "llava_instruct_158k": ("coco", (1, 5), 0.2),
    "sharegpt_40k": (None, (1, 4), 0.3),
    "vqav2_83k": ("coco", (2, 8), 0.7),
    "gqa_72k": ("gqa", (2, 8), 0.7),
    "okvqa_9k": ("coco", (1, 1), 0.7),
    "ocrvqa_80k": ("ocr_vqa", (2, 6), 0.7),
    "a_okvqa_66k": ("coco", (1, 1), 0.7),
    "textcaps_22k": ("textvqa", (1, 1), 0.3),
    "refcoco_48k": ("coco", (2, 6), 0.5),
    "vg_86k": ("vg", (2, 6), 0.5),
}
# Words the Llama-2 tokenizer keeps whole (one token each, with their leading space).
WORDS = tuple("""the a of and to in is on with that for it as was at by an be this are from or has have
man woman dog cat car red blue green white black small large table street two three people person sitting
standing next front left right top image picture photo water tree building sign room food plate window door
bus train sky grass road field group yes no what where how many color many""".split())
TEMPLATE_MARGIN = 128  # positions the template takes besides the text: system prompt, role names per turn
CHUNK = 10_000  # records drawn and written at a time


def _write_image_pool(images: Path, folders, per_folder: int, rng: np.random.Generator) -> Dict[str, list]:
    """``per_folder`` small PNG / JPEG files in each folder; their paths relative to ``images``."""
    pool = {}
    for folder in folders:
        (images / folder).mkdir(parents=True, exist_ok=True)
        pool[folder] = []
        for k in range(per_folder):
            width, height = (int(v) for v in rng.integers(24, 97, 2))
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            name = f"{folder}/{k:04d}.{'png' if k % 2 else 'jpg'}"
            Image.fromarray(pixels, "RGB").save(images / name)
            pool[folder].append(name)
    return pool


def _split(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` words in ``parts`` pieces of at least one word each [parts]."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
    return np.diff(np.concatenate([[0], cuts, [total]])).astype(np.int64)


def _conversation(words: int, component: str, image: Optional[str], rng: np.random.Generator) -> list:
    """Turns of ``words`` words in all: exchanges of a question then an answer."""
    _, (fewest, most), question_share = LAYOUT[component]
    exchanges = int(min(rng.integers(fewest, most + 1), max(words // 4, 1)))
    turns = []
    for share in _split(max(words, 2 * exchanges), exchanges, rng):
        question = int(min(max(round(share * question_share), 1), share - 1)) if share > 1 else 1
        answer = max(int(share) - question, 1)
        picks = rng.integers(0, len(WORDS), question + answer)
        turns += [" ".join(WORDS[i] for i in picks[:question]), " ".join(WORDS[i] for i in picks[question:])]
    if image:
        turns[0] = "<image>\n" + turns[0]
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(turns)]


def write_scale_corpus(out_dir: Path, records: int, seed: int = 0, pool_images: int = 256,
                       seq_length: int = 2048, image_positions: int = 729) -> Dict[str, int]:
    """``out_dir/corpus.jsonl`` (``records`` records) and the image pool ``out_dir/images``; returns
    the records per component."""
    out_dir = Path(out_dir)
    names = list(DISTRIBUTIONS[MIXTURE])
    folders = sorted({LAYOUT[n][0] for n in names if LAYOUT[n][0]})
    pool = _write_image_pool(out_dir / "images", folders, max(pool_images // len(folders), 1),
                             np.random.default_rng([seed, 0]))
    picks, text_tokens, has_image = draw_lengths(MIXTURE, records, seq_length - TEMPLATE_MARGIN, image_positions,
                                                 [seed, 1])  # [records] each
    counts = dict.fromkeys(names, 0)
    with open(out_dir / "corpus.jsonl", "w", encoding="utf-8") as out:
        for first in range(0, records, CHUNK):
            rng = np.random.default_rng([seed, 2, first])
            lines = []
            for i in range(first, min(first + CHUNK, records)):
                component = names[picks[i]]
                counts[component] += 1
                record = {"id": f"{component}-{i:08d}"}
                folder = LAYOUT[component][0]
                if has_image[i]:
                    images = pool[folder]
                    record["image"] = images[int(rng.integers(len(images)))]
                record["conversations"] = _conversation(int(text_tokens[i]), component, record.get("image"), rng)
                lines.append(json.dumps(record))
            out.write("\n".join(lines) + "\n")
    return counts
