"""Prompt formatting: one dataset row → the text the model sees, split into masked and trained pieces.

Three formats (``data.format``):

* ``alpaca``: ``instruction`` / optional ``input`` / ``output`` columns, rendered with the Stanford Alpaca
  templates below (no preamble line, as in most fine-tuning tools since).
* ``messages``: a list of ``{role: system|user|assistant, content: str}`` turns ending with an assistant turn,
  rendered with the tokenizer's chat template when it has one, else with the small built-in template
  (``<|user|>\\n...\\n<|assistant|>\\n``).
* ``text``: plain language modelling, every token is trained.

:func:`format_example` gives the (prompt, response) pair used for generation and exact-match scoring;
:func:`segments` gives the same text as a list of ``(text, trained)`` pieces for tokenization, so that every
assistant turn of a multi-turn conversation is trained, not only the last.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# Built-in chat format for tokenizers without a chat template (tiny inline models, base models).
CHAT_TURN = "<|{role}|>\n{content}\n"
CHAT_GENERATION_PROMPT = "<|assistant|>\n"
ROLES = ("system", "user", "assistant")


def is_blank(value: Any) -> bool:
    """A missing alpaca ``input``: absent, null, NaN (an empty CSV cell) or only whitespace."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _turns(row: dict, cfg) -> list[dict[str, str]]:
    # Arrow stores turns as structs: keep only role/content (other keys come back as None and confuse templates).
    return [{"role": t["role"], "content": t["content"]} for t in row[cfg.columns.messages]]


def _has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def render_chat(turns: list[dict[str, str]], tokenizer, add_generation_prompt: bool) -> str:
    """Conversation text: the tokenizer's chat template if it has one, else the built-in template."""
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
    text = "".join(CHAT_TURN.format(role=t["role"], content=t["content"]) for t in turns)
    return text + (CHAT_GENERATION_PROMPT if add_generation_prompt else "")


def format_example(row: dict, cfg, tokenizer=None) -> tuple[str, str]:
    """(prompt, response) of one row. ``tokenizer`` only matters for ``messages`` (its chat template); None
    uses the built-in template. For ``text`` the prompt is empty and the whole text is the response."""
    cols = cfg.columns
    if cfg.format == "alpaca":
        value = row.get(cols.input)
        if is_blank(value):
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=row[cols.instruction])
        else:
            prompt = ALPACA_PROMPT.format(instruction=row[cols.instruction], input=value)
        return prompt, row[cols.output]
    if cfg.format == "messages":
        turns = _turns(row, cfg)
        return render_chat(turns[:-1], tokenizer, add_generation_prompt=True), turns[-1]["content"]
    if cfg.format == "text":
        return "", row[cols.text]
    raise ValueError(f"data.format {cfg.format!r} is not one of alpaca, messages, text")


def segments(row: dict, cfg, tokenizer=None) -> list[tuple[str, bool]]:
    """The example as ``(text, trained)`` pieces, in order; the caller appends eos to the last trained piece.

    For ``messages``, each earlier assistant turn's content is a trained piece too. Its position is found in the
    rendered final prompt (the text of ``turns[:k]`` with a generation prompt is a prefix of the whole
    conversation for ordinary chat templates). The template's end-of-turn text after an earlier turn stays in the
    masked context, exactly as the template renders the history at inference. A template that rewrites the
    history (e.g. one that drops earlier reasoning) is not prefix-stable: those turns are then left untrained
    (with a warning) and only the final response is learned.
    """
    prompt, response = format_example(row, cfg, tokenizer)
    if cfg.format != "messages":
        return ([(prompt, False)] if prompt else []) + [(response, True)]
    turns = _turns(row, cfg)
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for k, turn in enumerate(turns[:-1]):
        if turn["role"] != "assistant":
            continue
        start = len(render_chat(turns[:k], tokenizer, add_generation_prompt=True))
        end = start + len(turn["content"])
        if start < cursor or prompt[start:end] != turn["content"]:
            warnings.warn("the chat template does not render earlier turns as a prefix of the conversation; "
                          "only the final assistant turn of each conversation is trained", stacklevel=3)
            return [(prompt, False), (response, True)]
        pieces += [(prompt[cursor:start], False), (turn["content"], True)]
        cursor = end
    pieces += [(prompt[cursor:], False), (response, True)]
    return [(text, trained) for text, trained in pieces if text or trained]
