"""Per-row statistics of a row's own text, for drafting (see ``bytemtp.decode.incontext``).

Each row of a decoding batch keeps its text (``history`` [B, C], ``lengths`` [B]) and the
byte-trigram counts of it in a small hash table: ``keys`` [B, H] the pair ``a * 257 + b`` that
owns each slot (-1: free; linear probing from a multiplicative hash), ``counts`` [B, H, V]
how often each byte followed that pair, ``totals`` [B, H] their sums. A table holds the
first ``H`` distinct pairs of a row's text; later new pairs go uncounted (a row's text of a
few thousand bytes holds far fewer). Bytes are counted once, when decided: re-encoding a row
after its window is cut changes none of this.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PAIR_BASE = 257  # ids 0..256: bytes and BOS


@njit(cache=True)
def _slot(keys: np.ndarray, r: int, code: int, claim: bool) -> int:
    """Row ``r``'s slot of the pair ``code`` (-1: absent); ``claim``: take a free slot for it."""
    h = keys.shape[1]
    s = (code * 2654435761) % h
    for _ in range(h):
        k = keys[r, s]
        if k == code:
            return s
        if k < 0:
            if claim:
                keys[r, s] = code
                return s
            return -1
        s = s + 1 if s + 1 < h else 0
    return -1


@njit(cache=True)
def pair_slot(keys: np.ndarray, r: int, a: int, b: int) -> int:
    """Row ``r``'s slot of the pair ``a, b``, -1 when its text has not had it (or it went uncounted)."""
    return _slot(keys, r, a * PAIR_BASE + b, False)


@njit(cache=True)
def append(history, lengths, keys, counts, totals, r: int, new: np.ndarray) -> None:
    """Append the bytes ``new`` to row ``r``'s text, counting the trigram each ends. When the text
    buffer is full its older half is dropped (the counts keep it)."""
    cap = history.shape[1]
    for x in new:
        n = lengths[r]
        if n >= 2:
            s = _slot(keys, r, history[r, n - 2] * PAIR_BASE + history[r, n - 1], True)
            if s >= 0:
                counts[r, s, x] += 1
                totals[r, s] += 1
        if n == cap:
            keep = cap // 2
            history[r, :keep] = history[r, n - keep : n].copy()
            n = keep
        history[r, n] = x
        lengths[r] = n + 1


@njit(cache=True)
def reset(history, lengths, keys, counts, totals, r: int) -> None:
    """Forget row ``r``'s text and counts (a new request in its slot)."""
    lengths[r] = 0
    for s in range(keys.shape[1]):
        if keys[r, s] >= 0:
            keys[r, s] = -1
            counts[r, s, :] = 0
            totals[r, s] = 0


@njit(cache=True)
def append_step(history, lengths, keys, counts, totals, active, fed, accepted, next_byte) -> None:
    """After a chain step: every ``active`` row's text gains its accepted drafts (``fed`` [B, P]'s
    columns 1..``accepted``) and its ``next_byte`` (the pending byte was appended when decided)."""
    for r in range(active.size):
        if active[r]:
            new = np.empty(accepted[r] + 1, np.int64)
            new[: accepted[r]] = fed[r, 1 : 1 + accepted[r]]
            new[accepted[r]] = next_byte[r]
            append(history, lengths, keys, counts, totals, r, new)


@njit(cache=True)
def apply_context(out: np.ndarray, counts, totals, r: int, s: int, pseudo: float, strength: float) -> bool:
    """Multiply ``out`` [V] by the in-context factor ``((257 n(c) + k) / (N + k)) ** t`` of the bytes
    ``c`` after row ``r``'s pair in slot ``s`` (``n(c)`` its counts, ``N`` their sum, ``k`` =
    ``pseudo``, ``t`` = ``strength``): the pair's in-context distribution smoothed toward uniform by
    ``k`` pseudo-counts, over uniform. The more often the pair has been seen, the more it weighs.
    Weights are only ever used up to a common factor (a draft is an argmax, or drawn from the
    weighted distribution renormalised), so the factor is applied divided by that of a byte never
    seen after the pair, ``(k / (N + k)) ** t``: only the few bytes that were seen change.
    -> False (``out`` untouched) when the pair is unseen, where the factor is the same for all."""
    if s < 0 or strength == 0 or totals[r, s] == 0:
        return False
    for c in range(out.size):
        n = counts[r, s, c]
        if n > 0:
            out[c] *= ((PAIR_BASE * n + pseudo) / pseudo) ** strength
    return True


@njit(cache=True)
def lookup(history, lengths, r: int, min_match: int, longest: int, out: np.ndarray) -> int:
    """Row ``r``'s lookup draft: where its text's last ``min_match``.. bytes occurred before (the
    longest such match, up to 32 bytes; the most recent of equal ones), the bytes that followed
    there, up to ``longest`` of them, into ``out``. A match close to the end runs on into its own
    proposal (a repeating text repeats on). -> how many bytes (0: no match)."""
    n = lengths[r]
    best, best_len = -1, 0
    for i in range(n - 2, min_match - 2, -1):  # i: the last byte of an earlier occurrence
        k = 0
        while k < 32 and k <= i and history[r, i - k] == history[r, n - 1 - k]:
            k += 1
        if k > best_len:
            best, best_len = i, k
            if k == 32:
                break
    if best_len < min_match:
        return 0
    for j in range(longest):
        src = best + 1 + j
        out[j] = history[r, src] if src < n else out[src - n]
    return longest
