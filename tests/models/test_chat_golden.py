"""Golden chat rendering: the exact token ids and loss mask of fixed two-turn conversations, rendered
with the real tokenizers in `../shared/assets/tokenizers` (Qwen3 with thinking off and on, Gemma 3,
Llama 3) and SmolLM2's (`make assets`).

The goldens were derived from each template's structure (role headers, separators, what the template
does to an answer), with each text piece tokenized on its own and special tokens looked up by name,
independently of `deepspec.models.chat`, and read token by token. A row is `(mask, tokens)`; the ids
are `convert_tokens_to_ids(tokens)`, and SPECIAL_IDS pins the ids of the special tokens.

The contract they encode: mask 1 exactly on each assistant answer and the end-of-turn token that
closes it; 0 on role headers, system and user turns, the newline after an end-of-turn token, and the
generation prompt (with Qwen3's thinking off that includes the empty `<think>\\n\\n</think>\\n\\n`). With
thinking on, Qwen3 keeps the reasoning block of the last answer (masked: the target wrote it) and drops
it from earlier answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from deepspec.models.chat import render_conversation, render_prompt
from deepspec.models.target import load_tokenizer

SMOLLM2_DIR = Path(__file__).parents[2] / ".cache" / "models" / "smollm2_135m_instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SYSTEM = "You are a terse geography tutor."
Q1, A1 = "What is the capital of France?", "The capital of France is Paris."
Q2, A2 = "And of Italy?", "Rome.\nIt has been the capital since 1871."
R1, R2 = "France's capital is Paris.", "Italy's capital is Rome."  # reasoning, thinking on
T1, T2 = f"<think>\n{R1}\n</think>\n\n{A1}", f"<think>\n{R2}\n</think>\n\n{A2}"  # as regeneration writes it


def _conversation(kind: str, answers: tuple[str, str]) -> list[dict]:
    turns = [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": Q2},
        {"role": "assistant", "content": answers[1]},
    ]
    return [{"role": "system", "content": SYSTEM}, *turns] if kind == "system" else turns


# case -> (tokenizer, chat_template_kwargs, the two answers, the masked text of each answer)
CASES = {
    "qwen3_nothink": ("qwen3", {"enable_thinking": False}, (A1, A2), (A1 + "<|im_end|>", A2 + "<|im_end|>")),
    "qwen3_think": ("qwen3", {"enable_thinking": True}, (T1, T2), (A1 + "<|im_end|>", T2 + "<|im_end|>")),
    "gemma3": ("gemma3", {}, (A1, A2), (A1 + "<end_of_turn>", A2 + "<end_of_turn>")),
    "llama3": ("llama3", {}, (A1, A2), (A1 + "<|eot_id|>", A2 + "<|eot_id|>")),
    "smollm2": ("smollm2", {}, (A1, A2), (A1 + "<|im_end|>", A2 + "<|im_end|>")),
}

SPECIAL_IDS = {
    "qwen3": {"<|im_start|>": 151644, "<|im_end|>": 151645, "<think>": 151667, "</think>": 151668},
    "gemma3": {"<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106},
    "llama3": {
        "<|begin_of_text|>": 128000,
        "<|start_header_id|>": 128006,
        "<|end_header_id|>": 128007,
        "<|eot_id|>": 128009,
    },
    "smollm2": {"<|im_start|>": 1, "<|im_end|>": 2},
}


# (case, conversation) -> rows of (mask, tokens)
GOLDEN = {
    ("qwen3_nothink", "plain"): [
        (0, ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]),
        (0, ["<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "assistant", "Ċ"]),
        (1, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "And", "Ġof", "ĠItaly", "?", "<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ"]),
        (1, ["R", "ome", ".Ċ", "It", "Ġhas", "Ġbeen", "Ġthe", "Ġcapital", "Ġsince", "Ġ", "1", "8", "7"]),
        (1, ["1", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
    ],
    ("qwen3_nothink", "system"): [
        (0, ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġterse", "Ġgeography", "Ġtutor", "."]),
        (0, ["<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]),
        (0, ["<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "assistant", "Ċ"]),
        (1, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "And", "Ġof", "ĠItaly", "?", "<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ"]),
        (1, ["R", "ome", ".Ċ", "It", "Ġhas", "Ġbeen", "Ġthe", "Ġcapital", "Ġsince", "Ġ", "1", "8", "7"]),
        (1, ["1", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
    ],
    ("qwen3_think", "plain"): [
        (0, ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]),
        (0, ["<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "assistant", "Ċ"]),
        (1, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "And", "Ġof", "ĠItaly", "?", "<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "assistant", "Ċ"]),
        (1, ["<think>", "Ċ", "Italy", "'s", "Ġcapital", "Ġis", "ĠRome", ".Ċ", "</think>", "ĊĊ", "R"]),
        (1, ["ome", ".Ċ", "It", "Ġhas", "Ġbeen", "Ġthe", "Ġcapital", "Ġsince", "Ġ", "1", "8", "7", "1"]),
        (1, [".", "<|im_end|>"]),
        (0, ["Ċ"]),
    ],
    ("qwen3_think", "system"): [
        (0, ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġterse", "Ġgeography", "Ġtutor", "."]),
        (0, ["<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]),
        (0, ["<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "assistant", "Ċ"]),
        (1, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "And", "Ġof", "ĠItaly", "?", "<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "assistant", "Ċ"]),
        (1, ["<think>", "Ċ", "Italy", "'s", "Ġcapital", "Ġis", "ĠRome", ".Ċ", "</think>", "ĊĊ", "R"]),
        (1, ["ome", ".Ċ", "It", "Ġhas", "Ġbeen", "Ġthe", "Ġcapital", "Ġsince", "Ġ", "1", "8", "7", "1"]),
        (1, [".", "<|im_end|>"]),
        (0, ["Ċ"]),
    ],
    ("gemma3", "plain"): [
        (0, ["<bos>"]),
        (0, ["<start_of_turn>", "user", "\n", "What", "▁is", "▁the", "▁capital", "▁of", "▁France", "?"]),
        (0, ["<end_of_turn>", "\n"]),
        (0, ["<start_of_turn>", "model", "\n"]),
        (1, ["The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", ".", "<end_of_turn>"]),
        (0, ["\n"]),
        (0, ["<start_of_turn>", "user", "\n", "And", "▁of", "▁Italy", "?", "<end_of_turn>", "\n"]),
        (0, ["<start_of_turn>", "model", "\n"]),
        (1, ["Rome", ".", "\n", "It", "▁has", "▁been", "▁the", "▁capital", "▁since", "▁", "1", "8", "7"]),
        (1, ["1", ".", "<end_of_turn>"]),
        (0, ["\n"]),
    ],
    ("gemma3", "system"): [
        (0, ["<bos>"]),
        (0, ["<start_of_turn>", "user", "\n", "You", "▁are", "▁a", "▁terse", "▁geography", "▁tutor"]),
        (0, [".", "\n\n", "What", "▁is", "▁the", "▁capital", "▁of", "▁France", "?", "<end_of_turn>"]),
        (0, ["\n"]),
        (0, ["<start_of_turn>", "model", "\n"]),
        (1, ["The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", ".", "<end_of_turn>"]),
        (0, ["\n"]),
        (0, ["<start_of_turn>", "user", "\n", "And", "▁of", "▁Italy", "?", "<end_of_turn>", "\n"]),
        (0, ["<start_of_turn>", "model", "\n"]),
        (1, ["Rome", ".", "\n", "It", "▁has", "▁been", "▁the", "▁capital", "▁since", "▁", "1", "8", "7"]),
        (1, ["1", ".", "<end_of_turn>"]),
        (0, ["\n"]),
    ],
    ("llama3", "plain"): [
        (0, ["<|begin_of_text|>"]),
        (0, ["<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ", "What", "Ġis", "Ġthe"]),
        (0, ["Ġcapital", "Ġof", "ĠFrance", "?", "<|eot_id|>"]),
        (0, ["<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"]),
        (1, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|eot_id|>"]),
        (0, ["<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ", "And", "Ġof", "ĠItaly", "?"]),
        (0, ["<|eot_id|>"]),
        (0, ["<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"]),
        (1, ["R", "ome", ".Ċ", "It", "Ġhas", "Ġbeen", "Ġthe", "Ġcapital", "Ġsince", "Ġ", "187", "1"]),
        (1, [".", "<|eot_id|>"]),
    ],
    ("llama3", "system"): [
        (0, ["<|begin_of_text|>"]),
        (0, ["<|start_header_id|>", "system", "<|end_header_id|>", "ĊĊ", "You", "Ġare", "Ġa", "Ġterse"]),
        (0, ["Ġgeography", "Ġtutor", ".", "<|eot_id|>"]),
        (0, ["<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ", "What", "Ġis", "Ġthe"]),
        (0, ["Ġcapital", "Ġof", "ĠFrance", "?", "<|eot_id|>"]),
        (0, ["<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"]),
        (1, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|eot_id|>"]),
        (0, ["<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ", "And", "Ġof", "ĠItaly", "?"]),
        (0, ["<|eot_id|>"]),
        (0, ["<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"]),
        (1, ["R", "ome", ".Ċ", "It", "Ġhas", "Ġbeen", "Ġthe", "Ġcapital", "Ġsince", "Ġ", "187", "1"]),
        (1, [".", "<|eot_id|>"]),
    ],
    ("smollm2", "plain"): [
        (0, ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġhelpful", "ĠAI", "Ġassistant"]),
        (0, ["Ġnamed", "ĠSm", "ol", "LM", ",", "Ġtrained", "Ġby", "ĠH", "ugging", "ĠFace", "<|im_end|>"]),
        (0, ["Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]),
        (0, ["<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "ass", "istant", "Ċ"]),
        (1, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "And", "Ġof", "ĠItaly", "?", "<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "ass", "istant", "Ċ"]),
        (1, ["Rome", ".", "Ċ", "It", "Ġhas", "Ġbeen", "Ġthe", "Ġcapital", "Ġsince", "Ġ", "1", "8", "7"]),
        (1, ["1", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
    ],
    ("smollm2", "system"): [
        (0, ["<|im_start|>", "system", "Ċ", "You", "Ġare", "Ġa", "Ġter", "se", "Ġgeography", "Ġtutor"]),
        (0, [".", "<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "What", "Ġis", "Ġthe", "Ġcapital", "Ġof", "ĠFrance", "?"]),
        (0, ["<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "ass", "istant", "Ċ"]),
        (1, ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis", "ĠParis", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
        (0, ["<|im_start|>", "user", "Ċ", "And", "Ġof", "ĠItaly", "?", "<|im_end|>", "Ċ"]),
        (0, ["<|im_start|>", "ass", "istant", "Ċ"]),
        (1, ["Rome", ".", "Ċ", "It", "Ġhas", "Ġbeen", "Ġthe", "Ġcapital", "Ġsince", "Ġ", "1", "8", "7"]),
        (1, ["1", ".", "<|im_end|>"]),
        (0, ["Ċ"]),
    ],
}

_TOKENIZERS: dict[str, object] = {}


def _tokenizer(assets_dir: Path, name: str):
    if name not in _TOKENIZERS:
        if name != "smollm2":
            _TOKENIZERS[name] = AutoTokenizer.from_pretrained(assets_dir / "tokenizers" / name)
        elif (SMOLLM2_DIR / f".{Path(SMOLLM2_GGUF).stem}.hf" / "tokenizer.json").is_file():
            # the copy `load_tokenizer` dequantized before: the same tokenizer, without reading the GGUF
            _TOKENIZERS[name] = AutoTokenizer.from_pretrained(SMOLLM2_DIR / f".{Path(SMOLLM2_GGUF).stem}.hf")
        elif (SMOLLM2_DIR / SMOLLM2_GGUF).is_file():
            _TOKENIZERS[name] = load_tokenizer(str(SMOLLM2_DIR), SMOLLM2_GGUF)
        else:
            pytest.skip(f"SmolLM2's GGUF is not at {SMOLLM2_DIR / SMOLLM2_GGUF}; run `make assets`")
    return _TOKENIZERS[name]


def _case(assets_dir: Path, case: str, kind: str):
    """(tokenizer, template kwargs, conversation, masked text of each answer) of one golden."""
    name, kwargs, answers, masked = CASES[case]
    return _tokenizer(assets_dir, name), kwargs, _conversation(kind, answers), masked


def _render(tok, conversation, kwargs):
    return render_conversation(tok, conversation, use_chat_template=True, chat_template_kwargs=kwargs)


def _answer_starts(mask: list[int]) -> list[int]:
    return [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]


@pytest.mark.parametrize(("case", "kind"), sorted(GOLDEN))
def test_golden_ids_and_mask(assets_dir, case, kind):
    tok, kwargs, conversation, _ = _case(assets_dir, case, kind)
    tokens = [t for _, row in GOLDEN[case, kind] for t in row]
    mask = [m for m, row in GOLDEN[case, kind] for _ in row]
    rendered = _render(tok, conversation, kwargs)

    assert tok.convert_ids_to_tokens(rendered.input_ids) == tokens  # the readable diff first
    assert rendered.input_ids == tok.convert_tokens_to_ids(tokens)
    assert rendered.loss_mask == mask
    # The golden is the template's own text, tokenized once: no prefix was tokenized apart.
    text = tok.apply_chat_template(conversation, tokenize=False, **kwargs)
    assert tok(text, add_special_tokens=False)["input_ids"] == rendered.input_ids


@pytest.mark.parametrize("name", sorted(SPECIAL_IDS))
def test_special_token_ids(assets_dir, name):
    tok = _tokenizer(assets_dir, name)
    assert {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_IDS[name]} == SPECIAL_IDS[name]


@pytest.mark.parametrize("kind", ["plain", "system"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_runs_are_the_answers(assets_dir, case, kind):
    tok, kwargs, conversation, masked = _case(assets_dir, case, kind)
    rendered = _render(tok, conversation, kwargs)
    runs = []
    for start in _answer_starts(rendered.loss_mask):
        end = start
        while end < len(rendered.loss_mask) and rendered.loss_mask[end]:
            end += 1
        runs.append(tok.decode(rendered.input_ids[start:end]))
    assert runs == list(masked)


@pytest.mark.parametrize("kind", ["plain", "system"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_is_the_prefix_of_the_last_answer(assets_dir, case, kind):
    """Regeneration feeds `render_prompt`; training renders the whole conversation: the ids agree up to
    the last answer, so the target's hidden states are those of the context it answered in."""
    tok, kwargs, conversation, _ = _case(assets_dir, case, kind)
    rendered = _render(tok, conversation, kwargs)
    prompt = render_prompt(tok, conversation[:-1], use_chat_template=True, chat_template_kwargs=kwargs)
    assert rendered.input_ids[: len(prompt)] == prompt
    assert _answer_starts(rendered.loss_mask)[-1] == len(prompt)


@pytest.mark.parametrize("kind", ["plain", "system"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_of_the_first_answer(assets_dir, case, kind):
    """The first answer's prompt is a prefix too, except with Qwen3's thinking off: its template puts an
    empty `<think>` block in every generation prompt but renders only the last answer with one, so the
    first answer was written after four tokens that the training rendering drops. (With thinking on the
    prompt is a prefix, but the template drops the reasoning the target wrote for that answer.)"""
    tok, kwargs, conversation, _ = _case(assets_dir, case, kind)
    rendered = _render(tok, conversation, kwargs)
    prompt = render_prompt(tok, conversation[:-3], use_chat_template=True, chat_template_kwargs=kwargs)
    start = _answer_starts(rendered.loss_mask)[0]
    if case == "qwen3_nothink":
        assert tok.convert_ids_to_tokens(prompt[start:]) == ["<think>", "ĊĊ", "</think>", "ĊĊ"]
        prompt = prompt[:start]
    assert rendered.input_ids[:start] == prompt
