"""Log-probabilities of tokens, from the raw logits of one position (before any sampler: as
vLLM and OpenAI report them, so temperature, penalties and grammars do not change them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: The most alternatives a position reports (OpenAI allows 20 for chat, 5 for completions).
MAX_TOP = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most likely alternatives at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    x = logits.astype(np.float64)
    x -= x.max()
    out: npt.NDArray[np.float64] = x - np.log(np.exp(x).sum())
    return out


def token_logprob(logits: npt.NDArray[np.float32], token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under `logits`, with the `top` most likely tokens."""
    logp = log_softmax(logits)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, MAX_TOP, len(logp))
        # Ties go to the lower id, as llama.cpp's greedy sampler breaks them; the k-th place
        # may be tied with ids outside the partition, so take those too before cutting.
        cut = np.partition(-logp, k - 1)[k - 1]
        ids = np.flatnonzero(-logp <= cut)
        ids = ids[np.lexsort((ids, -logp[ids]))][:k]
        best = tuple((int(i), float(logp[i])) for i in ids)
    return TokenLogprob(int(token), float(logp[token]), best)
