"""Log-probabilities from the engine's TokenLogprob messages, in the three
shapes clients ask for: chat's, the legacy completions', and vLLM's
prompt_logprobs."""

from gateway.responses import (
    ChatTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    PromptLogprob,
    PromptLogprobs,
    TopLogprob,
)

# OpenAI's stand-in for a log-probability of minus infinity; JSON has none.
MIN_LOGPROB = -9999.0


def _lp(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB  # also maps NaN


def _bytes(lp) -> list[int]:
    # The engine's raw bytes: the decoded text of a token holding part of a
    # UTF-8 character is U+FFFD.
    return list(lp.token_bytes or lp.token.encode("utf-8", "surrogatepass"))


def chat_logprobs(lps) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        ChatTokenLogprob(token=lp.token, logprob=_lp(lp.logprob), bytes=_bytes(lp),
                         top_logprobs=[TopLogprob(token=t.token, logprob=_lp(t.logprob),
                                                  bytes=_bytes(t)) for t in lp.top])
        for lp in lps])


def completion_logprobs(lps, offset: int) -> tuple[CompletionLogprobs, int]:
    """Legacy-style logprobs; the sampled token is always among the top
    ones, as OpenAI documents. The prompt's first token (echoed) has null
    for both. Returns the text offset after these tokens."""
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for lp in lps:
        out.tokens.append(lp.token)
        out.text_offset.append(offset)
        offset += len(lp.token)
        if not lp.HasField("logprob"):
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_lp(lp.logprob))
        top: dict[str, float] = {}
        # Different ids can decode to the same string (a lone byte reads as
        # U+FFFD); the more likely one, listed first, keeps the key.
        for t in lp.top:
            top.setdefault(t.token, _lp(t.logprob))
        top.setdefault(lp.token, _lp(lp.logprob))
        out.top_logprobs.append(top)
    return out, offset


def prompt_logprobs(lps) -> PromptLogprobs:
    """vLLM's prompt_logprobs: by token id, the prompt token and its top
    alternatives (ranked 1..k)."""
    out: PromptLogprobs = []
    for lp in lps:
        if not lp.HasField("logprob"):
            out.append(None)
            continue
        entry = {str(lp.token_id): PromptLogprob(logprob=_lp(lp.logprob), rank=lp.rank,
                                                 decoded_token=lp.token)}
        for rank, t in enumerate(lp.top, 1):
            entry.setdefault(str(t.token_id), PromptLogprob(
                logprob=_lp(t.logprob), rank=rank, decoded_token=t.token))
        out.append(entry)
    return out
