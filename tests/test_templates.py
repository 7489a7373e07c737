"""Golden tokens: LLaVA's templates with the real Vicuna-1.5 tokenizer, written out by hand.

Every expected id list below is assembled from SentencePiece pieces of
llama2_tokenizer.model (named in the comments) following
docs/method.md#6-conversation-templates-and-sequences; masks mark the answers
and their </s> as supervised (1).
"""

import json
import shutil

import pytest

from tests.support.fixtures import llama2_tokenizer_model
from megatron_asvr.tokenizers.templates import (
    GPT,
    HUMAN,
    IMAGE_PLACEHOLDER,
    TokenizationMismatch,
    Turn,
    get_template,
    place_image_tags,
    tokenize_with_images,
)
from megatron_asvr.tokenizers.text import HFJsonTokenizer, SentencePieceTokenizer, load_text_tokenizer

MODEL = llama2_tokenizer_model()

BOS, EOS, IMG = 1, 2, IMAGE_PLACEHOLDER
SPACE = 29871  # "▁": a trailing space, or the dummy prefix before "\n"
NEWLINE = 13  # "<0x0A>"
# "▁A ▁chat ▁between ▁a ▁curious ▁user ▁and ▁an ▁artificial ▁intelligence ▁assistant . ▁The
#  ▁assistant ▁gives ▁helpful , ▁detailed , ▁and ▁pol ite ▁answers ▁to ▁the ▁user ' s ▁questions ."
SYSTEM = [319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076,
          8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155, 29889]
USER = [3148, 1001, 29901]  # "▁US ER :" (after a space, or after </s> with legacy=True)
USER_AFTER_EOS_NON_LEGACY = [11889, 29901]  # "USER :" (after </s> with legacy=False)
ASSISTANT = [319, 1799, 9047, 13566, 29901]  # "▁A SS IST ANT :"
WHAT_IS_IT = [5618, 338, 372, 29973]  # "What ▁is ▁it ?" (after the newline)
A_CAT = [319, 6635, 29889]  # "▁A ▁cat ."
WHAT_COLOR = [1724, 2927, 338, 372, 29973]  # "▁What ▁color ▁is ▁it ?"
BLACK = [6054, 29889]  # "▁Black ."
HELLO = [15043, 29991, 1128, 526, 366, 29973]  # "▁Hello ! ▁How ▁are ▁you ?"
FINE = [306, 626, 2691, 29892, 3969, 29889]  # "▁I ▁am ▁fine , ▁thanks ."
JOKE = [24948, 592, 263, 2958, 446, 29889]  # "▁Tell ▁me ▁a ▁jo ke ."
CHICKEN = [3750, 1258, 278, 521, 21475, 4891, 278, 6520, 29973]  # "▁Why ▁did ▁the ▁ch icken ▁cross ▁the ▁road ?"
INST = [518, 25580, 29962]  # "▁[ INST ]"
INST_AFTER_EOS_NON_LEGACY = [29961, 25580, 29962]  # "[ INST ]"
END_INST = [518, 29914, 25580, 29962]  # "▁[ / INST ]"
HOW_MANY = [5328, 1784, 29973]  # "How ▁many ?" (after the newline)
TWO_DOGS = [7803, 26361, 29889]  # "▁Two ▁dogs ."


def masked(*parts):
    """(ids, supervised) pairs -> (input ids, loss mask)."""
    ids, mask = [], []
    for part, supervised in parts:
        ids += part
        mask += [int(supervised)] * len(part)
    return ids, mask


def run(template, turns, legacy):
    tokens = get_template(template).tokenize(place_image_tags(turns), SentencePieceTokenizer(MODEL, legacy))
    return tokens.input_ids.tolist(), tokens.loss_mask.tolist()


@pytest.mark.parametrize("legacy", [True, False])
def test_plain_caption(legacy):
    turns = (Turn(HUMAN, "Render a clear and concise summary of the photo.\n<image>"),
             Turn(GPT, "A black cat sleeping on a sofa."))
    # "▁A ▁black ▁cat ▁sleep ing ▁on ▁a ▁so fa . <0x0A>"
    caption = [319, 4628, 6635, 8709, 292, 373, 263, 577, 5444, 29889, NEWLINE]
    assert run("plain", turns, legacy) == masked(([BOS, IMG], False), (caption, True))


@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_image_first_two_rounds(legacy):
    turns = (Turn(HUMAN, "<image>\nWhat is it?"), Turn(GPT, "A cat."),
             Turn(HUMAN, "What color is it?"), Turn(GPT, "Black."))
    second_user = USER if legacy else USER_AFTER_EOS_NON_LEGACY
    expected = masked(
        ([BOS] + SYSTEM + USER + [SPACE, IMG, SPACE, NEWLINE] + WHAT_IS_IT + ASSISTANT, False),
        (A_CAT + [EOS], True),
        (second_user + WHAT_COLOR + ASSISTANT, False),
        (BLACK + [EOS], True),
    )
    assert run("vicuna_v1", turns, legacy) == expected


@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_image_in_middle_moves_to_turn_start(legacy):
    # LLaVA removes the tag, strips, and puts "<image>\n" in front: the double space stays.
    turns = (Turn(HUMAN, "What is in <image> this picture?"), Turn(GPT, "A cat."))
    what_is_in_this_picture = [5618, 338, 297, SPACE, 445, 7623, 29973]  # "What ▁is ▁in ▁ ▁this ▁picture ?"
    expected = masked(
        ([BOS] + SYSTEM + USER + [SPACE, IMG, SPACE, NEWLINE] + what_is_in_this_picture + ASSISTANT, False),
        (A_CAT + [EOS], True),
    )
    assert run("vicuna_v1", turns, legacy) == expected


@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_text_only_two_rounds(legacy):
    turns = (Turn(HUMAN, "Hello! How are you?"), Turn(GPT, "I am fine, thanks."),
             Turn(HUMAN, "Tell me a joke."), Turn(GPT, "Why did the chicken cross the road?"))
    second_user = USER if legacy else USER_AFTER_EOS_NON_LEGACY
    expected = masked(
        ([BOS] + SYSTEM + USER + HELLO + ASSISTANT, False),
        (FINE + [EOS], True),
        (second_user + JOKE + ASSISTANT, False),
        (CHICKEN + [EOS], True),
    )
    assert run("vicuna_v1", turns, legacy) == expected


@pytest.mark.parametrize("legacy", [True, False])
def test_vicuna_image_in_second_round(legacy):
    turns = (Turn(HUMAN, "Hello! How are you?"), Turn(GPT, "I am fine, thanks."),
             Turn(HUMAN, "What is it? <image>"), Turn(GPT, "A cat."))
    second_user = USER if legacy else USER_AFTER_EOS_NON_LEGACY
    expected = masked(
        ([BOS] + SYSTEM + USER + HELLO + ASSISTANT, False),
        (FINE + [EOS], True),
        (second_user + [SPACE, IMG, SPACE, NEWLINE] + WHAT_IS_IT + ASSISTANT, False),
        (A_CAT + [EOS], True),
    )
    assert run("vicuna_v1", turns, legacy) == expected


@pytest.mark.parametrize("legacy", [True, False])
def test_mistral_instruct_image_two_rounds(legacy):
    turns = (Turn(HUMAN, "<image>\nHow many?"), Turn(GPT, "Two dogs."),
             Turn(HUMAN, "Tell me a joke."), Turn(GPT, "Why did the chicken cross the road?"))
    second_inst = INST if legacy else INST_AFTER_EOS_NON_LEGACY
    expected = masked(
        ([BOS] + INST + [SPACE, IMG, SPACE, NEWLINE] + HOW_MANY + END_INST, False),
        (TWO_DOGS + [SPACE, EOS], True),  # " Two dogs. </s>"
        (second_inst + JOKE + END_INST, False),
        (CHICKEN + [SPACE, EOS], True),
    )
    assert run("mistral_instruct", turns, legacy) == expected


def test_vicuna_text_rendering():
    turns = (Turn(HUMAN, "<image>\nWhat is it?"), Turn(GPT, "A cat."), Turn(HUMAN, "Color?"), Turn(GPT, "Black."))
    system = get_template("vicuna_v1").system
    assert get_template("vicuna_v1").render(turns) == (
        f"{system} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>USER: Color? ASSISTANT: Black.</s>"
    )
    assert get_template("mistral_instruct").render(turns) == (
        "[INST] <image>\nWhat is it? [/INST] A cat. </s>[INST] Color? [/INST] Black. </s>"
    )


def test_chunk_after_image_from_the_spec():
    tokenizer = SentencePieceTokenizer(MODEL)
    assert tokenize_with_images("<image>\nWhat is it?", tokenizer) == [BOS, IMG, SPACE, NEWLINE] + WHAT_IS_IT
    assert tokenize_with_images("<image><image>", tokenizer) == [BOS, IMG, IMG]


def test_place_image_tags_keeps_every_tag_of_a_turn():
    turns = (Turn(HUMAN, " Compare <image> and <image> please "), Turn(GPT, "Same."))
    assert place_image_tags(turns) == (Turn(HUMAN, "<image>\n<image>\nCompare  and  please"), Turn(GPT, "Same."))
    assert place_image_tags((Turn(HUMAN, "<image>"),)) == (Turn(HUMAN, "<image>"),)


def test_answer_with_assistant_marker_is_a_mismatch():
    turns = (Turn(HUMAN, "Say it."), Turn(GPT, "Fine. ASSISTANT: again"))
    with pytest.raises(TokenizationMismatch) as info:
        get_template("vicuna_v1").tokenize(turns, SentencePieceTokenizer(MODEL))
    # the round does not split in two: LLaVA stops counting after BOS; the text has
    # BOS + SYSTEM(30) + USER(3) + "▁Say ▁it ."(3) + ASSISTANT(5) + "▁Fine ."(2) + ASSISTANT(5) + "▁again" + </s>
    assert (info.value.counted, info.value.actual) == (1, 51)


def test_non_legacy_config_misread_as_legacy_is_a_mismatch():
    """LLaVA's silent failure: counting rounds with the wrong legacy flag."""
    turns = (Turn(HUMAN, "Hello! How are you?"), Turn(GPT, "I am fine, thanks."),
             Turn(HUMAN, "Tell me a joke."), Turn(GPT, "Why did the chicken cross the road?"))
    class Mislabelled:  # tokenizes like legacy=False, claims legacy=True
        inner = SentencePieceTokenizer(MODEL, legacy=False)
        bos_id, legacy = inner.bos_id, True
        encode = inner.encode

    with pytest.raises(TokenizationMismatch) as info:
        get_template("vicuna_v1").tokenize(turns, Mislabelled())
    # real: BOS + [SYSTEM USER HELLO ASSISTANT FINE </s>] (51) + [USER(2) JOKE ASSISTANT CHICKEN </s>] (23);
    # counted: 1 + round 0 (its BOS + 50) + round 1 (its BOS + "▁US ER :"(3) + 20), no -1 for round 1
    assert (info.value.counted, info.value.actual) == (1 + 51 + 24, 1 + 51 + 23)


def test_plain_refuses_multi_turn_and_text_only():
    plain = get_template("plain")
    two = (Turn(HUMAN, "<image>"), Turn(GPT, "x"))
    assert plain.unsupported(two, 1) is None
    assert "one image" in plain.unsupported(two + two, 1)
    assert "one image" in plain.unsupported(two, 0)
    with pytest.raises(ValueError, match="unknown conversation template 'chatml'"):
        get_template("chatml")


# --- cross-check with transformers 5.x -------------------------------------------------

STRINGS = [
    "Hello world",
    "</s>USER: hi",
    "\nWhat is it?",
    "x</s>",
    "<s>x",
    "",
    "A chat. USER: <b>hi</b>\n\nok",
    "日本語 😀",
    "</s></s>USER",
]
LEADING_SPACE = [" leading", "a</s> b", "two  spaces", "▁under▁score"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_tokenizer")
    shutil.copy(MODEL, directory / "tokenizer.model")
    return directory


def test_legacy_true_matches_transformers_slow_tokenizer():
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    slow = SentencePieceBackend(
        vocab_file=str(MODEL), legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    ours = SentencePieceTokenizer(MODEL, legacy=True)
    for text in STRINGS + LEADING_SPACE:
        assert ours.encode(text) == [BOS] + slow(text, add_special_tokens=False).input_ids, text


@pytest.mark.parametrize("legacy", [True, False])
def test_matches_transformers_llama_tokenizer(hf_dir, legacy):
    """transformers 5's LlamaTokenizer (tokenizers back end) agrees except on leading spaces,

    which the fast Metaspace folds into the dummy prefix while the slow tokenizer LLaVA
    used (transformers 4.3x) keeps them as a separate "▁" (checked by hand below).
    """
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer.from_pretrained(str(hf_dir), legacy=legacy)
    ours = SentencePieceTokenizer(MODEL, legacy=legacy)
    for text in STRINGS:
        assert ours.encode(text) == [BOS] + hf(text, add_special_tokens=False).input_ids, text
    assert ours.encode(" leading") == [BOS, SPACE, 8236]  # "▁ ▁leading"
    assert hf(" leading", add_special_tokens=False).input_ids == [8236]
    assert ours.encode("a</s> b") == [BOS, 263, EOS] + ([SPACE, 289] if legacy else [289])  # "▁a </s> (▁) ▁b"


@pytest.mark.parametrize("legacy", [True, False])
def test_tokenizer_json_matches_and_probes_legacy(hf_dir, tmp_path, legacy):
    from transformers import LlamaTokenizer

    LlamaTokenizer.from_pretrained(str(hf_dir), legacy=legacy).save_pretrained(str(tmp_path))
    tokenizer = HFJsonTokenizer(tmp_path / "tokenizer.json")
    assert tokenizer.legacy is legacy
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (BOS, EOS, 32000)
    turns = (Turn(HUMAN, "<image>\nWhat is it?"), Turn(GPT, "A cat."),
             Turn(HUMAN, "What color is it?"), Turn(GPT, "Black."))
    from_json = get_template("vicuna_v1").tokenize(place_image_tags(turns), tokenizer)
    assert (from_json.input_ids.tolist(), from_json.loss_mask.tolist()) == run("vicuna_v1", turns, legacy)
    assert tokenizer.decode([BOS] + A_CAT + [EOS]) == "A cat."


def test_load_from_checkpoint_directory(tmp_path):
    shutil.copy(MODEL, tmp_path / "tokenizer.model")
    assert load_text_tokenizer(tmp_path).legacy is True  # HF's default without a config
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": False}))
    tokenizer = load_text_tokenizer(tmp_path)
    assert tokenizer.legacy is False
    assert tokenizer.encode("</s>USER") == [BOS, EOS, 11889]
    assert load_text_tokenizer(tmp_path, legacy=True).encode("</s>USER") == [BOS, EOS] + USER[:2]
    assert tokenizer.describe() == {
        "format": "sentencepiece",
        "file": "tokenizer.model",
        "md5": "eeec4125e9c7560836b4873b6f8e3025",
        "legacy": False,
    }
    assert tokenizer.decode([BOS] + WHAT_COLOR + [EOS]) == "What color is it?"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_text_tokenizer(empty)
