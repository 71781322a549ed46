"""Where the regenerate stage's answers come from: one interface, four backends.

    hf      in-process transformers `generate`, batched and left padded (the embedded default)
    vllm    vLLM OpenAI-compatible servers: `/v1/completions` fed the token ids DeepSpec renders itself
    openai  any OpenAI-compatible endpoint (SGLang, TGI, a hosted API): `/v1/chat/completions`, so the
            server applies its chat template (`regen.api=completions` sends token ids where it can)
    file    answers the target already wrote (`regen.answers_file`: another run's answers.jsonl, a batch
            job's output), matched to each prompt by its system and user turns; nothing is generated

A backend answers a list of prompt rows and hands each finished record (or a batch of them) to `emit`
as soon as it has it, so the stage can log it before the next one; `emit` is called from one thread.
Multi-turn rows are answered turn by turn: the answer to user turn k is part of the prompt of turn k+1.

Records: `{"id", "source", "category", "conversations", "finish_reason", "truncated",
"completion_tokens", "prompt_tokens"}`, plus `"heldout": true` for a held-out prompt. `finish_reason` is
"length" when any turn was cut at `max_new_tokens` or its prompt did not fit the model's context (that
turn and later ones stay unanswered), else "stop"; `truncated` says the same as a bool. A row whose
requests fail for good becomes `{"id", "error"}`: the stage files it in its errors file and asks for it
again on the next run.

Sending token ids (`api=completions`) keeps the rendering byte-identical to the cache stage and training:
both use `deepspec.models.chat`. Over `api=chat` the server's template renders the prompt instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from deepspec.models.chat import end_of_turn_ids, render_prompt
from deepspec.models.errors import ConfigError, DataError, DeepSpecError
from deepspec.tasks.files import read_jsonl, read_once
from deepspec.tasks.prompts import normalize_row, prompt_key

log = logging.getLogger(__name__)

Emit = Callable[[list[dict]], None]
TRANSIENT_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}  # worth another try, maybe on another replica


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    top_k: int  # 0: off

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,  # 0 turns top-k off; None would mean transformers' default of 50
        }


@dataclass
class Rendering:
    """How prompts are rendered: the target preset's chat settings, shared with the cache stage."""

    use_chat_template: bool
    chat_template_kwargs: dict | None
    system_prompt: str | None

    def kwargs(self) -> dict[str, Any]:
        return {
            "use_chat_template": self.use_chat_template,
            "chat_template_kwargs": self.chat_template_kwargs,
            "system_prompt": self.system_prompt,
        }


def rounds(row: dict) -> list[list[dict]]:
    """The turns to add before each answer: any system turns, then one user turn. Old answers are dropped."""
    out, pending = [], []
    for turn in row["conversations"]:
        if turn["role"] == "assistant":
            continue
        pending.append({"role": turn["role"], "content": turn["content"]})
        if turn["role"] == "user":
            out.append(pending)
            pending = []
    return out


def record(
    row: dict, conversation: list[dict], cut: bool, completion_tokens: int, prompt_tokens: int
) -> dict:
    return {
        "id": row["id"],
        "source": row.get("source"),
        "category": row.get("category"),
        "conversations": conversation,
        "finish_reason": "length" if cut else "stop",
        "truncated": cut,
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        **({"heldout": True} if row.get("heldout") else {}),  # for validation only, never trained on
    }


def stop_token_ids(tokenizer, rendering: Rendering, eos: Any = None) -> list[int]:
    """End-of-turn ids of the chat template, then eos ids (the tokenizer's and `eos`, the model's)."""
    ids = end_of_turn_ids(
        tokenizer,
        use_chat_template=rendering.use_chat_template,
        chat_template_kwargs=rendering.chat_template_kwargs,
    )
    extra = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ids + [int(i) for i in extra if int(i) not in ids]


# ----------------------------------------------------------------------------------------------------
# hf: in-process transformers


class HFBackend:
    """Batches of `batch_size` rows through `model.generate`. Each batch is seeded with `seed + the index of
    its first row`, so a batch samples the same answers whether it runs in one go or after a restart."""

    def __init__(
        self, model, tokenizer, sampling: Sampling, rendering: Rendering, batch_size: int, seed: int
    ):
        self.model, self.tokenizer = model, tokenizer
        self.sampling, self.rendering = sampling, rendering
        self.batch_size, self.seed = batch_size, seed
        self.device = next(model.parameters()).device
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = (
                tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
            )
        self.stop_ids = stop_token_ids(tokenizer, rendering, model.generation_config.eos_token_id)
        if not self.stop_ids:
            raise ConfigError("target.path: the tokenizer has no eos or end-of-turn token")
        self.context = getattr(model.config, "max_position_embeddings", None)

    def answer(self, rows: list[dict], first_index: int, emit: Emit) -> None:
        """Answer `rows` (the batches of `rows[i]` start at index `first_index + i` of the shard's rows)."""
        for start in range(0, len(rows), self.batch_size):
            torch.manual_seed(self.seed + first_index + start)
            emit(self._answer_batch(rows[start : start + self.batch_size]))

    @torch.no_grad()
    def _answer_batch(self, batch: list[dict]) -> list[dict]:
        turns = [rounds(row) for row in batch]
        conversations: list[list[dict]] = [[] for _ in batch]
        cut = [False] * len(batch)
        completion, prompt_tokens = [0] * len(batch), [0] * len(batch)
        open_rows = set(range(len(batch)))
        for turn in range(max(len(t) for t in turns)):
            active, prompts = [], []
            for i in sorted(open_rows):
                if turn >= len(turns[i]):
                    continue
                conversations[i] += turns[i][turn]
                ids = render_prompt(self.tokenizer, conversations[i], **self.rendering.kwargs())
                if self.context is not None and len(ids) >= self.context:
                    _log_no_room(batch[i]["id"], turn, len(ids), self.context)
                    cut[i] = (
                        True  # the unanswered user turn stays: nothing to mask, and the row keeps its place
                    )
                    open_rows.discard(i)
                    continue
                active.append(i)
                prompts.append(ids)
                prompt_tokens[i] += len(ids)
            if not active:
                continue
            for i, new in zip(active, self._generate(prompts), strict=True):
                stop_at = next((k for k, t in enumerate(new) if t in self.stop_ids), None)
                kept = new if stop_at is None else new[:stop_at]
                text = self.tokenizer.decode(kept, skip_special_tokens=True)
                conversations[i].append({"role": "assistant", "content": text})
                completion[i] += len(new) if stop_at is None else stop_at + 1
                cut[i] = cut[i] or stop_at is None
        return [
            record(row, conversations[i], cut[i], completion[i], prompt_tokens[i])
            for i, row in enumerate(batch)
        ]

    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        """New token ids for each prompt (left padded together), up to and including a stop token."""
        width = max(len(p) for p in prompts)
        pad = int(self.tokenizer.pad_token_id)
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            eos_token_id=self.stop_ids,
            pad_token_id=pad,
            **self.sampling.generate_kwargs(),
        )
        return [row[width:].tolist() for row in out]


# ----------------------------------------------------------------------------------------------------
# file: answers written before


class FileBackend:
    """Answers looked up in a JSONL file of conversations the target already answered (the prompts
    stage's row format, plus the optional `finish_reason`, `completion_tokens` and `prompt_tokens` that
    answers.jsonl records carry). A prompt matches the first row with the same system and user turns;
    a prompt with no such row, or whose row holds no answer, becomes an error record (see the stage)."""

    def __init__(self, path: str | Path, tokenizer, rendering: Rendering):
        self.path, self.tokenizer, self.rendering = Path(path), tokenizer, rendering
        if self.path.suffix != ".jsonl" or not self.path.is_file():
            raise ConfigError(f"regen.answers_file={str(path)!r}: expected an existing .jsonl file")
        self.answers, _ = read_once(self.path, _answers_by_prompt)

    def answer(self, rows: list[dict], first_index: int, emit: Emit) -> None:
        emit([self._answer(row) for row in rows])

    def _answer(self, row: dict) -> dict:
        given = self.answers.get(prompt_key(row["conversations"]))
        if given is None:
            return {"id": row["id"], "error": f"{self.path}: no row with this prompt's system and user turns"}
        line, conversation, raw = given
        answers = [t["content"] for t in conversation if t["role"] == "assistant"]
        if not answers:
            return {"id": row["id"], "error": f"{self.path}:{line}: the row holds no assistant turn"}
        completion = raw.get("completion_tokens")
        if not isinstance(completion, int):
            completion = sum(len(self.tokenizer.encode(a, add_special_tokens=False)) for a in answers)
        prompt_tokens = raw.get("prompt_tokens")
        if not isinstance(prompt_tokens, int):
            prompt_tokens = len(render_prompt(self.tokenizer, rounds(row)[0], **self.rendering.kwargs()))
        cut = raw.get("finish_reason") == "length" or raw.get("truncated") is True
        return record(row, conversation, cut, completion, prompt_tokens)


def _answers_by_prompt(path: Path) -> dict[str, tuple[int, list[dict], dict]]:
    """{prompt key: (line, normalized turns, raw row)} for the first row of each prompt; a malformed
    line fails, naming the file, the line and the field."""
    found: dict[str, tuple[int, list[dict], dict]] = {}
    for line, raw in read_jsonl(path):
        try:
            row = normalize_row(raw, f"line-{line}", path.stem)
        except DataError as err:
            raise DataError(f"regen.answers_file {path}:{line}: {err}") from None
        found.setdefault(prompt_key(row["conversations"]), (line, row["conversations"], raw))
    return found


def _log_no_room(row_id: str, turn: int, prompt_len: int, context: int) -> None:
    log.warning(
        "regenerate: row %s turn %d: the prompt has %d tokens, the model's context %d; "
        "not answering it or later turns",
        row_id,
        turn + 1,
        prompt_len,
        context,
    )


# ----------------------------------------------------------------------------------------------------
# vllm and openai: OpenAI-compatible HTTP servers


class RequestFailed(DeepSpecError):
    """A request that failed for good: a permanent error, or a transient one past the retry budget."""


@dataclass
class HTTPSettings:
    endpoints: list[str]  # base URLs ending in /v1
    api: str  # "completions" (token ids in) or "chat" (messages in)
    model: str | None  # the served model name; None: the first one /v1/models lists
    concurrency: int  # rows in flight at once (each has at most one request open)
    max_retries: int
    timeout_s: float
    api_key: str | None = field(default=None, repr=False)  # never logged
    extra_body: dict[str, Any] = field(default_factory=dict)
    backoff_s: float = 1.0  # the first retry waits about this long, doubling up to backoff_max_s
    backoff_max_s: float = 30.0


@dataclass
class _Reply:
    text: str
    cut: bool
    completion_tokens: int
    prompt_tokens: int


class HTTPBackend:
    """Rows spread over the endpoints (fewest requests open first), `concurrency` rows at a time. A
    transient failure (connection refused or reset, timeout, HTTP 408/429/5xx) is retried after an
    exponential backoff with jitter, on another replica when there is one; any other HTTP error, or
    `max_retries` transient ones, fails the row."""

    def __init__(self, settings: HTTPSettings, sampling: Sampling, rendering: Rendering, tokenizer=None):
        if not settings.endpoints:
            raise ConfigError("regen.endpoints: no endpoint to send requests to")
        if settings.api not in ("completions", "chat"):
            raise ConfigError(f"regen.api={settings.api!r}: expected 'completions' or 'chat'")
        if settings.api == "completions" and tokenizer is None:
            raise ConfigError("regen.api=completions renders token ids, which needs the target's tokenizer")
        self.settings, self.sampling, self.rendering, self.tokenizer = (
            settings,
            sampling,
            rendering,
            tokenizer,
        )
        self.endpoints = [e.rstrip("/") for e in settings.endpoints]
        self.headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
        self.stop_ids = stop_token_ids(tokenizer, rendering) if tokenizer is not None else []
        self.model: str | None = None  # learnt from /models on first use (a replica may be restarting now)
        self.context: int | None = None
        self._open = dict.fromkeys(self.endpoints, 0)

    async def _discover(self, client: httpx.AsyncClient) -> None:
        """The model name to ask for and its context length, from `/models` (vLLM reports `max_model_len`;
        servers that do not get no limit), retried like any request."""
        try:
            models = (await self._request(client, "GET", "/models")).get("data") or []
        except RequestFailed as err:
            if not self.settings.model:
                raise
            log.warning(
                "regenerate: /models failed (%s); asking for regen.model without a context limit", err
            )
            models = []
        name = self.settings.model or (models[0]["id"] if models else None)
        if name is None:
            raise ConfigError(f"{self.endpoints[0]}/models lists no model; set regen.model")
        entry = next((m for m in models if m.get("id") == name), {})
        self.model, self.context = name, entry.get("max_model_len")

    def answer(self, rows: list[dict], first_index: int, emit: Emit) -> None:
        asyncio.run(self._answer_all(rows, emit))

    async def _answer_all(self, rows: list[dict], emit: Emit) -> None:
        queue: asyncio.Queue[dict] = asyncio.Queue()
        for row in rows:
            queue.put_nowait(row)
        limits = httpx.Limits(max_connections=self.settings.concurrency + len(self.endpoints))
        async with httpx.AsyncClient(limits=limits, timeout=self.settings.timeout_s) as client:
            if self.model is None:
                try:
                    await self._discover(client)
                except RequestFailed as err:  # every row fails alike; the next run asks again
                    log.warning("regenerate: no endpoint answered /models: %s", err)
                    emit([{"id": row["id"], "error": f"/models: {err}"} for row in rows])
                    return

            async def worker() -> None:
                while not queue.empty():
                    row = queue.get_nowait()
                    try:
                        out = await self._answer_row(client, row)
                    except RequestFailed as err:
                        log.warning("regenerate: row %s failed: %s", row["id"], err)
                        out = {"id": row["id"], "error": str(err)}
                    emit([out])

            await asyncio.gather(*(worker() for _ in range(min(self.settings.concurrency, len(rows)))))

    async def _answer_row(self, client: httpx.AsyncClient, row: dict) -> dict:
        conversation: list[dict] = []
        cut, completion, prompt_tokens = False, 0, 0
        for turn, new_turns in enumerate(rounds(row)):
            conversation += new_turns
            reply = await self._ask(client, row["id"], turn, conversation)
            if reply is None:  # no room in the context for an answer
                cut = True
                break
            conversation.append({"role": "assistant", "content": reply.text})
            cut = cut or reply.cut
            completion += reply.completion_tokens
            prompt_tokens += reply.prompt_tokens
        return record(row, conversation, cut, completion, prompt_tokens)

    async def _ask(self, client, row_id: str, turn: int, conversation: list[dict]) -> _Reply | None:
        s = self.sampling
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
        }
        if s.temperature > 0:
            body["top_p"] = s.top_p
        if self.settings.api == "completions":
            ids = render_prompt(self.tokenizer, conversation, **self.rendering.kwargs())
            if self.context is not None:
                if len(ids) >= self.context:
                    _log_no_room(row_id, turn, len(ids), self.context)
                    return None
                body["max_tokens"] = min(s.max_new_tokens, self.context - len(ids))
            # vLLM's extensions: top_k, stop at the template's end-of-turn ids, plain text out
            body.update(prompt=ids, stop_token_ids=self.stop_ids, skip_special_tokens=True)
            if s.temperature > 0 and s.top_k > 0:
                body["top_k"] = s.top_k
            choice, usage = await self._post(client, "/completions", {**body, **self.settings.extra_body})
            text = choice.get("text") or ""
        else:
            messages = conversation
            system = self.rendering.system_prompt
            if system is not None and conversation[0]["role"] != "system":
                messages = [{"role": "system", "content": system}, *conversation]
            body["messages"] = messages
            choice, usage = await self._post(
                client, "/chat/completions", {**body, **self.settings.extra_body}
            )
            message = choice.get("message") or {}
            text = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if reasoning:  # stored the way the chat template renders a thinking answer
                text = f"<think>\n{reasoning.strip()}\n</think>\n\n{text.lstrip()}"
        return _Reply(
            text=text,
            cut=choice.get("finish_reason") == "length",
            completion_tokens=int(usage.get("completion_tokens") or 0),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
        )

    async def _post(self, client: httpx.AsyncClient, path: str, body: dict) -> tuple[dict, dict]:
        """The first choice and the usage of a successful completion; RequestFailed otherwise."""
        data = await self._request(client, "POST", path, body)
        choices = data.get("choices") or []
        if not choices:
            raise RequestFailed(f"{path}: a reply with no choices: {json.dumps(data)[:300]}")
        return choices[0], data.get("usage") or {}

    async def _request(
        self, client: httpx.AsyncClient, method: str, path: str, body: dict | None = None
    ) -> dict:
        """The JSON of a 200 answer from some replica, transient failures retried; else RequestFailed."""
        problem, last = "", None
        for attempt in range(self.settings.max_retries + 1):
            endpoint = self._pick(avoid=last)
            self._open[endpoint] += 1
            try:
                resp = await client.request(method, f"{endpoint}{path}", json=body, headers=self.headers)
            except httpx.TransportError as err:  # refused, reset, timed out: the replica may be restarting
                problem = f"{endpoint}{path}: {type(err).__name__}: {err}"
            else:
                if resp.status_code == 200:
                    try:
                        return resp.json()
                    except ValueError as err:
                        raise RequestFailed(f"{endpoint}{path}: not JSON: {resp.text[:300]}") from err
                problem = f"{endpoint}{path}: HTTP {resp.status_code}: {resp.text[:300]}"
                if resp.status_code not in TRANSIENT_STATUS:
                    raise RequestFailed(problem)
            finally:
                self._open[endpoint] -= 1
            last = endpoint
            if attempt < self.settings.max_retries:
                wait = min(self.settings.backoff_max_s, self.settings.backoff_s * 2**attempt)
                log.info("regenerate: retry %d in %.1fs after %s", attempt + 1, wait, problem)
                await asyncio.sleep(wait * random.uniform(0.5, 1.0))
        raise RequestFailed(f"gave up after {self.settings.max_retries + 1} attempts; last: {problem}")

    def _pick(self, avoid: str | None) -> str:
        choices = [e for e in self.endpoints if e != avoid] or self.endpoints
        return min(choices, key=lambda e: self._open[e])
