"""A small OpenAI-compatible HTTP server over a real transformers model, for the HTTP backend's tests.

It speaks the parts of vLLM's API the `vllm`/`openai` backends use (`/v1/models` with `max_model_len`,
`/v1/completions` with token-id prompts and `stop_token_ids`, `/v1/chat/completions`), greedy only, and
can be told to fail: the next N requests with a status code, or every request whose prompt contains a
marker. The vLLM server itself is tested in test_vllm_server.py; this one runs in milliseconds, so the
retry, failure and resume paths can be tested in every CI run.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch


class LocalOpenAIServer:
    def __init__(self, model, tokenizer, name: str = "local-model", context: int = 512):
        self.model, self.tokenizer, self.name, self.context = model, tokenizer, name, context
        self.fail_next: list[int] = []  # status codes for the next requests, one each
        self.fail_marker: tuple[str, int] | None = None  # (text in the prompt, status) fails for good
        self.requests: list[dict] = []  # every request: path, headers, body
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> LocalOpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @torch.no_grad()
    def generate(self, ids: list[int], max_tokens: int, stop_ids: list[int]) -> tuple[list[int], str]:
        with self.lock:  # one forward at a time: the model is shared
            out = self.model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stop_ids or None,
                pad_token_id=self.tokenizer.eos_token_id,
            )[0, len(ids) :].tolist()
        stop_at = next((k for k, t in enumerate(out) if t in stop_ids), None)
        if stop_at is not None:
            return out[: stop_at + 1], "stop"
        return out, "length"

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._reply(200, {"data": [{"id": server.name, "max_model_len": server.context}]})
                else:
                    self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status = server.fail_next.pop(0) if server.fail_next else None
                if status is not None:
                    return self._reply(status, {"error": f"injected {status}"})
                tok = server.tokenizer
                if self.path == "/v1/completions":
                    ids = body["prompt"]
                    stop_ids = list(body.get("stop_token_ids") or [])
                elif self.path == "/v1/chat/completions":  # a "server-side template": the plain rendering
                    ids = [tok.bos_token_id]
                    for m in body["messages"]:
                        ids += tok(m["content"], add_special_tokens=False)["input_ids"]
                    stop_ids = [tok.eos_token_id]
                else:
                    return self._reply(404, {"error": "not found"})
                marker = server.fail_marker
                if marker is not None and marker[0] in tok.decode(ids):
                    return self._reply(marker[1], {"error": "this prompt is refused"})
                new, finish = server.generate(ids, int(body["max_tokens"]), stop_ids)
                text = tok.decode([t for t in new if t not in stop_ids], skip_special_tokens=True)
                usage = {"prompt_tokens": len(ids), "completion_tokens": len(new)}
                if self.path == "/v1/completions":
                    choice = {"index": 0, "text": text, "finish_reason": finish}
                else:
                    message = {"role": "assistant", "content": text}
                    choice = {"index": 0, "message": message, "finish_reason": finish}
                self._reply(200, {"choices": [choice], "usage": usage})

        return Handler
