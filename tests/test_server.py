"""`pyrestkv serve` on the real model: a real server process on a loopback port, the official
`openai` client, documents longer than the cache, bad input, and a bounded load."""

import contextlib
import inspect
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason='the server tests need the test extra: pip install ".[test]"')
pytest.importorskip("fastapi", reason='pyrestkv serve needs its extra: pip install ".[serve]"')

import llama_cpp  # noqa: E402  (after pyrestkv, which the conftest imports)
from llama_cpp.server.settings import ModelSettings, ServerSettings  # noqa: E402

from pyrestkv import server  # noqa: E402
from pyrestkv.cli import main  # noqa: E402
from pyrestkv.haystack import make_document  # noqa: E402
from pyrestkv.qa import qa_messages  # noqa: E402

HOST = "127.0.0.1"
# the cache holds kv_budget + n_batch = 1,536 cells; the prompt is about 5,800 tokens
BUDGET, N_BATCH, N_CTX = 1024, 512, 1536
THREADS = str(int(os.environ.get("PYRESTKV_TEST_THREADS", os.cpu_count() or 2)))
MARIGOLD = "Important note: the rescue ship was called the Marigold."
QUESTION = "What was the rescue ship called?"
STARTUP_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _serve_command(*flags) -> list:
    return [sys.executable, "-m", "pyrestkv.cli", "serve", *flags]


def _get(port: int, path: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def _post_raw(port: int, path: str, body: bytes, timeout: float = 30):
    """(status, parsed JSON body) of a POST with this exact body."""
    request = urllib.request.Request(f"http://{HOST}:{port}{path}", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


class Server:
    def __init__(self, proc, port, log_path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="any", timeout=300, max_retries=0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kv_stats(self) -> dict:
        return _get(self.port, "/extras/kv_stats")


@contextlib.contextmanager
def _running_server(log_path: Path, *flags):
    """A server process on a free loopback port, ready (bounded wait), always terminated."""
    port = _free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            _serve_command("--host", HOST, "--port", str(port), "--n-threads", THREADS, "--n-threads-batch", THREADS,
                           *flags),
            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                _get(port, "/v1/models", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server was not ready after {STARTUP_S} s:\n{log_path.read_text()}")
                time.sleep(0.5)
        yield Server(proc, port, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with _running_server(log_path, "--kv-budget", str(BUDGET), "--n-batch", str(N_BATCH)) as running:
        yield running


@pytest.fixture(scope="module")
def document(model_path):
    import pyrestkv

    vocab = pyrestkv.Llama(model_path, n_ctx=512, verbose=False)
    try:
        return make_document(vocab, 6000, [(0.4, MARIGOLD)], seed=5)
    finally:
        vocab.close()


# ------------------------------------------------------------------ the documents


@pytest.mark.slow
def test_chat_answers_a_document_longer_than_the_cache_and_a_resent_turn_reads_only_its_new_tokens(served, document):
    messages = qa_messages(document, QUESTION)
    raw = served.client.chat.completions.with_raw_response.create(
        model="any", messages=messages, max_tokens=24, temperature=0)
    body = json.loads(raw.text)
    answer = body["choices"][0]["message"]["content"]
    assert "Marigold" in answer
    # the response model of non-streamed chat drops extra top-level keys: the figures are at /extras/kv_stats
    assert "kv" not in body and "timings" not in body

    stats = served.kv_stats()
    kv, timings = stats["last_request"]["kv"], stats["last_request"]["timings"]
    assert kv["policy"] == "restkv" and kv["budget"] == BUDGET
    assert kv["n_ctx"] == N_CTX  # derived from the budget, not the server's 2048
    assert kv["tokens_evicted"] > 4000 and kv["evictions"] > 0 and kv["truncated"] is True
    assert BUDGET < kv["cells_peak"] <= N_CTX and kv["cells_used"] <= N_CTX
    assert kv["scoring_passes"] > 0 and kv["scoring_ms"] > 0
    # question-aware: the probe is the rendered prompt's tail, the question and the assistant header
    assert kv["probe_tokens"] == 32
    assert stats["last_request"]["probe"].endswith(f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    assert timings["prompt_n"] == body["usage"]["prompt_tokens"] > 5500 and timings["cache_n"] == 0
    assert timings["predicted_n"] >= body["usage"]["completion_tokens"] > 0
    assert timings["prompt_ms"] > 0 and timings["prompt_per_second"] > 0 and timings["predicted_ms"] > 0
    seen_before = stats["kv_stats"]["tokens_seen"]

    # the client resends the whole conversation with a new turn: only that turn is read
    follow_up = "Thank you. Answer again in one word: what was the rescue ship called?"
    turn2 = messages + [{"role": "assistant", "content": answer}, {"role": "user", "content": follow_up}]
    out = served.client.chat.completions.create(model="any", messages=turn2, max_tokens=8, temperature=0)
    stats = served.kv_stats()
    timings = stats["last_request"]["timings"]
    n_follow_up = len(follow_up) // 2  # a generous bound on its tokens, with the chat template's
    assert timings["cache_n"] > 5500 and timings["prompt_n"] < n_follow_up + 16
    assert out.usage.prompt_tokens == timings["cache_n"] + timings["prompt_n"]
    grew = stats["kv_stats"]["tokens_seen"] - seen_before
    assert timings["prompt_n"] <= grew <= timings["prompt_n"] + 8  # the new turn and the answer's tokens
    # (no check of this answer: SmolLM2 gets this follow-up wrong from a fresh read of the whole prompt too)
    assert out.choices[0].message.content


@pytest.mark.slow
def test_streamed_chat_answers_and_its_last_chunk_carries_timings_and_kv(served, document):
    stream = served.client.chat.completions.create(
        model="any", messages=qa_messages(document, QUESTION), max_tokens=24, temperature=0, stream=True)
    pieces, last = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        last = chunk
    assert "Marigold" in "".join(pieces)
    assert last.choices[0].finish_reason is not None
    kv, timings = last.model_extra["kv"], last.model_extra["timings"]
    assert kv["tokens_evicted"] > 4000 and kv["cells_peak"] <= N_CTX and kv["truncated"] is True
    assert timings["prompt_n"] > 5000 and timings["predicted_n"] > 0
    # the same figures at /extras/kv_stats
    assert served.kv_stats()["last_request"]["kv"] == kv


# ------------------------------------------------------------------ bad input


def test_bad_requests_get_a_400_that_says_why_and_the_server_keeps_serving(served):
    status, body = _post_raw(served.port, "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _post_raw(served.port, "/v1/completions", b"[1, 2]")
    assert status == 400 and "JSON object" in body["error"]["message"]
    for max_tokens in (0, -5):
        with pytest.raises(openai.BadRequestError, match="max_tokens must be a positive integer"):
            served.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=max_tokens)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be a positive integer"):
        served.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=0, stream=True)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be a positive integer"):
        served.client.completions.create(model="any", prompt="Hi", max_tokens=0)
    # logprobs need --logits-all, off by default here (the server's default is on)
    with pytest.raises(openai.BadRequestError, match="--logits-all true"):
        served.client.completions.create(model="any", prompt="Hi", max_tokens=2, logprobs=2)
    with pytest.raises(openai.BadRequestError, match="--logits-all true"):
        served.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2, logprobs=True, top_logprobs=2)
    # a field the request model rejects: a 400 naming it, not the server's 500
    status, body = _post_raw(served.port, "/v1/chat/completions", json.dumps({"messages": "hi"}).encode())
    assert status == 400 and body["error"]["message"].startswith("messages")
    requests = served.kv_stats()["requests"]
    out = served.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Say hello."}],
                                                max_tokens=8, temperature=0)
    assert out.choices[0].message.content and served.proc.poll() is None
    assert served.kv_stats()["requests"] == requests + 1  # none of the bad ones reached the model


def test_a_request_without_max_tokens_is_answered(served):
    out = served.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Say hello."}],
                                                temperature=0)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content


def test_completions_carry_the_figures_on_the_last_chunk_of_a_stream_only(served):
    chunks = list(served.client.completions.create(model="any", prompt="The sky is", max_tokens=4, temperature=0,
                                                   stream=True))
    assert chunks[-1].choices[0].finish_reason is not None
    assert chunks[-1].model_extra["timings"]["predicted_n"] >= 4 and chunks[-1].model_extra["kv"]["policy"] == "restkv"
    assert all("kv" not in (c.model_extra or {}) for c in chunks[:-1])
    raw = served.client.completions.with_raw_response.create(model="any", prompt="The sky is", max_tokens=4)
    assert "kv" not in json.loads(raw.text)  # dropped by the non-streamed response model
    assert served.kv_stats()["last_request"]["timings"]["predicted_n"] >= 4


def test_without_max_tokens_the_answer_stops_at_the_default(model_path):
    # an evicting cache has no window to stop at: the server's default bounds the answer
    llm = server.load_served_llama(server.KVModelSettings(model=model_path, kv_budget=128, n_batch=128,
                                                          default_max_tokens=5, n_threads=int(THREADS)))
    try:
        out = llm.create_completion("Count: 1, 2, 3, 4,", max_tokens=None, temperature=0)
        assert out["usage"]["completion_tokens"] == 5 and out["choices"][0]["finish_reason"] == "length"
        assert out["kv"]["policy"] == "restkv" and out["timings"]["predicted_n"] == 5
        assert llm.last_request["timings"] == out["timings"]
        with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
            llm.create_completion("Count:", max_tokens=0)
    finally:
        llm.close()


def test_full_policy_refuses_a_prompt_longer_than_the_cache_as_the_server_does(tmp_path, model_path):
    import pyrestkv

    vocab = pyrestkv.Llama(model_path, n_ctx=512, verbose=False)
    text = make_document(vocab, 700, [], seed=2)
    vocab.close()
    with _running_server(tmp_path / "full.log", "--kv-policy", "full", "--n-ctx", "512") as full:
        with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens"):
            full.client.chat.completions.create(model="any", messages=[{"role": "user", "content": text}],
                                                max_tokens=8)
        out = full.client.chat.completions.create(model="any", messages=[{"role": "user", "content": "Hi"}],
                                                  max_tokens=4)
        assert out.choices[0].message.content
        assert full.kv_stats()["last_request"]["kv"]["policy"] == "full"


def test_logprobs_with_logits_all_under_eviction(tmp_path, model_path):
    import pyrestkv

    vocab = pyrestkv.Llama(model_path, n_ctx=512, verbose=False)
    text = make_document(vocab, 400, [], seed=3)
    vocab.close()
    with _running_server(tmp_path / "logits.log", "--logits-all", "true", "--kv-budget", "128", "--n-batch", "128") as srv:
        out = srv.client.completions.create(model="any", prompt=text, max_tokens=3, temperature=0, logprobs=2)
        assert len(out.choices[0].logprobs.token_logprobs) == 3
        assert srv.kv_stats()["last_request"]["kv"]["tokens_evicted"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--kv-policy", "lru"], "invalid choice: 'lru'"),
    (["--kv-budget", "0"], "--kv-budget: Input should be greater than or equal to 1"),
    (["--kv-budget", "many"], "invalid int value: 'many'"),
    (["--kv-budget", "20"], "kv_budget=20 must be at least kv_window + kv_sink = 36"),
    (["--kv-policy", "shift", "--kv-budget", "512"], "kv_policy='shift' does not take kv_budget"),
    (["--n-ctx", "1040"], "n_ctx=1040 leaves no room to read past kv_budget=1024"),
    (["--model", "/nonexistent/model.gguf"], "model file not found"),
    (["--embedding", "true"], "unrecognized arguments: --embedding"),
])
def test_bad_start_up_settings_exit_with_a_clear_message(flags, message):
    proc = subprocess.run(_serve_command("--port", str(_free_port()), *flags), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_file_and_refused_settings_are_errors(monkeypatch, model_path):
    with pytest.raises(ValueError, match="does not take embedding"):
        server.load_served_llama(server.KVModelSettings(model=model_path, embedding=True))
    monkeypatch.setenv("CONFIG_FILE", "/tmp/models.json")
    with pytest.raises(SystemExit, match="not from CONFIG_FILE; unset it"):
        main(["serve", "--port", str(_free_port())])


def test_serve_names_the_missing_extra(monkeypatch):
    import pyrestkv

    monkeypatch.delitem(sys.modules, "pyrestkv.server")
    monkeypatch.delattr(pyrestkv, "server")
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(SystemExit, match=r'uvicorn is missing.*pip install "pyrestkv\[serve\]"'):
        main(["serve"])


def test_settings_cover_the_servers_model_settings():
    """Every ModelSettings field is passed on, ours, or refused, and what is passed on is a Llama keyword
    (this fails when a llama-cpp-python upgrade adds a setting)."""
    ours = {"model", "model_alias", "n_ctx", "default_max_tokens", "kv_policy", *server.POLICY_KEYWORDS}
    handled = set(server.LLAMA_KEYWORDS) | set(server.REFUSED) | set(server.UNUSED) | ours
    assert set(ModelSettings.model_fields) <= handled
    assert set(server.ServeSettings.model_fields) == handled | set(ServerSettings.model_fields)
    llama_params = inspect.signature(llama_cpp.Llama.__init__).parameters
    assert [k for k in server.LLAMA_KEYWORDS if k not in llama_params] == []
    settings = server.KVModelSettings(model="m.gguf")
    assert settings.n_ctx is None and settings.logits_all is False and settings.kv_policy == "restkv"
    assert server.ServeSettings(model="m.gguf").host == "127.0.0.1"


@pytest.mark.parametrize("settings, n_ctx", [
    ({}, BUDGET + 512),  # kv_budget 1024 + n_batch 512, not the server's 2048
    ({"kv_budget": 256, "n_batch": 256}, 256 + 256),
    ({"kv_budget": 256, "n_ctx": 0}, 256 + 512),
    ({"kv_policy": "shift"}, 2048),
    ({"kv_policy": "full"}, 2048),
])
def test_the_cache_size_defaults_to_what_the_policy_needs(model_path, settings, n_ctx):
    llm = server.load_served_llama(server.KVModelSettings(model=model_path, **settings))
    try:
        assert llm.n_ctx() == n_ctx and llm._logits_all is False and llm.default_max_tokens == n_ctx
        if settings.get("kv_policy") == "shift":
            assert llm.kv_policy.n_keep == server.DEFAULT_N_KEEP
    finally:
        llm.close()


def test_serve_help_lists_our_flags_and_the_servers(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--kv-policy", "--kv-budget", "--n-ctx", "--host", "--port", "--model", "--n_gpu_layers", "--chat-format"):
        assert flag in out
    assert "--clip-model-path" not in out


# ------------------------------------------------------------------ load


def test_twenty_requests_four_at_a_time_are_all_answered_with_bounded_memory(served):
    """20 short chat requests from 4 threads: every one answered, one log line each, no crash, and
    resident memory after the last within 64 MiB of what it was after the first."""
    def ask(i: int):
        return served.client.chat.completions.create(
            model="any", messages=[{"role": "user", "content": f"Name a colour. Request {i}."}], max_tokens=12,
            temperature=0)

    first = ask(0)
    assert first.choices[0].message.content
    rss_first = _rss_kib(served.proc.pid)
    lines_before = served.log().count(":     request ")
    answers, errors = {}, []

    def worker(ids):
        for i in ids:
            try:
                answers[i] = ask(i).choices[0].message.content
            except Exception as e:  # noqa: BLE001  (collected and reported below)
                errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(range(1 + t, 20, 4),)) for t in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "requests still running after 240 s"
    assert errors == []
    assert sorted(answers) == list(range(1, 20)) and all(answers.values())
    assert served.proc.poll() is None
    rss_last = _rss_kib(served.proc.pid)
    print(f"\n20 requests in {time.monotonic() - t0:.1f} s; RSS after the first {rss_first / 1024:.1f} MiB, "
          f"after the last {rss_last / 1024:.1f} MiB")
    assert rss_last - rss_first < 64 * 1024
    log = served.log()
    assert log.count(":     request ") - lines_before == 19 and "Traceback" not in log
