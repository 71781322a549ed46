"""Render a conversation exactly as the target sees it, with a mask over the tokens it must write.

`render_conversation` renders the whole conversation once with the tokenizer's own chat template
(`tokenize=False`), tokenizes that text once with character offsets, and marks a token as an answer
token when it overlaps the characters of an assistant message's content (located in the rendered text
by searching forward, message by message) or is the first token after that content: the end-of-turn
token that closes the turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`). Prefixes are never
tokenized separately, so the ids are exactly those of the rendered text, merges across turn
boundaries included.

Templates may edit an answer before rendering it: Gemma and Llama 3 trim it; Qwen3 re-spaces the
`<think>` block of the last answer and drops it from earlier ones. The search then allows for that:
a reasoning block the template kept is masked with its answer, one it dropped is not.

Base models without a template (`use_chat_template=False`, e.g. stories260k) see
`[bos] + tokens(turn 1) + tokens(turn 2) + ...`, with `eos` closing each assistant turn.

An empty (or all-whitespace) answer has no text to locate, so none of its tokens is masked.

`render_prompt` gives the ids a target is fed to answer the last user turn: the template with
`add_generation_prompt=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import TemplateError

from deepspec.models.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on answer tokens (assistant content and its end-of-turn token)


def render_conversation(
    tokenizer,
    messages: list[dict],
    *,
    use_chat_template: bool,
    chat_template_kwargs: dict | None = None,
    system_prompt: str | None = None,
    max_length: int | None = None,
) -> Rendered:
    """Token ids of a whole conversation and the mask of the assistant's answer tokens."""
    messages = _checked(messages, system_prompt)
    if use_chat_template:
        ids, mask = _render_with_template(tokenizer, messages, dict(chat_template_kwargs or {}))
    else:
        ids, mask = _render_plain(tokenizer, messages)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return Rendered(input_ids=ids, loss_mask=mask)


def render_prompt(
    tokenizer,
    messages: list[dict],
    *,
    use_chat_template: bool,
    chat_template_kwargs: dict | None = None,
    system_prompt: str | None = None,
) -> list[int]:
    """The ids a target is fed to answer the last message, which must be a user turn."""
    messages = _checked(messages, system_prompt)
    if messages[-1]["role"] != "user":
        raise DataError(
            f"messages[{len(messages) - 1}].role: a prompt must end with a user turn, "
            f"got {messages[-1]['role']!r}"
        )
    if not use_chat_template:
        ids, _ = _render_plain(tokenizer, messages)
        return ids
    text = _apply_template(tokenizer, messages, dict(chat_template_kwargs or {}), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_ids(
    tokenizer, *, use_chat_template: bool, chat_template_kwargs: dict | None = None
) -> list[int]:
    """Token ids that end an answer: eos, plus the special token the chat template closes a turn with."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if use_chat_template:
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        rendered = render_conversation(
            tokenizer, probe, use_chat_template=True, chat_template_kwargs=chat_template_kwargs
        )
        masked = [i for i, m in zip(rendered.input_ids, rendered.loss_mask, strict=True) if m]
        special = set(tokenizer.all_special_ids) | {
            i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
        }
        # A template that closes a turn with plain text (a newline) has no stop token of its own.
        if masked and masked[-1] in special and masked[-1] not in ids:
            ids.append(int(masked[-1]))
    return ids


def _checked(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """Messages as plain {role, content} dicts, with `system_prompt` prepended when there is none."""
    if not isinstance(messages, list) or not messages:
        raise DataError("messages: expected a non-empty list of {role, content} turns")
    out = []
    for n, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise DataError(f"messages[{n}].role: expected one of {'/'.join(ROLES)}, got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise DataError(f"messages[{n}].content: expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in out):
        raise DataError("messages: the conversation has no user turn")
    if system_prompt is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def _apply_template(
    tokenizer, messages: list[dict], kwargs: dict[str, Any], add_generation_prompt: bool
) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"target.use_chat_template=true, but the tokenizer {tokenizer.name_or_path!r} has no chat "
            "template; set target.use_chat_template=false for a base model"
        )
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except TemplateError as err:
        roles = "/".join(m["role"] for m in messages)
        raise DataError(f"the chat template rejected a conversation with turns {roles}: {err}") from err


def _render_with_template(
    tokenizer, messages: list[dict], kwargs: dict[str, Any]
) -> tuple[list[int], list[int]]:
    text = _apply_template(tokenizer, messages, kwargs, add_generation_prompt=False)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} is not a fast tokenizer: loss masks need character offsets"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    mask = [0] * len(ids)
    cursor, k = 0, 0  # a character position in `text`, a token index into `ids`
    for n, message in enumerate(messages):
        if not message["content"].strip():
            continue  # an empty answer has no span to find; its end-of-turn token stays unmasked
        span = _locate(text, message["content"], cursor)
        if span is None:
            if message["role"] == "assistant":
                raise DataError(
                    f"messages[{n}].content: the chat template changed the answer, so it cannot be found "
                    f"in the rendered text after character {cursor}: {message['content'][:80]!r}"
                )
            continue  # a template may rewrite user or system text; the answers still line up
        start, end = span
        cursor = end
        if message["role"] != "assistant":
            continue
        while k < len(ids) and offsets[k][1] <= start:
            k += 1
        while k < len(ids) and offsets[k][0] < end:
            if offsets[k][1] > offsets[k][0]:
                mask[k] = 1  # overlaps the answer
            k += 1
        while k < len(ids) and offsets[k][1] <= offsets[k][0]:
            k += 1  # zero-width tokens carry no text
        if k < len(ids):
            mask[k] = 1  # the end-of-turn token
            k += 1
    return ids, mask


def _locate(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    """The character span of `content` in `text` at or after `cursor`, allowing template edits."""
    at = text.find(content, cursor)
    if at >= 0:
        return at, at + len(content)
    if "</think>" in content:
        thought, answer = content.rsplit("</think>", 1)
        thought, answer = thought.split("<think>")[-1].strip(), answer.strip()
        reasoned = _locate_reasoning(text, thought, answer, cursor)
        if reasoned is not None:
            return reasoned
        content = answer  # templates drop the reasoning of earlier turns
    content = content.strip()
    at = text.find(content, cursor) if content else -1
    return (at, at + len(content)) if at >= 0 else None


def _locate_reasoning(text: str, thought: str, answer: str, cursor: int) -> tuple[int, int] | None:
    """The span from `<think>` to the end of the answer when the template re-spaced the reasoning block."""
    if not thought or not answer:
        return None
    t_at = text.find(thought, cursor)
    if t_at < 0:
        return None
    a_at = text.find(answer, t_at + len(thought))
    if a_at < 0 or text[t_at + len(thought) : a_at].strip() != "</think>":
        return None
    opening = text.rfind("<think>", cursor, t_at)
    start = opening if opening >= 0 and not text[opening + len("<think>") : t_at].strip() else t_at
    return start, a_at + len(answer)


def _render_plain(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError(
            f"tokenizer {tokenizer.name_or_path!r} lacks a bos or eos token, which prompts without a chat "
            "template need"
        )
    ids, mask = [int(tokenizer.bos_token_id)], [0]
    for message in messages:
        tokens = (
            list(tokenizer(message["content"], add_special_tokens=False)["input_ids"])
            if message["content"]
            else []
        )
        answer = message["role"] == "assistant"
        if answer:
            tokens.append(int(tokenizer.eos_token_id))
        ids += tokens
        mask += [int(answer)] * len(tokens)
    return ids, mask
