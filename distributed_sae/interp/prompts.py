"""The explainer's and the scorers' prompts, and parsing their answers. Pure functions.

Prompts follow Bills et al. 2023 ("Language models can explain neurons in language models"),
Anthropic's "Towards Monosemanticity" and EleutherAI's delphi, kept short and plainly worded
because small local models (SmolLM2-135M-Instruct) must be able to follow them:

    explain_request     top-activating excerpts, strongest tokens marked <<like this>> -> a phrase
    detection_request   does this (unmarked) excerpt contain what the explanation describes?
    fuzzing_request     are the tokens marked <<like this>> what the explanation describes?
    simulation_request  predict the unit's level (0-10) on every token, one `i<TAB>level` a line
"""

from __future__ import annotations

import math
import re

from distributed_sae.interp.types import Completion, Example, Message, Request, UnitExamples

# A token is marked in the explainer's excerpts when its activation reaches this fraction of
# the excerpt's maximum (delphi's and Anthropic's convention for "strongly activating").
MARK_FRACTION = 0.3
# The explainer sees at most this many tokens before / after each excerpt's peak: the context
# that explains a token mostly precedes it, and short prompts suit small models.
EXPLAIN_BEFORE, EXPLAIN_AFTER = 24, 8
MAX_EXPLANATION_CHARS = 200
NO_EXPLANATION = "(no explanation)"

EXPLAIN_SYSTEM = (
    "We are studying one unit of a neural network. Below are text excerpts where it activates. "
    "The tokens where it activates most are marked <<like this>>; after each excerpt, in "
    "brackets, are those tokens' activation levels from 0 to 10. Write ONE short phrase or "
    "sentence describing what the unit responds to."
)
YES_NO_SYSTEM = (
    "We are studying one unit of a neural network. You check an explanation of what it "
    'responds to against a text. Answer "yes" or "no" only.'
)
SIMULATION_SYSTEM = (
    "We are studying one unit of a neural network. Given an explanation of what it responds "
    "to, predict its activation on each token of a text, from 0 (none) to 10 (strongest). "
    "Most tokens are 0."
)


def show_token(tok: str) -> str:
    """A token's text on one line: newlines, tabs and carriage returns written as escapes."""
    return tok.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _wrap(text: str) -> str:
    """`<<text>>`, with its leading whitespace left outside the marks (' cat' -> ' <<cat>>')."""
    body = text.lstrip()
    if not body:  # a whitespace-only token: mark it as it is, or it would vanish
        return f"<<{text}>>"
    return text[: len(text) - len(body)] + f"<<{body}>>"


def render_excerpt(tokens: list[str], marked: set[int] | frozenset[int] = frozenset()) -> str:
    """The tokens joined as text, each run of consecutive marked indices wrapped in one <<>>."""
    out: list[str] = []
    run: list[str] = []  # the marked tokens not yet written
    for i, tok in enumerate(tokens):
        if i in marked:
            run.append(show_token(tok))
            continue
        if run:
            out.append(_wrap("".join(run)))
            run = []
        out.append(show_token(tok))
    if run:
        out.append(_wrap("".join(run)))
    return "".join(out)


def _trim(ex: Example) -> tuple[list[str], list[float]]:
    """The excerpt's tokens and acts around its peak: EXPLAIN_BEFORE before, EXPLAIN_AFTER after."""
    if not ex.acts:
        return list(ex.tokens), []
    peak = max(range(len(ex.acts)), key=ex.acts.__getitem__)
    lo, hi = max(0, peak - EXPLAIN_BEFORE), peak + EXPLAIN_AFTER + 1
    return ex.tokens[lo:hi], ex.acts[lo:hi]


def _explain_line(n: int, ex: Example, unit_max: float) -> str:
    """`Excerpt n: text with <<marks>> [tok 10, tok 4]`: levels are 0-10 of the unit's maximum."""
    tokens, acts = _trim(ex)
    top = max(acts, default=0.0)
    marked = {i for i, a in enumerate(acts) if top > 0 and a >= MARK_FRACTION * top}
    line = f"Excerpt {n}: {render_excerpt(tokens, marked)}"
    if marked and unit_max > 0:
        # The three strongest marked tokens, strongest first: enough to rank them, still short.
        best = sorted(marked, key=lambda i: -acts[i])[:3]
        levels = ", ".join(
            f"{show_token(tokens[i]).strip() or show_token(tokens[i])} "
            f"{round(10 * acts[i] / unit_max)}"
            for i in best
        )
        line += f" [{levels}]"
    return line


def explain_request(u: UnitExamples, max_examples: int = 10) -> Request:
    """The explainer's prompt: the unit's first `max_examples` explain excerpts (marked, with
    levels) and the tokens it promotes; the answer is asked for after 'Explanation:'."""
    examples = u.explain[:max_examples]
    unit_max = max((ex.max_act for ex in examples), default=0.0)
    lines = [_explain_line(n + 1, ex, unit_max) for n, ex in enumerate(examples)]
    body = "\n".join(lines) if lines else "(no excerpts)"
    if u.logits_top:
        promoted = ", ".join(show_token(t).strip() or show_token(t) for t in u.logits_top[:10])
        body += f"\n\nTokens it promotes: {promoted}"
    body += "\n\nWhat does the unit respond to? Reply with one short phrase.\nExplanation:"
    return Request(
        messages=(Message("system", EXPLAIN_SYSTEM), Message("user", body)), max_tokens=48
    )


_PREFIX = re.compile(r"^\s*(?:explanation\s*[:\-]\s*)+", re.IGNORECASE)
_QUOTES = "\"'`*“”‘’ \t"


def parse_explanation(text: str) -> str:
    """The explainer's answer as one phrase: 'Explanation:' prefixes and quotes stripped, the
    first non-empty line's first sentence, at most MAX_EXPLANATION_CHARS characters;
    NO_EXPLANATION when nothing is left."""
    lines = [ln for ln in (_PREFIX.sub("", ln).strip(_QUOTES) for ln in text.splitlines()) if ln]
    if not lines:
        return NO_EXPLANATION
    # First sentence: up to a '.', '!' or '?' (maybe closing a quote) that a space follows, so
    # '3.5' survives; a phrase's final '.' goes.
    first = re.split(r"(?<=[.!?])[\"'”’]*\s+", lines[0], maxsplit=1)[0]
    first = _PREFIX.sub("", first).strip(_QUOTES).removesuffix(".").strip(_QUOTES)
    return first[:MAX_EXPLANATION_CHARS].strip() or NO_EXPLANATION


def _yes_no(explanation: str, text: str, question: str) -> Request:
    body = f"Explanation: {explanation}\nText: {text}\n{question} Answer yes or no."
    return Request(
        messages=(Message("system", YES_NO_SYSTEM), Message("user", body)),
        max_tokens=2,
        top_logprobs=5,
    )


def detection_request(explanation: str, ex: Example) -> Request:
    """Detection: does the (unmarked) excerpt contain what the explanation describes?"""
    question = "Does the text contain what the explanation describes?"
    return _yes_no(explanation, render_excerpt(ex.tokens), question)


def fuzzing_request(explanation: str, ex: Example, marked: list[int]) -> Request:
    """Fuzzing: are the tokens at `marked` (shown <<like this>>) what the explanation describes?"""
    question = "Are the tokens marked <<like this>> what the explanation describes?"
    return _yes_no(explanation, render_excerpt(ex.tokens, set(marked)), question)


def _word(text: str) -> str:
    """A candidate token's text as a bare lowercase word (' Yes.' -> 'yes')."""
    return text.strip().strip(".,!:;\"'*").lower()


def yes_probability(c: Completion) -> float:
    """p(yes) / (p(yes) + p(no)) from the first non-blank generated token's candidates (summing
    ' Yes', 'yes', ...); without logprobs, or with neither among the candidates, 1.0 / 0.0 when
    the text starts with yes / no, else 0.5."""
    for tok, cands in c.logprobs or []:
        if not tok.strip() and not any(_word(t) in ("yes", "no") for t in cands):
            continue  # a leading space/newline token: the answer comes next
        p_yes = sum(math.exp(lp) for t, lp in cands.items() if _word(t) == "yes")
        p_no = sum(math.exp(lp) for t, lp in cands.items() if _word(t) == "no")
        if p_yes + p_no > 0:
            return p_yes / (p_yes + p_no)
        break  # the answer token's candidates hold neither: read the text
    head = re.sub(r"^[^a-z]+", "", c.text.lower())
    if head.startswith("yes"):
        return 1.0
    if head.startswith("no"):
        return 0.0
    return 0.5


def simulation_request(explanation: str, ex: Example) -> Request:
    """Bills et al.'s simulator: the excerpt's tokens one a line as `i<TAB>token`; the answer
    is one `i<TAB>level` line per token, level 0-10."""
    listing = "\n".join(f"{i}\t{show_token(t)}" for i, t in enumerate(ex.tokens))
    body = (
        f"Explanation: {explanation}\n\nTokens (index<TAB>token):\n{listing}\n\n"
        "For each token, reply with one line: index<TAB>level (0-10). No other text."
    )
    # ~4-5 generated tokens a line ('12', '\t', '3', '\n'; digits are often single tokens).
    return Request(
        messages=(Message("system", SIMULATION_SYSTEM), Message("user", body)),
        max_tokens=5 * len(ex.tokens) + 8,
        top_logprobs=5,
    )


# `i<sep>level` (sep: tabs, spaces, ':', '=', ',' ...), or `i<sep>token<sep>level` when a model
# echoes the token: the index leads the line, the level ends it.
_SIM_LINE = re.compile(r"^\s*(\d+)\s*[:=,.)\-\t ]\s*(?:.*?[\s:=,])?(\d+(?:\.\d+)?)\s*$")


def _level_of_token(cands: dict[str, float]) -> float | None:
    """The expected level sum(p_l * l) over candidates that are integers 0..10, renormalised."""
    levels = {}
    for t, lp in cands.items():
        s = t.strip()
        if s.isdigit() and int(s) <= 10:
            levels[int(s)] = levels.get(int(s), 0.0) + math.exp(lp)
    total = sum(levels.values())
    if total <= 0:
        return None
    return sum(p * lv for lv, p in levels.items()) / total


def _token_at(logprobs: list[tuple[str, dict[str, float]]]) -> list[int]:
    """For each character of the joined token text, the index of the token it belongs to."""
    return [k for k, (tok, _) in enumerate(logprobs) for _ in tok]


def parse_simulation(c: Completion, n_tokens: int) -> list[float]:
    """The predicted level (0..10) per token, (n_tokens,): from `i<sep>level` lines, using the
    expected level over the level token's integer candidates where logprobs have it; tokens
    without a line (or out-of-range / repeated lines) are 0.0. Garbage lines are skipped."""
    out = [0.0] * n_tokens
    seen: set[int] = set()
    lp = c.logprobs or []
    # With logprobs, parse the generated tokens' own text so character offsets map to tokens.
    text = "".join(t for t, _ in lp) if lp else c.text
    owner = _token_at(lp)  # (len(text),) when logprobs are present, else empty
    pos = 0
    for line in text.splitlines(keepends=True):
        m = _SIM_LINE.match(line.rstrip("\r\n"))
        if m is not None and int(m.group(1)) < n_tokens and int(m.group(1)) not in seen:
            seen.add(int(m.group(1)))
            level: float | None = None
            if owner:
                k = owner[pos + m.start(2)]
                # Only when the level is one whole token (' 5', '5'; not '1' of '10') do its
                # candidates describe the level.
                if lp[k][0].strip() == m.group(2):
                    level = _level_of_token(lp[k][1])
            level = float(m.group(2)) if level is None else level
            out[int(m.group(1))] = min(10.0, max(0.0, level))
        pos += len(line)
    return out
