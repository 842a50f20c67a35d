"""On-disk cache of LLM completions: one JSON file per request key, so a rerun of the interp
stage makes no calls for the prompts it has already sent.

Layout: `folder/<key[:2]>/<key>.json` holding {"key", "request", "completion"}. The two-letter
subfolders keep any one directory small when thousands of prompts are cached. Writes are atomic
(a temp file in the same folder, fsync, os.replace), so a killed run leaves either the whole entry
or none; a corrupt entry found on read is a miss and is overwritten by the next put. Only the
request (messages and sampling settings) and the answer are stored: never an API key.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from distributed_sae.interp.types import Completion, Request

logger = logging.getLogger(__name__)


def _completion_from_json(data: dict) -> Completion:
    """A Completion from its stored dict (raises KeyError/TypeError/ValueError when malformed)."""
    logprobs = data["logprobs"]
    if logprobs is not None:
        # JSON has no tuples: stored as [token, {candidate: logprob}] pairs.
        logprobs = [(str(tok), {str(k): float(v) for k, v in top.items()})
                    for tok, top in logprobs]
    return Completion(text=str(data["text"]), logprobs=logprobs,
                      prompt_tokens=int(data["prompt_tokens"]),
                      completion_tokens=int(data["completion_tokens"]))


class CompletionCache:
    """Completions on disk, keyed by `Request.key(backend_id)`. Safe to share between threads
    and processes: every entry is written whole by one os.replace."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """Where the entry of `key` lives."""
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        """The cached completion of `key` (cached=True), or None on a miss or a corrupt entry."""
        path = self.path(key)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as err:
            logger.warning("cannot read cache entry %s (%s): treating it as a miss", path, err)
            return None
        try:
            data = json.loads(text)
            if data.get("key") != key:
                raise ValueError(f"entry holds key {data.get('key')!r}")
            completion = _completion_from_json(data["completion"])
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            # A truncated file (a kill mid-write on a filesystem without atomic rename, or a
            # hand edit): the next put overwrites it.
            logger.warning("corrupt cache entry %s (%s): treating it as a miss", path, err)
            return None
        completion.cached = True
        return completion

    def put(self, key: str, request: Request, completion: Completion) -> None:
        """Store `completion` as the answer to `request` under `key`, atomically."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        stored = asdict(completion)
        stored.pop("cached")  # a property of how an answer was served, not of the answer
        blob = json.dumps({"key": key, "request": asdict(request), "completion": stored},
                          ensure_ascii=False, indent=1)
        # The temp file sits in the target folder so os.replace is a same-filesystem rename.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:8]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(blob)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def __len__(self) -> int:
        """Number of entries on disk."""
        return sum(1 for _ in self.folder.glob("??/*.json"))
