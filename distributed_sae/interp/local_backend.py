"""The offline default Backend: a transformers causal LM in this process (by default the built-in
SmolLM2-135M-Instruct, whose weights ship in a pip package, so no network is needed).

Small and weak as explainer, but it makes the whole interp stage run anywhere; point
interp.backend=openai at a real server for explanations worth reading.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from distributed_sae.interp.types import Completion, Request

logger = logging.getLogger(__name__)


def _seed(key: str) -> int:
    """A torch seed from a request's cache key, so a sampled answer is the same on a rerun."""
    return int(key[:15], 16)


class LocalBackend:
    """Chat completions from a local transformers model. Loaded on the first call; calls are
    serialised (one model, and torch already uses every core for one generation)."""

    def __init__(self, model_name: str = "smollm2-135m", device: str = "cpu") -> None:
        self.model_name = model_name
        self.device = device
        self.id = f"local:{model_name}"
        self._lock = threading.Lock()
        self._loaded: Any = None  # a LoadedModel once loaded

    def load(self) -> Any:
        """Load the model now (otherwise the first complete() does); returns the LoadedModel."""
        with self._lock:
            return self._load_locked()

    def _load_locked(self) -> Any:
        if self._loaded is None:
            # Imported here: the registry pulls in transformers, which the openai backend avoids.
            from distributed_sae.config import ModelConfig
            from distributed_sae.models.registry import load_model

            logger.info("loading %s on %s for the local LLM backend", self.model_name, self.device)
            self._loaded = load_model(ModelConfig(name=self.model_name, device=self.device))
        return self._loaded

    def complete(self, request: Request) -> Completion:
        """Greedy generation (sampling with a seed from the request when temperature > 0) of up
        to request.max_tokens new tokens, stopping at EOS."""
        with self._lock:
            loaded = self._load_locked()
            with torch.no_grad():
                return self._generate(loaded.model, loaded.tokenizer, request)

    # --- generation -------------------------------------------------------------------------

    def _prompt_ids(self, tokenizer: Any, request: Request) -> torch.Tensor:
        """(1, prompt) token ids: the chat template, or 'role: content' lines without one."""
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if getattr(tokenizer, "chat_template", None):
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                    return_tensors="pt")
            # transformers >= 5 returns a BatchEncoding, older versions the ids tensor.
            ids = encoded if isinstance(encoded, torch.Tensor) else encoded["input_ids"]
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def _generate(self, model: Any, tokenizer: Any, request: Request) -> Completion:
        ids = self._prompt_ids(tokenizer, request)
        sample = request.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=request.max_tokens, do_sample=sample,
            attention_mask=torch.ones_like(ids), eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            return_dict_in_generate=True, output_scores=request.top_logprobs > 0)
        if sample:
            # top_k=0, top_p=1: sample the whole tempered distribution, as OpenAI servers do.
            kwargs.update(temperature=request.temperature, top_k=0, top_p=1.0)
        else:
            # Unset the model's sampling defaults so greedy decoding does not warn about them.
            kwargs.update(temperature=None, top_k=None, top_p=None)
        devices = [] if torch.device(self.device).type != "cuda" else [torch.device(self.device)]
        # fork_rng: the seed is for this answer only; the caller's random state is untouched.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_seed(request.key(self.id)))
            out = model.generate(ids, **kwargs)
        new = out.sequences[0, ids.shape[1]:].tolist()
        if new and new[-1] == tokenizer.eos_token_id:
            new = new[:-1]  # the stop token is not part of the answer
        logprobs = None
        if request.top_logprobs > 0:
            logprobs = self._logprobs(tokenizer, new, out.scores, request.top_logprobs)
        return Completion(text=tokenizer.decode(new, skip_special_tokens=True), logprobs=logprobs,
                          prompt_tokens=int(ids.shape[1]), completion_tokens=len(new))

    @staticmethod
    def _logprobs(tokenizer: Any, new: list[int], scores: tuple[torch.Tensor, ...],
                  k: int) -> list[tuple[str, dict[str, float]]]:
        """Per generated token: its text and the top-k {candidate text: log-probability}."""
        out = []
        for token, step in zip(new, scores):
            logp = torch.log_softmax(step[0].float(), dim=-1)
            # A few more than k candidates: different ids can decode to the same text (byte
            # pieces of one character), and the dict keeps the first, most likely, of each.
            values, indices = logp.topk(min(logp.numel(), 4 * k))
            top: dict[str, float] = {}
            for value, index in zip(values.tolist(), indices.tolist()):
                top.setdefault(tokenizer.decode([index]), value)
                if len(top) == k:
                    break
            out.append((tokenizer.decode([token]), top))
        return out
