"""The interp stage's LLM client layer: the local backend on the real SmolLM2 model, the OpenAI
client against a real OpenAI-compatible server on loopback (interp.serve, over the local model),
the cache, retries, concurrency, rate limiting, and the one-line errors of bad settings.

Nothing here mocks HTTP: the server is real, on 127.0.0.1. The Hugging Face Hub and hosted APIs
(OpenAI) cannot be reached from the test machines, so the openai backend is tested against our
own server only. The fake backends below stand in for a model where the LLM class's logic
(ordering, concurrency, dedup, retries) is what a test checks, not a model's answers.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from distributed_sae.config import ConfigError
from distributed_sae.interp.cache import CompletionCache
from distributed_sae.interp.llm import LLM, TransientError, Usage, make_backend
from distributed_sae.interp.openai_backend import OpenAIBackend
from distributed_sae.interp.serve import main as serve_main
from distributed_sae.interp.serve import serve
from distributed_sae.interp.types import Completion, Message, Request

KEY_ENV = "DSAE_TEST_INTERP_KEY"
SECRET = "sk-test-4f1d9a0c7e2b48d6"  # a made-up key: grepped for in the cache


def ask(text: str, max_tokens: int = 6, **kw) -> Request:
    """A one-message chat request."""
    return Request(messages=(Message("user", text),), max_tokens=max_tokens, **kw)


class EchoBackend:
    """A fast stand-in model: answers 'echo: <last message>', optionally after a delay, and
    records how many calls run at once."""

    def __init__(self, delay: float = 0.0, delays: dict[str, float] | None = None,
                 barrier: threading.Barrier | None = None) -> None:
        self.id = "echo:test"
        self.delay = delay
        self.delays = delays or {}
        self.barrier = barrier
        self.calls: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def complete(self, request: Request) -> Completion:
        text = request.messages[-1].content
        with self._lock:
            self.calls.append(text)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=20)  # breaks unless `parties` calls run at once
            time.sleep(self.delays.get(text, self.delay))
            return Completion(text=f"echo: {text}", prompt_tokens=1000, completion_tokens=500)
        finally:
            with self._lock:
                self.in_flight -= 1


class FlakyBackend(EchoBackend):
    """Fails the first `failures` calls with TransientError(retry_after), then echoes."""

    def __init__(self, failures: int, retry_after: float | None = None) -> None:
        super().__init__()
        self.failures = failures
        self.retry_after = retry_after

    def complete(self, request: Request) -> Completion:
        with self._lock:
            self.failures -= 1
            fail = self.failures >= 0
        if fail:
            raise TransientError("flaky", retry_after=self.retry_after)
        return super().complete(request)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def local():
    """The real SmolLM2-135M-Instruct backend, loaded once (~20-30 s)."""
    import torch

    from distributed_sae.interp.local_backend import LocalBackend

    # One torch thread: the test machines share 2 cores with CI runs, and a contended 2-thread
    # pool made one-token decoding ~7x slower than a single thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = LocalBackend("smollm2-135m")
    backend.load()
    yield backend
    torch.set_num_threads(threads)


# --- the local backend, on the real model ----------------------------------------------------


def test_local_backend_greedy_and_logprobs(local):
    request = ask("Name one color.", max_tokens=5, top_logprobs=5)
    first = local.complete(request)
    assert first.text.strip()
    assert first.prompt_tokens > 0 and 0 < first.completion_tokens <= 5
    assert first.logprobs is not None and len(first.logprobs) == first.completion_tokens
    for token, top in first.logprobs:
        assert isinstance(token, str) and len(top) == 5
        assert all(v <= 0 for v in top.values())
    assert first.logprobs[0][0] in first.logprobs[0][1]  # greedy: the pick is the top candidate
    assert local.complete(request).text == first.text  # greedy is deterministic
    # Sampling is seeded from the request, so a rerun gets the same answer too.
    sampled = ask("Name one color.", max_tokens=5, temperature=0.9)
    assert local.complete(sampled).text == local.complete(sampled).text


# --- the OpenAI client against a real server over the local model ----------------------------


def test_openai_client_over_loopback_server(local, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    requests = [ask(f"Say the word {w}.", max_tokens=4)
                for w in ("apple", "river", "stone", "cloud", "green", "seven")]
    direct = [local.complete(r).text for r in requests]
    with serve(local, "smollm2-135m", api_key=SECRET, fail_every=3) as server:
        backend = OpenAIBackend(server.url, "smollm2-135m", api_key_env=KEY_ENV, timeout_s=60)
        backend.check()
        assert SECRET not in backend.id
        llm = LLM(backend, tmp_path / "cache", concurrency=3, max_retries=5, backoff_s=0.01,
                  max_backoff_s=0.05, cost_per_1k_prompt=1.0)
        answers = llm.complete_many(requests, desc="test")
        assert [a.text for a in answers] == direct
        assert not any(a.cached for a in answers)
        usage = llm.usage
        assert usage.failed_attempts >= 1  # the server failed every 3rd request on purpose
        assert usage.requests == len(requests) + usage.failed_attempts
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.cost == pytest.approx(usage.prompt_tokens / 1000)

        served, received = server.requests_served, server.requests_received
        again = LLM(backend, tmp_path / "cache").complete_many(requests)
        assert [a.text for a in again] == direct and all(a.cached for a in again)
        assert (server.requests_served, server.requests_received) == (served, received)

    files = list((tmp_path / "cache").rglob("*"))
    assert sum(f.suffix == ".json" for f in files) == len(requests)
    for f in files:
        if f.is_file():
            assert SECRET not in f.read_text(), f"the API key leaked into {f}"


def test_logprobs_over_http(tmp_path, monkeypatch):
    """top_logprobs travel through the server and back into Completion.logprobs."""

    class LogprobBackend(EchoBackend):
        def complete(self, request: Request) -> Completion:
            top = {"a": -0.1, "b": -2.5, "c": -3.0}
            return Completion("a", logprobs=[("a", dict(list(top.items())[:request.top_logprobs]))],
                              prompt_tokens=3, completion_tokens=1)

    with serve(LogprobBackend(), "m") as server:
        got = OpenAIBackend(server.url, "m", api_key_env=KEY_ENV).complete(ask("x", top_logprobs=2))
    assert got.text == "a" and got.logprobs == [("a", {"a": -0.1, "b": -2.5})]
    assert (got.prompt_tokens, got.completion_tokens) == (3, 1)


# --- bad settings: one-line ConfigErrors naming the setting ----------------------------------


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_unreachable_endpoint():
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAIBackend(url, "m", api_key_env=KEY_ENV, timeout_s=5)
    with pytest.raises(ConfigError) as err:
        backend.check()
    message = one_line(err)
    assert f"interp.base_url={url}" in message and "cannot connect" in message
    with pytest.raises(TransientError):  # a call (not the check) is retryable
        backend.complete(ask("x"))


def test_wrong_or_missing_key(monkeypatch):
    with serve(EchoBackend(), "m", api_key=SECRET) as server:
        monkeypatch.setenv(KEY_ENV, "sk-wrong")
        backend = OpenAIBackend(server.url, "m", api_key_env=KEY_ENV)
        with pytest.raises(ConfigError) as err:
            backend.check()
        message = one_line(err)
        assert "interp.base_url=" in message and f"${KEY_ENV}" in message and "401" in message
        assert "sk-wrong" not in message
        with pytest.raises(ConfigError, match=r"refused the key"):
            backend.complete(ask("x"))
        monkeypatch.delenv(KEY_ENV)
        with pytest.raises(ConfigError, match=rf"\${KEY_ENV} is unset"):
            backend.check()


def test_model_the_server_lacks():
    with serve(EchoBackend(), "served-model") as server:
        backend = OpenAIBackend(server.url, "no-such-model", api_key_env=KEY_ENV)
        with pytest.raises(ConfigError) as err:
            backend.check()
        assert one_line(err).startswith("interp.model=no-such-model is not served by")
        assert "served-model" in str(err.value)
        with pytest.raises(ConfigError, match=r"^interp.model=no-such-model"):
            backend.complete(ask("x"))


def test_bad_backend_name():
    with pytest.raises(ConfigError) as err:
        make_backend("ollama", "m", "http://127.0.0.1:1/v1", KEY_ENV, 5.0)
    message = one_line(err)
    assert "interp.backend='ollama'" in message and "local" in message and "openai" in message
    assert make_backend("openai", "m", "http://h/v1", KEY_ENV, 5.0).id == "openai:http://h/v1:m"
    assert make_backend("local", "smollm2-135m", "", KEY_ENV, 5.0).id == "local:smollm2-135m"


# --- the cache -------------------------------------------------------------------------------


def test_truncated_cache_entry_is_a_miss_and_rewritten(tmp_path):
    backend = EchoBackend()
    request = ask("hello")
    assert LLM(backend, tmp_path).complete(request).text == "echo: hello"
    path = CompletionCache(tmp_path).path(request.key(backend.id))
    path.write_text(path.read_text()[:20])  # a kill mid-write, on a filesystem without rename

    llm = LLM(backend, tmp_path)
    answer = llm.complete(request)
    assert answer.text == "echo: hello" and not answer.cached
    assert backend.calls == ["hello", "hello"] and llm.usage.cached == 0
    stored = json.loads(path.read_text())  # rewritten whole
    assert stored["completion"]["text"] == "echo: hello"
    assert stored["request"]["messages"][0]["content"] == "hello"
    assert llm.complete(request).cached and backend.calls == ["hello", "hello"]
    assert not list(path.parent.glob("*.tmp"))  # no temp files left behind


def test_cache_round_trips_logprobs(tmp_path):
    cache = CompletionCache(tmp_path)
    completion = Completion("x", logprobs=[("x", {"x": -0.5, "y": -1.5})], prompt_tokens=2,
                            completion_tokens=1)
    cache.put("ab" * 32, ask("q"), completion)
    hit = cache.get("ab" * 32)
    assert hit is not None and hit.cached and hit.logprobs == completion.logprobs
    assert cache.get("cd" * 32) is None and len(cache) == 1


# --- retries ---------------------------------------------------------------------------------


def test_retries_give_up_with_runtime_error():
    with serve(EchoBackend(), "m", fail_every=1) as server:
        backend = OpenAIBackend(server.url, "m", api_key_env=KEY_ENV)
        llm = LLM(backend, None, max_retries=3, backoff_s=0.01, max_backoff_s=0.02)
        with pytest.raises(RuntimeError) as err:
            llm.complete(ask("x"))
        assert server.requests_received == 4
    message = str(err.value)
    assert backend.id in message and "4 attempts" in message and "503" in message
    assert llm.usage.failed_attempts == 4


def test_retry_after_is_honoured():
    backend = FlakyBackend(failures=1, retry_after=0.3)
    llm = LLM(backend, None, backoff_s=0.001)
    start = time.monotonic()
    assert llm.complete(ask("x")).text == "echo: x"
    assert time.monotonic() - start >= 0.28
    assert llm.usage.failed_attempts == 1 and llm.usage.requests == 2


def test_retry_after_header_over_http():
    with serve(EchoBackend(), "m", fail_every=1, retry_after=7) as server:
        with pytest.raises(TransientError) as err:
            OpenAIBackend(server.url, "m", api_key_env=KEY_ENV).complete(ask("x"))
    assert err.value.retry_after == 7


# --- concurrency, order, dedup, rate limit, usage --------------------------------------------


def test_complete_many_keeps_order_and_runs_concurrently():
    # Earlier requests take longer, so they finish last: the answers must still be in order.
    texts = [f"q{i}" for i in range(8)]
    backend = EchoBackend(delays={t: 0.05 * (8 - i) for i, t in enumerate(texts)},
                          barrier=threading.Barrier(4))
    answers = LLM(backend, None, concurrency=4).complete_many([ask(t) for t in texts])
    assert [a.text for a in answers] == [f"echo: {t}" for t in texts]
    assert backend.max_in_flight == 4  # the barrier proved 4 at once; the pool caps it at 4


def test_duplicates_in_a_batch_are_sent_once(tmp_path):
    backend = EchoBackend()
    requests = [ask("a"), ask("b"), ask("a"), ask("a")]
    answers = LLM(backend, tmp_path, concurrency=2).complete_many(requests)
    assert [a.text for a in answers] == ["echo: a", "echo: b", "echo: a", "echo: a"]
    assert sorted(backend.calls) == ["a", "b"]
    assert answers[0] is not answers[2]


def test_config_error_cancels_the_rest():
    class Refusing(EchoBackend):
        def complete(self, request: Request) -> Completion:
            super().complete(request)
            raise ConfigError("interp.model=x is not served: set a model it serves")

    backend = Refusing(delay=0.05)
    with pytest.raises(ConfigError, match="interp.model=x"):
        LLM(backend, None, concurrency=2).complete_many([ask(f"q{i}") for i in range(30)])
    assert len(backend.calls) < 30


def test_rate_limit_spaces_calls():
    backend = EchoBackend()
    llm = LLM(backend, None, concurrency=4, requests_per_minute=600)
    start = time.monotonic()
    llm.complete_many([ask(f"q{i}") for i in range(5)])
    # 600/min = one call per 0.1 s: the 5th starts >= 0.4 s after the 1st (lower bound only).
    assert time.monotonic() - start >= 0.38


def test_usage_and_cost(tmp_path: Path):
    llm = LLM(EchoBackend(), tmp_path, cost_per_1k_prompt=0.5, cost_per_1k_completion=2.0)
    llm.complete_many([ask("a"), ask("b")])
    llm.complete(ask("a"))  # from the cache: free
    usage = llm.usage
    assert isinstance(usage, Usage)
    assert (usage.requests, usage.cached, usage.failed_attempts) == (2, 1, 0)
    assert (usage.prompt_tokens, usage.completion_tokens) == (2000, 1000)
    assert usage.cost == pytest.approx(2 * (0.5 + 1.0))
    assert usage.as_dict()["cost"] == pytest.approx(3.0)


def test_serve_main_refuses_an_unset_key_variable(monkeypatch):
    """`python -m distributed_sae.interp.serve` checks its options before loading a model."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(SystemExit) as err:
        serve_main(["--port", "0", "--api-key-env", KEY_ENV])
    assert err.value.code == 2
