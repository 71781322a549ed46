"""VLLMServerPool: process supervision against a stand-in server (fast, no vLLM), then real vLLM serving
SmolLM2-135M-Instruct on the CPU (integration: the `vllm_pool` session fixture, `make vllm`)."""

from __future__ import annotations

import json
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from deepspec.models.errors import ConfigError
from deepspec.tasks.vllm_server import VLLMServerError, VLLMServerPool, group_alive

# A stand-in for `python -m vllm.entrypoints.openai.api_server --model MODEL --port P ...`: answers
# /health and /v1/models like vLLM and, like vLLM's engine core, leaves a child process in its group.
# $FAKE_VLLM picks a failure: `fail` exits at once, `hang` never serves, `ignore-term` survives SIGTERM.
FAKE_SERVER = """
import http.server, json, os, signal, subprocess, sys, time
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
name = args[args.index("--served-model-name") + 1]
mode = os.environ.get("FAKE_VLLM", "ok")
print("fake vllm", " ".join(args), flush=True)
if mode == "fail":
    print("ValueError: this model is not supported", flush=True)
    sys.exit(3)
if mode == "hang":
    time.sleep(600)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["FAKE_VLLM_CHILDREN"], "a") as f:
    f.write(f"{child.pid}\\n")

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/health": {}, "/v1/models": {"data": [{"id": name}]}}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *a):
        pass

http.server.HTTPServer.allow_reuse_address = True
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def fake_python(tmp_path, monkeypatch) -> str:
    path = tmp_path / "fake-python"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(FAKE_SERVER))
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_VLLM_CHILDREN", str(tmp_path / "children.txt"))
    return str(path)


def children(tmp_path: Path) -> list[int]:
    return [int(x) for x in (tmp_path / "children.txt").read_text().split()]


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def get_json(url: str, body: dict | None = None, timeout_s: float = 300.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def make_pool(python: str, tmp_path: Path, **kw) -> VLLMServerPool:
    kw = {"replicas": 2, "log_dir": tmp_path / "logs", "startup_timeout_s": 30, "stop_grace_s": 5} | kw
    return VLLMServerPool(model="tiny-model", python=python, **kw)


def test_pool_serves_and_close_leaves_no_process(fake_python, tmp_path):
    with make_pool(fake_python, tmp_path) as pool:
        assert len(set(pool.endpoints)) == 2
        assert all(e.startswith("http://127.0.0.1:") and e.endswith("/v1") for e in pool.endpoints)
        assert pool.served_model_name == "tiny-model"
        for e in pool.endpoints:
            assert get_json(f"{e}/models")["data"][0]["id"] == "tiny-model"
        pgids = list(pool.pids)
        assert all(pgids) and all(pid_alive(c) for c in children(tmp_path))
        args = (tmp_path / "logs" / "vllm-0.log").read_text()
        assert "--model tiny-model" in args and "--seed 0" in args and "--enforce-eager" in args
    assert not any(group_alive(g) for g in pgids)
    assert not any(pid_alive(c) for c in children(tmp_path))  # vLLM's children go with the group
    pool.close()  # twice is fine


def test_kill_replica_then_restart_dead_same_port(fake_python, tmp_path):
    with make_pool(fake_python, tmp_path, supervise_interval_s=3600) as pool:
        before, old = list(pool.endpoints), pool.pids[0]
        pool.kill_replica(0)
        assert pool.pids[0] is None and not group_alive(old)
        assert pool.restart_dead() == [0]
        assert pool.endpoints == before and pool.restarts == [1, 0]
        assert pool.pids[0] not in (None, old)
        assert get_json(f"{pool.endpoints[0]}/models")["data"][0]["id"] == "tiny-model"
        assert pool.restart_dead() == []  # nothing dead now
        assert "starting replica 0" in (tmp_path / "logs" / "vllm-0.log").read_text().split("====")[-2]


def test_supervisor_restarts_a_dead_replica(fake_python, tmp_path):
    with make_pool(fake_python, tmp_path, replicas=1, supervise_interval_s=0.2) as pool:
        pool.kill_replica(0)
        deadline = time.monotonic() + 30
        while pool.restarts != [1] or pool.pids[0] is None:
            assert time.monotonic() < deadline, "the supervisor did not restart the replica"
            time.sleep(0.1)
        deadline = time.monotonic() + 30
        while True:  # it serves again on the same endpoint
            try:
                assert get_json(f"{pool.endpoints[0]}/models", timeout_s=2)["data"]
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)


def test_failed_start_quotes_the_log(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM", "fail")
    pool = make_pool(fake_python, tmp_path)
    with pytest.raises(VLLMServerError) as err:
        pool.start()
    message = str(err.value)
    assert "exited with code 3" in message
    assert "ValueError: this model is not supported" in message
    assert str(tmp_path / "logs" / "vllm-") in message
    assert not any(pool.pids)


def test_start_timeout_kills_the_replica(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM", "hang")
    pool = make_pool(fake_python, tmp_path, replicas=1, startup_timeout_s=2)
    with pytest.raises(VLLMServerError, match="did not serve within 2 s") as err:
        pool.start()
    assert "fake vllm -m vllm.entrypoints.openai.api_server --model tiny-model" in str(err.value)
    assert not any(pool.pids)


def test_sigterm_ignored_then_sigkill(fake_python, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM", "ignore-term")
    pool = make_pool(fake_python, tmp_path, replicas=1, stop_grace_s=1).start()
    pgid = pool.pids[0]
    t = time.monotonic()
    pool.close()
    assert time.monotonic() - t < 10 and not group_alive(pgid)


def test_cpu_and_gpu_environment(fake_python, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cpu = make_pool(fake_python, tmp_path, replicas=2)
    env = cpu._env(0, "0")
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    gpu = make_pool(fake_python, tmp_path, replicas=2, gpus_per_replica=2)
    assert [gpu._env(i, None)["CUDA_VISIBLE_DEVICES"] for i in range(2)] == ["4,5", "6,7"]
    with pytest.raises(ConfigError, match="needs 6 GPUs"):
        make_pool(fake_python, tmp_path, replicas=3, gpus_per_replica=2)._env(2, None)


def test_missing_python_names_make_vllm(tmp_path):
    with pytest.raises(ConfigError, match="make vllm"):
        VLLMServerPool(model="m", python=str(tmp_path / "nope" / "python"))


# ----------------------------------------------------------------------------------------------------
# real vLLM (vllm-cpu in .venv-vllm) serving SmolLM2-135M-Instruct


@pytest.mark.integration
def test_completions_from_token_ids_match_transformers_greedy(vllm_pool, smollm2_hf_dir):
    import torch

    from deepspec.models.target import load_target

    model, tokenizer = load_target(smollm2_hf_dir, dtype="float32")
    messages = [{"role": "user", "content": "Name three colors of the rainbow."}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    ids = [int(i) for i in ids]
    n = 24
    body = {"model": vllm_pool.served_model_name, "prompt": ids, "max_tokens": n, "temperature": 0}
    out = get_json(f"{vllm_pool.endpoints[0]}/completions", body | {"return_token_ids": True})
    choice = out["choices"][0]
    assert choice["text"] and out["usage"]["prompt_tokens"] == len(ids)
    assert out["usage"]["completion_tokens"] == len(choice["token_ids"]) > 0
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=2)
    ref_ids = ref[0, len(ids) :].tolist()
    assert choice["token_ids"] == ref_ids[: len(choice["token_ids"])]
    assert choice["text"] == tokenizer.decode(choice["token_ids"], skip_special_tokens=True)


@pytest.mark.integration
def test_killed_replica_comes_back_on_the_same_port(vllm_pool):
    endpoint, old = vllm_pool.endpoints[0], vllm_pool.pids[0]
    vllm_pool.kill_replica(0)
    assert not group_alive(old)  # the engine-core and worker processes went with the server
    # the supervisor may get there first; then restart_dead waits for it and finds nothing dead
    assert vllm_pool.restart_dead() in ([0], [])
    assert vllm_pool.endpoints[0] == endpoint and vllm_pool.pids[0] not in (None, old)
    body = {"model": vllm_pool.served_model_name, "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
    assert get_json(f"{endpoint}/completions", body)["usage"]["completion_tokens"] > 0


def test_servers_die_with_a_killed_parent(vllm_python, smollm2_hf_dir, tmp_path):
    """A process that started real vLLM servers and is killed outright (SIGKILL: no cleanup runs) leaves
    none behind: the server's parent-death signal starts vLLM's own shutdown, engine and workers too."""
    import os
    import signal
    import subprocess

    parent_code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from deepspec.tasks.vllm_server import VLLMServerPool
        pool = VLLMServerPool(model={smollm2_hf_dir!r}, replicas=1, python={vllm_python!r},
                              dtype="float32", max_model_len=1024, seed=0, log_dir=Path({str(tmp_path)!r}),
                              startup_timeout_s=600)
        pool.start()
        print(pool.pids[0], flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    group = int(parent.stdout.readline() or 0)
    assert group, f"the servers did not start: {(tmp_path / 'vllm-0.log').read_text()[-3000:]}"
    assert group_alive(group)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60
    while group_alive(group) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = group_alive(group)
    if left:
        os.killpg(group, signal.SIGKILL)
    assert not left, "vLLM processes outlived the process that started them"
