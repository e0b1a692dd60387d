"""Chat data: conversations (a `messages` list of {role, content}) -> text with the assistant's spans.

A conversation is rendered with the tokenizer's own chat template when it has one, else with
p3d's built-in template, which needs no special tokens (it works with the byte tokenizer):

    <|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n...<|end|>\\n

Only the assistant's turns are targets: with the built-in template its content and the `<|end|>`
that closes it; with the tokenizer's template, what the template adds for that turn after the
generation prompt (content and end-of-turn tokens). The spans are found by rendering the
conversation prefix by prefix, so any template that renders a conversation as the concatenation
of its turns works; one that does not is refused with a one-line error.

`builtin_conversations()` is a small chat set written for offline demos and tests: short tasks
(arithmetic, spelling, opposites, multi-turn follow-ups) generated from a fixed seed.
"""

from __future__ import annotations

import random
from typing import Any

from p3d.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
BUILTIN_END = "<|end|>"


def conversation_problem(value: Any, field: str) -> str | None:
    """Why a row's `field` value is not a conversation (a list of {role, content} with known roles), or None."""
    fix = f"chat rows hold {field}: [{{role: user, content: ...}}, {{role: assistant, content: ...}}] (set data.messages_field, or use data.format=text)"
    if not isinstance(value, list):
        found = "nothing" if value is None else f"a {type(value).__name__}"
        return f"has {found} in {field!r}, not a list of messages; {fix}"
    for index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {index} is not a {{role, content}} object; {fix}"
        role, content = message["role"], message["content"]
        if role not in ROLES:
            return f"message {index} has the unknown role {role!r} (data.format=chat knows {', '.join(ROLES)}); fix the row"
        if not isinstance(content, str):
            return f"message {index} ({role}) has content of type {type(content).__name__}, not text; fix the row"
    return None


def check_conversation(value: Any, field: str, where: str, source: str) -> list[dict]:
    """The conversation of one row as a list of {role, content}; ConfigError naming the source and row otherwise."""
    problem = conversation_problem(value, field)
    if problem:
        raise ConfigError(f"{source}: {where} {problem}")
    return [{"role": message["role"], "content": message["content"]} for message in value]


def render_builtin(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """p3d's template: (text, [start, end) character spans of the assistant's turns)."""
    parts: list[str] = []
    spans = []
    length = 0
    for message in messages:
        header = f"<|{message['role']}|>\n"
        if message["role"] == "assistant":
            body = message["content"] + BUILTIN_END
            spans.append((length + len(header), length + len(header) + len(body)))
        else:
            body = message["content"]
        piece = header + body + "\n"
        parts.append(piece)
        length += len(piece)
    return "".join(parts), spans


def render_with_template(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The tokenizer's chat template: (text, assistant spans), found by rendering prefix by prefix."""

    def render(part: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(part, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as error:  # jinja2's TemplateError and anything a template raises
            raise ConfigError(
                f"data.format=chat: the tokenizer's chat template rejects {where} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); fix the row or use another data.tokenizer"
            ) from None

    text = render(messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], True) if index else ""
        through = render(messages[: index + 1], False)
        if not (text.startswith(prompt) and text.startswith(through) and len(prompt) <= len(through)):
            raise ConfigError(
                f"data.tokenizer: its chat template does not render {where} turn by turn (a prefix of the conversation "
                f"renders differently inside the whole one), so p3d cannot tell the assistant's tokens; use a tokenizer "
                f"whose template does, or data.tokenizer=byte (p3d's built-in template)"
            )
        spans.append((len(prompt), len(through)))
    return text, spans


# --- the built-in chat set --------------------------------------------------------------------------

_WORDS = (
    "apple", "river", "python", "garden", "window", "planet", "silver", "orange", "market", "pencil", "forest",
    "bridge", "candle", "rocket", "island", "summer", "winter", "letter", "coffee", "guitar", "yellow", "purple",
    "button", "dragon", "castle", "rabbit", "tomato", "ladder", "mirror", "pillow", "basket", "anchor",
)
_OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"), ("open", "closed"),
    ("light", "dark"), ("early", "late"), ("full", "empty"), ("old", "new"), ("happy", "sad"), ("hard", "soft"),
    ("left", "right"), ("wet", "dry"), ("loud", "quiet"), ("high", "low"),
)
_SYSTEM = ("You are a concise assistant.", "Answer briefly and exactly.", "You answer in one short sentence.")


def _arithmetic(rng: random.Random) -> list[dict]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op, result = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
    return [{"role": "user", "content": f"What is {a} {op} {b}?"}, {"role": "assistant", "content": f"{a} {op} {b} = {result}."}]


def _spelling(rng: random.Random) -> list[dict]:
    word = rng.choice(_WORDS)
    task = rng.randrange(3)
    if task == 0:
        return [{"role": "user", "content": f"Reverse the word '{word}'."}, {"role": "assistant", "content": f"'{word}' reversed is '{word[::-1]}'."}]
    if task == 1:
        return [{"role": "user", "content": f"Write '{word}' in capital letters."}, {"role": "assistant", "content": word.upper()}]
    return [{"role": "user", "content": f"How many letters are in '{word}'?"}, {"role": "assistant", "content": f"'{word}' has {len(word)} letters."}]


def _opposite(rng: random.Random) -> list[dict]:
    word, opposite = rng.choice(_OPPOSITES)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return [
        {"role": "system", "content": rng.choice(_SYSTEM)},
        {"role": "user", "content": f"What is the opposite of '{word}'?"},
        {"role": "assistant", "content": f"The opposite of '{word}' is '{opposite}'."},
    ]


def _follow_up(rng: random.Random) -> list[dict]:
    a, b, factor = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
    return [
        {"role": "user", "content": f"Add {a} and {b}."},
        {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        {"role": "user", "content": f"Now multiply that by {factor}."},
        {"role": "assistant", "content": f"{a + b} * {factor} = {(a + b) * factor}."},
    ]


def builtin_conversations(count: int = 2000, seed: int = 0) -> list[list[dict]]:
    """The built-in chat set: `count` short conversations, the same on every machine."""
    rng = random.Random(seed)
    makers = (_arithmetic, _spelling, _opposite, _follow_up)
    return [rng.choice(makers)(rng) for _ in range(count)]
