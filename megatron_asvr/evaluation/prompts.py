"""Prompts as LLaVA's evaluation builds them (``conv.append_message(roles[1], None)``), and the
answer text appended for likelihood scoring exactly as the training templates render an answer.

    vicuna_v1:         <system> USER: <image>\\n<question> ASSISTANT:       + " <answer></s>"
    mistral_instruct:  [INST] <image>\\n<question> [/INST]                   + " <answer> </s>"
    plain:             <image>\\n<question>\\n                               + "<answer>\\n"
    qwen:              <|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<image>\\n<question><|im_end|>\\n
                       <|im_start|>assistant\\n                                + "<answer><|im_end|>"
"""

from megatron_asvr.tokenizers.templates import HUMAN, IMAGE_TAG, QwenTemplate, Turn, VicunaV1Template

GENERATION_TEMPLATES = ("vicuna_v1", "mistral_instruct", "plain", "qwen")


def user_turn(question: str, has_image: bool) -> str:
    """LLaVA's evaluation scripts put the image tag and a newline in front of the question."""
    return f"{IMAGE_TAG}\n{question}" if has_image else question


def generation_prompt(template: str, question: str, has_image: bool) -> str:
    """The text the model continues: everything up to where the answer starts."""
    user = user_turn(question, has_image)
    if template == "vicuna_v1":
        t = VicunaV1Template
        return f"{t.system}{t.seps[0]}{t.roles[0]}: {user}{t.seps[0]}{t.roles[1]}:"
    if template == "mistral_instruct":
        return f"[INST] {user} [/INST]"
    if template == "plain":
        return f"{user}\n"
    if template == "qwen":  # the template's text of this first question, up to where its answer starts
        return QwenTemplate().render((Turn(HUMAN, user),))
    raise ValueError(f"no generation prompt for template {template!r}; known: {', '.join(GENERATION_TEMPLATES)}")


def with_answer(template: str, prompt: str, answer: str) -> str:
    """``prompt`` followed by ``answer`` and its end as the template trains it."""
    if template == "vicuna_v1":
        return f"{prompt} {answer}</s>"
    if template == "mistral_instruct":
        return f"{prompt} {answer} </s>"
    if template == "plain":
        return f"{prompt}{answer}\n"
    if template == "qwen":
        return f"{prompt}{answer}{QwenTemplate.end}"
    raise ValueError(f"no answer format for template {template!r}; known: {', '.join(GENERATION_TEMPLATES)}")
