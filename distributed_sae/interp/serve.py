"""An OpenAI-compatible HTTP server over any Backend, standard library only.

For running the interp stage's openai backend without a real server (and for its tests):
`python -m distributed_sae.interp.serve --port 8000` serves the local SmolLM2 model at
http://127.0.0.1:8000/v1. Serves GET /v1/models and POST /v1/chat/completions; loopback only by
default. `fail_every=n` makes every n-th chat request answer HTTP 503 on purpose, to exercise a
client's retries.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import signal
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from distributed_sae.config import ConfigError
from distributed_sae.interp.llm import Backend, TransientError
from distributed_sae.interp.types import Completion, Message, Request

logger = logging.getLogger(__name__)


class _State:
    """What the handler threads share: the backend, the options and the counters."""

    def __init__(self, backend: Backend, model: str, api_key: str | None, fail_every: int,
                 retry_after: float | None) -> None:
        self.backend = backend
        self.model = model
        self.api_key = api_key
        self.fail_every = fail_every
        self.retry_after = retry_after
        self.lock = threading.Lock()
        self.received = 0  # chat requests received (failed on purpose included)
        self.served = 0  # chat requests answered with a completion

    def count_received(self) -> int:
        with self.lock:
            self.received += 1
            return self.received


def _error(message: str, code: str, kind: str = "invalid_request_error") -> dict:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": kind, "code": code}}


def _request_from_body(body: dict) -> Request:
    """The Request a chat completions body asks for (ValueError/KeyError/TypeError if bad)."""
    messages = tuple(Message(role=str(m["role"]), content=str(m["content"]))
                     for m in body["messages"])
    if not messages:
        raise ValueError("messages is empty")
    top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    # Greedy unless asked otherwise (OpenAI's default is 1.0): a stand-in server should answer
    # the same on every run.
    return Request(messages=messages,
                   max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens")
                                  or 256),
                   temperature=float(body.get("temperature") or 0.0), top_logprobs=top)


def _response_body(model: str, request: Request, completion: Completion) -> dict:
    """The OpenAI chat.completion shape of `completion`."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": completion.text},
        "finish_reason": "length" if completion.completion_tokens >= request.max_tokens
        else "stop",
        "logprobs": None,
    }
    if completion.logprobs is not None:
        # -9999.0: OpenAI's value for a token outside the returned top candidates.
        choice["logprobs"] = {"content": [
            {"token": token, "logprob": top.get(token, -9999.0),
             "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top.items()]}
            for token, top in completion.logprobs]}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
        "created": int(time.time()), "model": model, "choices": [choice],
        "usage": {"prompt_tokens": completion.prompt_tokens,
                  "completion_tokens": completion.completion_tokens,
                  "total_tokens": completion.prompt_tokens + completion.completion_tokens},
    }


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request; `state` is set on the per-server subclass."""

    state: _State
    server_version = "dsae-serve/1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        logger.debug("%s - %s", self.address_string(), format % args)

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        """True if no key is required or the request carries it; else answers 401."""
        if self.state.api_key is None:
            return True
        given = self.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.state.api_key}".encode()):
            return True
        self._send(401, _error("Incorrect API key provided", "invalid_api_key"))
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") != "/v1/models":
            self._send(404, _error(f"no route {self.path}", "not_found"))
            return
        if self._authorised():
            self._send(200, {"object": "list", "data": [
                {"id": self.state.model, "object": "model", "owned_by": "distributed_sae"}]})

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, _error(f"no route {self.path}", "not_found"))
            return
        # Read the body before any answer: closing a socket with unread data makes the kernel
        # send a reset, which the client may see instead of our error response.
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._authorised():
            return
        state = self.state
        number = state.count_received()
        if state.fail_every > 0 and number % state.fail_every == 0:
            headers = {"Retry-After": f"{state.retry_after:g}"} if state.retry_after is not None \
                else None
            self._send(503, _error("failing on purpose (fail_every)", "unavailable",
                                   "server_error"), headers)
            return
        try:
            body = json.loads(raw or b"{}")
            request = _request_from_body(body)
        except (ValueError, KeyError, TypeError) as err:
            self._send(400, _error(f"bad request body: {err}", "invalid_request"))
            return
        if body.get("model") != state.model:
            self._send(404, _error(f"model {body.get('model')!r} not found", "model_not_found"))
            return
        self._answer(request)

    def _answer(self, request: Request) -> None:
        state = self.state
        try:
            completion = state.backend.complete(request)
        except ConfigError as err:
            self._send(400, _error(str(err), "invalid_request"))
            return
        except TransientError as err:
            self._send(503, _error(str(err), "unavailable", "server_error"))
            return
        except Exception as err:  # a server answers 500 rather than dropping the connection
            logger.exception("backend %s failed", state.backend.id)
            self._send(500, _error(f"{type(err).__name__}: {err}", "internal", "server_error"))
            return
        with state.lock:
            state.served += 1
        self._send(200, _response_body(state.model, request, completion))


class ServerHandle:
    """A running server: its base URL (ending in /v1), its counters, close()."""

    def __init__(self, server: ThreadingHTTPServer, thread: threading.Thread,
                 state: _State) -> None:
        self._server = server
        self._thread = thread
        self._state = state
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}/v1"

    @property
    def requests_served(self) -> int:
        """Chat requests answered with a completion."""
        with self._state.lock:
            return self._state.served

    @property
    def requests_received(self) -> int:
        """Chat requests received, those failed on purpose or refused included."""
        with self._state.lock:
            return self._state.received

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(backend: Backend, model: str, host: str = "127.0.0.1", port: int = 0,
          api_key: str | None = None, fail_every: int = 0,
          retry_after: float | None = None) -> ServerHandle:
    """Serve `backend` as model `model` on host:port (0 = a free port) in a daemon thread.
    api_key: required as 'Authorization: Bearer <key>' when set. fail_every=n: every n-th chat
    request answers 503 (with a Retry-After of `retry_after` seconds when that is set)."""
    if fail_every < 0:
        raise ConfigError(f"fail_every={fail_every} must be >= 0 (0 = never fail)")
    state = _State(backend, model, api_key, fail_every, retry_after)
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True  # a hung client must not keep the process alive
    # A short poll interval: close() waits up to one interval for the loop to notice.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="dsae-serve", daemon=True)
    thread.start()
    handle = ServerHandle(server, thread, state)
    logger.info("serving %s (%s) at %s", model, backend.id, handle.url)
    return handle


def main(argv: list[str] | None = None) -> None:
    """`python -m distributed_sae.interp.serve`: serve a local model until interrupted."""
    parser = argparse.ArgumentParser(description="An OpenAI-compatible server over a local "
                                                 "transformers model.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback default)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="smollm2-135m",
                        help="built-in name, hub id or folder; also the served model's id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--api-key-env", default=None,
                        help="environment variable holding a key that clients must send")
    parser.add_argument("--fail-every", type=int, default=0,
                        help="answer every n-th chat request with HTTP 503 (to test retries)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from distributed_sae.interp.local_backend import LocalBackend

    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        parser.error(f"--api-key-env={args.api_key_env}: ${args.api_key_env} is unset: "
                     f"export the key first")
    backend = LocalBackend(model_name=args.model, device=args.device)
    backend.load()  # load before listening, so the first request is not a 20 s wait
    handle = serve(backend, args.model, host=args.host, port=args.port, api_key=api_key,
                   fail_every=args.fail_every)
    logger.info("ready: set interp.backend=openai interp.base_url=%s interp.model=%s",
                handle.url, args.model)
    stop = threading.Event()
    # SIGTERM (a service manager, `kill`) and SIGINT (Ctrl-C) both close the port cleanly.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: stop.set())
    try:
        while not stop.wait(1.0):  # a timed wait, so the signal handler gets to run
            pass
        logger.info("stopping")
    finally:
        handle.close()


if __name__ == "__main__":
    main()
