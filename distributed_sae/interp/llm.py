"""One LLM client over interchangeable backends (a local transformers model, any
OpenAI-compatible server), with what a few thousand explainer and scorer prompts need:

- an on-disk cache keyed by backend id and request (interp.cache), so a rerun makes no calls;
- requests in flight at once (a thread pool), answers in request order, duplicates sent once;
- retries of transient failures with exponential back-off and jitter (honouring Retry-After);
- a requests-per-minute limit, and token and cost accounting.

A backend raises TransientError for what a retry may fix (connection refused or reset, timeouts,
HTTP 429 and 5xx) and ConfigError for a user error no retry fixes (a wrong key or model name).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

from tqdm.auto import tqdm

from distributed_sae.config import ConfigError
from distributed_sae.config.interp_schema import BACKENDS  # the config's choices
from distributed_sae.interp.cache import CompletionCache
from distributed_sae.interp.types import Completion, Request

logger = logging.getLogger(__name__)


class TransientError(RuntimeError):
    """A failure a retry may fix. `retry_after`: seconds the server asked us to wait, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Backend(Protocol):
    """Something that answers one chat request. `id` names the backend and its model (e.g.
    'local:smollm2-135m', 'openai:http://host/v1:model'); it is part of the cache key, so it must
    never hold a secret."""

    id: str

    def complete(self, request: Request) -> Completion:
        """Answer `request`; raise TransientError (retryable) or ConfigError (user error)."""
        ...


@dataclass
class Usage:
    """What an LLM client has spent so far."""

    requests: int = 0  # backend calls made, failed attempts included
    cached: int = 0  # answers served from the on-disk cache (no call made)
    failed_attempts: int = 0  # calls that failed with a TransientError (and were retried)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0  # in the currency of interp.cost_per_1k_*

    def as_dict(self) -> dict:
        """A JSON-ready copy."""
        return asdict(self)


class RateLimiter:
    """Spaces calls at least 60/requests_per_minute seconds apart, across threads."""

    def __init__(self, requests_per_minute: float) -> None:
        self.interval = 60.0 / requests_per_minute if requests_per_minute > 0 else 0.0
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time of the next free slot

    def wait(self) -> None:
        """Block until this caller's slot comes."""
        if self.interval <= 0:
            return
        # Reserve the slot under the lock, sleep outside it, so waiting threads queue in order
        # without holding the lock through the sleep.
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        delay = slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class LLM:
    """A cached, concurrent, retrying, rate-limited client over one Backend (the Completer that
    the prompts and scorers use)."""

    def __init__(self, backend: Backend, cache_dir: Path | None, concurrency: int = 4,
                 max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 requests_per_minute: float = 0, cost_per_1k_prompt: float = 0.0,
                 cost_per_1k_completion: float = 0.0) -> None:
        if concurrency < 1 or max_retries < 0:
            raise ConfigError(f"interp.concurrency={concurrency} must be >= 1 and "
                              f"interp.max_retries={max_retries} >= 0")
        self.backend = backend
        self.cache = CompletionCache(Path(cache_dir)) if cache_dir is not None else None
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.cost_per_1k_prompt = cost_per_1k_prompt
        self.cost_per_1k_completion = cost_per_1k_completion
        self._limiter = RateLimiter(requests_per_minute)
        self._usage = Usage()
        self._lock = threading.Lock()

    @property
    def usage(self) -> Usage:
        """A snapshot of what was spent so far."""
        with self._lock:
            return replace(self._usage)

    def complete(self, request: Request) -> Completion:
        """The answer to `request`: from the cache (cached=True, no call) or from the backend."""
        return self._complete(request, None)

    def complete_many(self, requests: Sequence[Request], desc: str = "") -> list[Completion]:
        """Answers in the order of `requests`, `concurrency` at a time; identical requests are
        sent once. The first error (a ConfigError, or a request that ran out of retries) cancels
        the requests not yet started and is re-raised; answers already received stay cached."""
        keys = [r.key(self.backend.id) for r in requests]
        unique: dict[str, Request] = {}
        for key, request in zip(keys, requests):
            unique.setdefault(key, request)
        copies = {key: keys.count(key) for key in unique}
        answers: dict[str, Completion] = {}
        abort = threading.Event()  # tells requests sleeping between retries to give up
        bar = tqdm(total=len(requests), desc=desc, leave=False)
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(unique))),
                                  thread_name_prefix="llm")
        try:
            futures: dict[Future, str] = {
                pool.submit(self._complete, request, abort): key for key, request in unique.items()}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    answers[futures[future]] = future.result()  # raises the backend's error
                    bar.update(copies[futures[future]])
        except BaseException:
            abort.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
            bar.close()
        # Each position gets its own object, so a caller editing one answer edits only that one.
        return [replace(answers[key]) for key in keys]

    # --- one request ------------------------------------------------------------------------

    def _complete(self, request: Request, abort: threading.Event | None) -> Completion:
        key = request.key(self.backend.id)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self._usage.cached += 1
                return hit
        completion = self._call(request, abort)
        completion.cached = False
        if self.cache is not None:
            self.cache.put(key, request, completion)
        with self._lock:
            self._usage.prompt_tokens += completion.prompt_tokens
            self._usage.completion_tokens += completion.completion_tokens
            self._usage.cost += (completion.prompt_tokens / 1000 * self.cost_per_1k_prompt
                                 + completion.completion_tokens / 1000
                                 * self.cost_per_1k_completion)
        return completion

    def _call(self, request: Request, abort: threading.Event | None) -> Completion:
        """The backend's answer, retrying TransientErrors up to max_retries times (so at most
        max_retries + 1 attempts); ConfigError and other errors are not retried."""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            self._limiter.wait()
            with self._lock:
                self._usage.requests += 1
            try:
                return self.backend.complete(request)
            except TransientError as err:
                with self._lock:
                    self._usage.failed_attempts += 1
                if attempt + 1 == attempts:
                    raise RuntimeError(f"{self.backend.id}: gave up after {attempts} attempts; "
                                       f"last error: {err}") from err
                delay = self._delay(attempt, err.retry_after)
                logger.info("%s: attempt %d/%d failed (%s): retrying in %.2f s",
                            self.backend.id, attempt + 1, attempts, err, delay)
                # Event.wait sleeps like time.sleep but wakes when the batch is aborted.
                if (abort if abort is not None else threading.Event()).wait(delay):
                    raise RuntimeError(f"{self.backend.id}: cancelled after {attempt + 1} "
                                       f"attempts (another request failed)") from err
        raise AssertionError("unreachable")  # the loop returns or raises

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry `attempt + 1`: the server's Retry-After when it sent one, else
        exponential back-off with full jitter (so concurrent retries do not arrive together);
        at most max_backoff_s either way, so one answer cannot stall the run."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_backoff_s))
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
        return random.uniform(ceiling / 2, ceiling)


def make_backend(backend: str, model: str, base_url: str, api_key_env: str, timeout_s: float,
                 device: str = "cpu") -> Backend:
    """The backend interp.backend names: 'local' (a transformers model in this process, loaded
    on its first call) or 'openai' (an OpenAI-compatible server at base_url)."""
    if backend == "local":
        from distributed_sae.interp.local_backend import LocalBackend

        return LocalBackend(model_name=model, device=device)
    if backend == "openai":
        from distributed_sae.interp.openai_backend import OpenAIBackend

        return OpenAIBackend(base_url=base_url, model=model, api_key_env=api_key_env,
                             timeout_s=timeout_s)
    raise ConfigError(f"interp.backend={backend!r} is not a backend: choose from "
                      f"{list(BACKENDS)}")
