"""A Backend for any OpenAI-compatible chat completions server (vLLM, llama.cpp's server, TGI,
hosted APIs), over the standard library's urllib: no client package needed.

The API key is read from the environment variable interp.api_key_env on every call, sent only
in the Authorization header, and never written to disk, into the backend id (the cache key) or
into an error message.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any

from distributed_sae.config import ConfigError
from distributed_sae.interp.llm import TransientError
from distributed_sae.interp.types import Completion, Request

logger = logging.getLogger(__name__)

# HTTP statuses a retry may fix: rate limiting, request timeout and the server's own failures.
_TRANSIENT_STATUS = {408, 429}
# Network failures a retry may fix (a server restarting, a dropped connection, a slow answer).
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout,
                   http.client.HTTPException)
_MESSAGE_CHARS = 200  # of a server's error message quoted in a ConfigError


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number of seconds or an HTTP date; None if absent."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _reason(err: BaseException) -> str:
    """A short reason for a network error: 'Connection refused', 'timed out', ..."""
    reason = getattr(err, "reason", err)
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _server_message(body: bytes) -> str:
    """The server's error message: error.message of an OpenAI-style error body, else the body."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return text


def _parse_logprobs(choice: dict) -> list[tuple[str, dict[str, float]]] | None:
    """choices[0].logprobs.content as [(token, {candidate: logprob})], or None if absent."""
    content = (choice.get("logprobs") or {}).get("content")
    if not content:
        return None
    out = []
    for entry in content:
        top = {str(c["token"]): float(c["logprob"]) for c in entry.get("top_logprobs") or []}
        out.append((str(entry["token"]), top))
    return out


class OpenAIBackend:
    """POST {base_url}/chat/completions for each request (base_url like
    'http://127.0.0.1:8000/v1'). check() verifies the server, the key and the model once, with
    one-line errors, before a run sends thousands of requests."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.id = f"openai:{self.base_url}:{model}"

    # --- HTTP -------------------------------------------------------------------------------

    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None

    def _scrub(self, text: str) -> str:
        """`text` with the API key masked: some servers echo the key they refused."""
        key = self._key()
        return text.replace(key, "***") if key else text

    def _send(self, method: str, path: str, body: dict | None = None) -> Any:
        """The decoded JSON answer; urllib's HTTPError and network errors propagate."""
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers,
                                         method=method)
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def _key_refused(self, status: int) -> ConfigError:
        if self._key() is None:
            return ConfigError(f"interp.base_url={self.base_url} wants an API key (HTTP {status}) "
                               f"but ${self.api_key_env} is unset: export the key in "
                               f"${self.api_key_env} or set interp.api_key_env")
        return ConfigError(f"interp.base_url={self.base_url} refused the key in "
                           f"${self.api_key_env} (HTTP {status}): set the right key")

    # --- the checks before a run ------------------------------------------------------------

    def check(self) -> None:
        """One GET {base_url}/models: raise a one-line ConfigError if the server cannot be
        reached, refuses the key or does not serve interp.model."""
        try:
            answer = self._send("GET", "/models")
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise self._key_refused(err.code) from None
            if err.code == 404:
                # Some servers do not list models; the first request will tell.
                logger.warning("%s/models answered HTTP 404: cannot check interp.model=%r",
                               self.base_url, self.model)
                return
            message = self._scrub(_server_message(err.read()))[:_MESSAGE_CHARS]
            raise ConfigError(f"interp.base_url={self.base_url}: GET /models answered HTTP "
                              f"{err.code} ({message}): fix the URL or the server") from None
        except _NETWORK_ERRORS as err:
            raise ConfigError(f"interp.base_url={self.base_url}: cannot connect ({_reason(err)}): "
                              f"start the server or fix the URL") from None
        except ValueError:
            raise ConfigError(f"interp.base_url={self.base_url}: GET /models did not answer "
                              f"JSON: is it an OpenAI-compatible URL (ending in /v1)?") from None
        data = answer.get("data") if isinstance(answer, dict) else None
        served = [str(m.get("id")) for m in data or [] if isinstance(m, dict)]
        if self.model not in served:
            shown = served[:20] + (["..."] if len(served) > 20 else [])
            raise ConfigError(f"interp.model={self.model} is not served by {self.base_url}: it "
                              f"serves [{', '.join(shown)}]")

    # --- requests ---------------------------------------------------------------------------

    def _body(self, request: Request) -> dict:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
        }
        if request.top_logprobs > 0:
            body["logprobs"] = True
            body["top_logprobs"] = request.top_logprobs
        return body

    def _http_error(self, err: urllib.error.HTTPError) -> Exception:
        """The TransientError or ConfigError an HTTP error status stands for."""
        status = err.code
        message = self._scrub(_server_message(err.read()))
        if status in _TRANSIENT_STATUS or status >= 500:
            return TransientError(f"HTTP {status} from {self.base_url}: "
                                  f"{message[:_MESSAGE_CHARS]}",
                                  retry_after=_retry_after(err.headers.get("Retry-After")))
        if status in (401, 403):
            return self._key_refused(status)
        if status == 404 and "model" in message.lower():
            return ConfigError(f"interp.model={self.model} is not served by {self.base_url} "
                               f"(HTTP 404: {message[:_MESSAGE_CHARS]}): set a model it serves")
        return ConfigError(f"interp.base_url={self.base_url} rejected the request with HTTP "
                           f"{status}: {message[:_MESSAGE_CHARS]}")

    def complete(self, request: Request) -> Completion:
        """One chat completion. Raises TransientError for network failures, timeouts, HTTP 408,
        429 and 5xx; ConfigError for the other 4xx (a wrong key, model or request)."""
        try:
            answer = self._send("POST", "/chat/completions", self._body(request))
        except urllib.error.HTTPError as err:
            raise self._http_error(err) from None
        except _NETWORK_ERRORS as err:
            raise TransientError(f"cannot reach {self.base_url} ({_reason(err)})") from None
        except ValueError as err:
            # A proxy's HTML error page or a cut answer: worth a retry.
            raise TransientError(f"{self.base_url} did not answer JSON ({err})") from None
        try:
            choice = answer["choices"][0]
            text = choice["message"].get("content") or ""
            usage = answer.get("usage") or {}
            return Completion(text=text, logprobs=_parse_logprobs(choice),
                              prompt_tokens=int(usage.get("prompt_tokens") or 0),
                              completion_tokens=int(usage.get("completion_tokens") or 0))
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
            raise TransientError(f"{self.base_url} answered an unexpected shape "
                                 f"({type(err).__name__}: {err})") from None
