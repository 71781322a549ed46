"""Loss masks and prompts rendered with real tokenizers and chat templates (Qwen3, Gemma 3, Llama 3)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from deepspec.models.chat import end_of_turn_ids, render_conversation, render_prompt
from deepspec.models.errors import ConfigError, DataError

# name -> (end-of-turn token, chat_template_kwargs)
CHAT = {
    "qwen3": ("<|im_end|>", {"enable_thinking": False}),
    "gemma3": ("<end_of_turn>", {}),
    "llama3": ("<|eot_id|>", {}),
}
_CACHE: dict[str, object] = {}


def _tokenizer(assets_dir, name):
    if name not in _CACHE:
        path = assets_dir / "models" / name if name == "stories260k" else assets_dir / "tokenizers" / name
        _CACHE[name] = AutoTokenizer.from_pretrained(path)
    return _CACHE[name]


@pytest.fixture(params=sorted(CHAT))
def chat(request, assets_dir):
    """(tokenizer, end-of-turn token, template kwargs) for each chat tokenizer."""
    end, kwargs = CHAT[request.param]
    return _tokenizer(assets_dir, request.param), end, kwargs


@pytest.fixture
def stories(assets_dir):
    return _tokenizer(assets_dir, "stories260k")


def _runs(rendered):
    """The masked token ids, as runs of consecutive positions."""
    runs, current = [], []
    for token, m in zip(rendered.input_ids, rendered.loss_mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_mask_is_the_answer_and_its_end_of_turn_token(chat):
    tok, end, kwargs = chat
    answer = "Paris is the capital of France."
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": answer},
    ]
    rendered = render_conversation(tok, messages, use_chat_template=True, chat_template_kwargs=kwargs)

    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    assert rendered.input_ids == tok(text, add_special_tokens=False)["input_ids"]  # one tokenization
    assert len(rendered.loss_mask) == len(rendered.input_ids)
    runs = _runs(rendered)
    assert len(runs) == 1
    assert tok.decode(runs[0]) == answer + end
    assert runs[0][-1] == tok.convert_tokens_to_ids(end)


def test_multi_turn_masks_each_answer_only(chat):
    tok, end, kwargs = chat
    # The second answer also occurs in the first user turn: the forward search must not match it there.
    messages = [
        {"role": "user", "content": "Say yes or no. Is 7 prime?"},
        {"role": "assistant", "content": "Yes, 7 is prime."},
        {"role": "user", "content": "And 9?"},
        {"role": "assistant", "content": "no"},
    ]
    rendered = render_conversation(tok, messages, use_chat_template=True, chat_template_kwargs=kwargs)
    assert [tok.decode(run) for run in _runs(rendered)] == ["Yes, 7 is prime." + end, "no" + end]


def test_prompt_is_the_prefix_the_answer_follows(chat):
    tok, _, kwargs = chat
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ]
    rendered = render_conversation(tok, messages, use_chat_template=True, chat_template_kwargs=kwargs)
    prompt = render_prompt(tok, messages[:3], use_chat_template=True, chat_template_kwargs=kwargs)
    assert rendered.input_ids[: len(prompt)] == prompt
    # The target was fed `prompt` and wrote everything masked after it.
    assert rendered.loss_mask[len(prompt)] == 1
    assert sum(rendered.loss_mask[: len(prompt)]) == len(_runs(rendered)[0])


def test_end_of_turn_ids(chat):
    tok, end, kwargs = chat
    ids = end_of_turn_ids(tok, use_chat_template=True, chat_template_kwargs=kwargs)
    assert tok.convert_tokens_to_ids(end) in ids
    assert tok.eos_token_id in ids


def test_reasoning_is_masked_when_the_template_keeps_it(assets_dir):
    tok = _tokenizer(assets_dir, "qwen3")
    messages = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>Add them.</think>4"},  # Qwen3 re-spaces this block
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>Add again.</think>6"},
    ]
    rendered = render_conversation(tok, messages, use_chat_template=True)
    # Earlier turns lose their reasoning in the template; the last keeps it, and the target wrote it.
    assert [tok.decode(run) for run in _runs(rendered)] == [
        "4<|im_end|>",
        "<think>\nAdd again.\n</think>\n\n6<|im_end|>",
    ]


def test_template_errors_become_data_errors(assets_dir):
    tok = _tokenizer(assets_dir, "gemma3")
    messages = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]
    with pytest.raises(DataError, match="chat template rejected a conversation with turns user/user"):
        render_prompt(tok, messages, use_chat_template=True)


def test_system_prompt_is_added_once(assets_dir):
    tok = _tokenizer(assets_dir, "qwen3")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    added = render_conversation(tok, messages, use_chat_template=True, system_prompt="Be brief.")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in tok.decode(added.input_ids)
    own = [{"role": "system", "content": "Be kind."}, *messages]
    kept = render_conversation(tok, own, use_chat_template=True, system_prompt="Be brief.")
    assert "Be brief." not in tok.decode(kept.input_ids)
    assert tok.decode(_runs(kept)[0]) == "Hello<|im_end|>"


def test_max_length_truncates_ids_and_mask(assets_dir):
    tok = _tokenizer(assets_dir, "llama3")
    messages = [
        {"role": "user", "content": "Count."},
        {"role": "assistant", "content": "one two three four five"},
    ]
    full = render_conversation(tok, messages, use_chat_template=True)
    cut = render_conversation(tok, messages, use_chat_template=True, max_length=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3]
    assert cut.loss_mask == full.loss_mask[:-3]


def test_base_model_without_template(stories):
    opening, continuation = "Once upon a time, there was a little dog", "named Max. Max loved to play."
    messages = [{"role": "user", "content": opening}, {"role": "assistant", "content": continuation}]
    rendered = render_conversation(stories, messages, use_chat_template=False)
    user = stories(opening, add_special_tokens=False)["input_ids"]
    answer = stories(continuation, add_special_tokens=False)["input_ids"]
    bos, eos = stories.bos_token_id, stories.eos_token_id
    assert rendered.input_ids == [bos, *user, *answer, eos]
    assert rendered.loss_mask == [0] * (1 + len(user)) + [1] * (len(answer) + 1)
    assert stories.decode(_runs(rendered)[0], skip_special_tokens=True) == continuation
    prompt = render_prompt(stories, messages[:1], use_chat_template=False)
    assert prompt == [bos, *user]
    assert end_of_turn_ids(stories, use_chat_template=False) == [eos]


def test_base_model_has_no_chat_template(stories):
    with pytest.raises(ConfigError, match="use_chat_template"):
        render_prompt(stories, [{"role": "user", "content": "Hi"}], use_chat_template=True)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "assistant", "content": "Hello"}], "no user turn"),
        ([{"role": "system", "content": "Be brief."}], "no user turn"),
        (
            [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}],
            r"messages\[1\]\.role.*'bot'",
        ),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content"),
        ([], "non-empty list"),
    ],
)
def test_bad_conversations_raise(stories, messages, match):
    with pytest.raises(DataError, match=match):
        render_conversation(stories, messages, use_chat_template=False)


def test_prompt_must_end_with_a_user_turn(stories):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with pytest.raises(DataError, match="must end with a user turn"):
        render_prompt(stories, messages, use_chat_template=False)
