"""The paper's prompt (appendix B.7) rendered through the processor's chat template.

The instruction is the paper's, word for word; the released code joins it to the problem with two
newlines. Each literal ``<image>`` of the problem becomes an image content part at that position, so
the chat template writes ``<|vision_start|><|image_pad|><|vision_end|>`` there (one pad per image; the
processor expands it to the image's token count).
"""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."
INSTRUCTION = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)
PROMPT_TEMPLATE = "{problem}\n\n" + INSTRUCTION


def format_problem(problem: str, template: str = PROMPT_TEMPLATE) -> str:
    """The user turn's text: the problem inside the template (``{problem}`` is its only field)."""
    return template.replace("{problem}", problem.strip())


def build_messages(problem: str, template: str = PROMPT_TEMPLATE) -> list[dict]:
    """Chat messages (system + user) whose user content interleaves text and image parts exactly
    where the problem has ``<image>`` placeholders."""
    content: list[dict] = []
    for i, text in enumerate(format_problem(problem, template).split(IMAGE_PLACEHOLDER)):
        if i > 0:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def render_prompt(processor, problem: str, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt text through the processor's chat template, with the generation prompt appended.
    It has one image pad token per image (the form a vLLM engine takes with the PIL images)."""
    return processor.apply_chat_template(build_messages(problem, template), tokenize=False,
                                         add_generation_prompt=True)
