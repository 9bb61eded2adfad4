"""Text metrics for comparing generated answers with expected answers (English and CJK).

SQuAD-style normalization, made CJK-aware: CJK text has no spaces, so CJK characters count as one
token each, and punctuation (ASCII, full-width and CJK) becomes a word separator.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping

# Hiragana, Katakana, CJK Unified Ideographs Extension A, CJK Unified Ideographs, Hangul syllables.
_CJK = "\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_F1_TOKEN = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
# Raw tokens keep punctuation: a run of punctuation/symbols is one token, so "......" or a
# markdown rule "-----" is a single token rather than a "loop" of identical characters.
_RAW_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]+")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_ASCII_PUNCTUATION = frozenset(string.punctuation)
# Longest repeated span (in raw tokens) that the tail-loop rule looks for.
MAX_LOOP_SPAN = 64


def _is_punctuation(ch: str) -> bool:
    return ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P")


def normalize_text(s: str) -> str:
    """NFKC, lower-case, punctuation to spaces, drop English articles, collapse whitespace.

    NFKC folds full-width letters, digits and most full-width punctuation to ASCII; every Unicode
    punctuation character (category P*, e.g. 。、“”《》) and every ASCII `string.punctuation`
    character is then replaced by a space. Unlike SQuAD, which deletes punctuation, a space keeps
    "Python，Java" as two words; the cost is that "1,000" and "1000" differ.
    """
    s = unicodedata.normalize("NFKC", s).lower()
    s = "".join(" " if _is_punctuation(ch) else ch for ch in s)
    return " ".join(_ARTICLES.sub(" ", s).split())


def tokenize_for_f1(s: str) -> list[str]:
    """Tokens of `normalize_text(s)`: one per CJK character, whitespace-split words otherwise."""
    return _F1_TOKEN.findall(normalize_text(s))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both strings are equal after `normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 over `tokenize_for_f1` tokens; 1.0 when both are empty, 0.0 when one is."""
    pred, ref = tokenize_for_f1(prediction), tokenize_for_f1(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _raw_tokens(text: str) -> list[str]:
    """NFKC + lower-case tokens that keep punctuation and articles; CJK one per character."""
    return _RAW_TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def repeated_ngram_loop(text: str, n: int = 4, min_repeats: int = 3) -> bool:
    """Whether the output degenerates into a loop of repeated tokens.

    Tokens: NFKC, lower-cased; one per CJK character, one per run of other letters/digits, one per
    run of punctuation/symbols (so "。" and "." count, and "------" is one token). A stretch of
    tokens is *periodic with period p* when every token in it equals the token p positions earlier,
    i.e. a span of p tokens repeated back to back (a truncated last copy allowed). True when:

    1. anywhere: a periodic stretch with p <= n spans at least `n * min_repeats` tokens (an n-gram
       repeated `min_repeats` times, or a shorter cycle covering as many tokens: "哈" x 12); or
    2. at the end: the text ends in a periodic stretch with n < p <= MAX_LOOP_SPAN that spans at
       least `p * min_repeats` tokens (a sentence the model never got out of).

    With the defaults, "哈哈哈" or "very very very" do not trigger (3 < 12 tokens), while
    "我爱你。" x 3 (12 tokens, p = 4) does.
    """
    if n < 1 or min_repeats < 2:
        raise ValueError(f"n={n}, min_repeats={min_repeats}: need n >= 1 and min_repeats >= 2")
    tokens = _raw_tokens(text)
    for p in range(1, n + 1):
        run = 0  # consecutive positions whose token equals the one p earlier
        for j in range(p, len(tokens)):
            run = run + 1 if tokens[j] == tokens[j - p] else 0
            if run + p >= n * min_repeats:
                return True
    for p in range(n + 1, min(MAX_LOOP_SPAN, len(tokens) // min_repeats) + 1):
        tail = len(tokens) - p
        run = next((k for k in range(tail) if tokens[-1 - k] != tokens[-1 - k - p]), tail)
        if run + p >= p * min_repeats:
            return True
    return False


def aggregate(rows: Iterable[Mapping[str, object]]) -> dict[str, float]:
    """Mean of each numeric key (bools count as 0/1) over the rows that have it; others ignored."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if isinstance(value, int | float):
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
    return {key: total / counts[key] for key, total in sums.items()}


def perplexity(mean_loss: float) -> float:
    """exp(mean_loss), or inf where that overflows a float (mean_loss above ~709.78)."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


def states_fact(answer: str, fact: str) -> bool:
    """Whether `answer` states `fact` verbatim, after `normalize_text` on both (so case, width and
    punctuation do not matter): the exact-match test for a fact inside a long answer."""
    return normalize_text(fact) in normalize_text(answer)
