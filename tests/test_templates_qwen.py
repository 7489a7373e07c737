"""Golden tokens of the ``qwen`` (ChatML) template on a tiny Qwen-style BPE tokenizer.json built here.

The tokenizer is Qwen2's design on a small vocabulary: the same pre-tokenizer (Qwen's split regex,
then byte-level), a BPE model whose words are whole tokens (``ignore_merges``), Qwen's special
tokens after the BPE vocabulary, and a tokenizer_config.json with ``"bos_token": null``. The
expected ids are written out word by word from the table ``WORDS`` below (``Ġ`` is a leading
space, ``Ċ`` a newline, as byte-level BPE spells them).
"""

import json

import pytest

from tests.support.fixtures import llama2_tokenizer_model
from megatron_asvr.tokenizers.templates import GPT, HUMAN, IMAGE_PLACEHOLDER, Turn, get_template, place_image_tags
from megatron_asvr.tokenizers.text import SentencePieceTokenizer, load_text_tokenizer

# Qwen2's pre-tokenizer regex (its tokenizer.json, pre_tokenizer.pretokenizers[0].pattern.Regex)
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
WORDS = ["Ċ", ".", "?", "system", "user", "assistant", "You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", "What",
         "Ġis", "Ġit", "A", "Ġcat", "Ġcolor", "Black", "Where", "On", "Ġmat"]
ID = {word: i for i, word in enumerate(WORDS)}
NL = ID["Ċ"]
IMG = IMAGE_PLACEHOLDER


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = dict(ID)
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    directory = tmp_path_factory.mktemp("qwen_tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return directory


def test_three_rounds_with_an_image_golden_ids_and_mask(qwen_dir):
    tokenizer = load_text_tokenizer(qwen_dir)
    from tokenizers import pre_tokenizers

    bpe = len(set(WORDS) | set(pre_tokenizers.ByteLevel.alphabet()))
    im_start, im_end = bpe + 1, bpe + 2  # after <|endoftext|>, as in Qwen's vocabulary
    assert (tokenizer.bos_id, tokenizer.eos_id) == (None, im_end)
    assert tokenizer.encode("You are") == [ID["You"], ID["Ġare"]]  # no BOS

    turns = place_image_tags((
        Turn(HUMAN, "What is it?\n<image>"), Turn(GPT, "A cat."),
        Turn(HUMAN, "What color is it?"), Turn(GPT, "Black."),
        Turn(HUMAN, "Where is it?"), Turn(GPT, "On a mat."),
    ))
    template = get_template("qwen")
    template.check_tokenizer(tokenizer)
    assert template.render(turns) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nWhat color is it?<|im_end|>\n<|im_start|>assistant\nBlack.<|im_end|>\n"
        "<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\nOn a mat.<|im_end|>\n")

    def user(*words):
        return [im_start, ID["user"], NL, *words, im_end, NL, im_start, ID["assistant"], NL]

    what_is_it = [ID["What"], ID["Ġis"], ID["Ġit"], ID["?"]]
    parts = [
        ([im_start, ID["system"], NL, ID["You"], ID["Ġare"], ID["Ġa"], ID["Ġhelpful"], ID["Ġassistant"], ID["."],
          im_end, NL], 0),
        (user(IMG, NL, *what_is_it), 0),
        ([ID["A"], ID["Ġcat"], ID["."], im_end], 1), ([NL], 0),
        (user(ID["What"], ID["Ġcolor"], ID["Ġis"], ID["Ġit"], ID["?"]), 0),
        ([ID["Black"], ID["."], im_end], 1), ([NL], 0),
        (user(ID["Where"], ID["Ġis"], ID["Ġit"], ID["?"]), 0),
        ([ID["On"], ID["Ġa"], ID["Ġmat"], ID["."], im_end], 1), ([NL], 0),
    ]
    expected_ids = [i for part, _ in parts for i in part]
    expected_mask = [flag for part, flag in parts for _ in part]
    result = template.tokenize(turns, tokenizer)
    assert result.input_ids.tolist() == expected_ids
    assert result.loss_mask.tolist() == expected_mask
    assert sum(expected_mask) == 3 + 1 + 2 + 1 + 4 + 1  # the three answers and their <|im_end|>


def test_a_template_that_does_not_fit_the_tokenizer_is_refused_naming_both(qwen_dir):
    qwen = load_text_tokenizer(qwen_dir)
    with pytest.raises(ValueError) as info:
        get_template("vicuna_v1").check_tokenizer(qwen)
    assert str(info.value) == ("template 'vicuna_v1' does not fit the tokenizer tokenizer.json (tokenizers_json): "
                               "it puts no BOS in front, and this template's round counting needs one")
    llama = SentencePieceTokenizer(llama2_tokenizer_model())
    with pytest.raises(ValueError) as info:
        get_template("qwen").check_tokenizer(llama)
    assert str(info.value) == ("template 'qwen' does not fit the tokenizer llama2_tokenizer.model (sentencepiece): "
                               "it puts a BOS in front of every piece (a Qwen tokenizer puts none)")
    get_template("vicuna_v1").check_tokenizer(llama)
    get_template("plain").check_tokenizer(qwen)  # stage 1's template needs nothing of the tokenizer


def test_preprocessing_refuses_the_pair_at_start(qwen_dir, tmp_path):
    from megatron_asvr.data.preprocess import PreprocessConfig, PreprocessFailed, preprocess
    from megatron_asvr.data.validate import ValidationConfig

    (tmp_path / "images").mkdir()
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"id": "1", "conversations": [{"from": "human", "value": "Hi"},
                                                                  {"from": "gpt", "value": "Hello"}]}]))
    config = PreprocessConfig(inputs=((None, records),), output_dir=tmp_path / "out", tokenizer=qwen_dir,
                              template="vicuna_v1", validation=ValidationConfig(image_root=tmp_path / "images"),
                              progress=False)
    with pytest.raises(PreprocessFailed, match="^template 'vicuna_v1' does not fit the tokenizer tokenizer.json"):
        preprocess(config)


def test_evaluation_prompt_is_the_training_text_up_to_the_answer():
    from megatron_asvr.evaluation.prompts import generation_prompt, with_answer

    prompt = generation_prompt("qwen", "What is it?", has_image=True)
    trained = get_template("qwen").render((Turn(HUMAN, "<image>\nWhat is it?"), Turn(GPT, "A cat.")))
    assert prompt.endswith("<|im_start|>assistant\n") and trained.startswith(prompt)
    assert with_answer("qwen", prompt, "A cat.") + "\n" == trained
