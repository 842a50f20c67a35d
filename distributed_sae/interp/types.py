"""The data the interp modules pass each other: LLM requests and completions, and a unit's
(a feature's or a neuron's) example windows. Plain dataclasses, so each module can be tested
without the others."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class Message:
    """One chat message: role is 'system', 'user' or 'assistant'."""

    role: str
    content: str


@dataclass(frozen=True)
class Request:
    """One chat completion request. Greedy (temperature 0) by default, so a cached answer is the
    answer a rerun would get."""

    messages: tuple[Message, ...]
    max_tokens: int = 64
    temperature: float = 0.0
    # > 0: also return the top `top_logprobs` log-probabilities of each generated token.
    top_logprobs: int = 0

    def key(self, backend_id: str) -> str:
        """Cache key: sha256 of the backend's id and the request, as canonical JSON."""
        blob = json.dumps({"backend": backend_id, "request": asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Completion:
    """A backend's answer to a Request."""

    text: str
    # Per generated token, when the request asked for top_logprobs: (the token's text,
    # {candidate token text: log-probability}) for the top candidates; None otherwise.
    logprobs: list[tuple[str, dict[str, float]]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False  # served from the on-disk cache (no call was made)


class Completer(Protocol):
    """What prompts and scoring need of an LLM client (interp.llm.LLM; a stand-in in tests)."""

    def complete_many(self, requests: Sequence[Request], desc: str = "") -> list[Completion]:
        """Answers in the order of `requests` (run concurrently, cached)."""
        ...


@dataclass
class Example:
    """A window of tokens and one unit's activation on each of them."""

    tokens: list[str]  # (window,) token texts
    acts: list[float]  # (window,) the unit's activation per token, >= 0 for features

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)


@dataclass
class UnitExamples:
    """What the explainer and the scorers see of one unit. `explain` and the score sets are
    disjoint windows of held-out rows: the scorers test the explanation on contexts the
    explainer never saw."""

    unit: str  # 'feature 12' / 'neuron 40' / 'resid 7': a readable id
    explain: list[Example]  # top-activating windows, then quantile samples
    score_pos: list[Example]  # activating windows (sampled over the activation quantiles)
    score_neg: list[Example]  # windows where the unit does not fire (random)
    logits_top: list[str] = field(default_factory=list)  # tokens it promotes most (may be empty)
