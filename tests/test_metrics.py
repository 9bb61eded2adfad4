import math

import pytest

from finetune.training.metrics import (
    MAX_LOOP_SPAN,
    aggregate,
    exact_match,
    normalize_text,
    perplexity,
    repeated_ngram_loop,
    token_f1,
    tokenize_for_f1,
)

NORMAL_ENGLISH = (
    "The history of the alpaca begins in the highlands of the Andes, where people bred them from "
    "wild vicuñas thousands of years ago. Most of the world's alpacas still live in Peru, and the "
    "fibre of the animal is prized because it is warm, light and soft. Farmers shear them once a "
    "year, usually in spring, and one of the largest markets for the wool is in Arequipa. Very, "
    "very few animals are kept for meat; the rest of the herd is kept for fibre."
)
NORMAL_CHINESE = (
    "羊驼原产于南美洲的安第斯山脉，是由野生小羊驼驯化而来的。它们的毛又轻又暖，价格很高。"
    "农民通常每年春天剪一次毛，然后把毛卖到阿雷基帕的市场。哈哈，说到这里你是不是也想去看看？"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat, sat on a mat!", "cat sat on mat"),
        ("An apple a day.", "apple day"),
        ("The theory of an anthem", "theory of anthem"),
        ("  lots \t of\n\nspace  ", "lots of space"),
        ("你好，世界！“测试”（一）《书》、：；。", "你好 世界 测试 一 书"),
        ("ＡＢＣ１２３　ｈｅｌｌｏ", "abc123 hello"),
        ("北京是中国的首都。", "北京是中国的首都"),
        ("Python，Java", "python java"),
        ("。！？", ""),
    ],
)
def test_normalize_text(text: str, expected: str) -> None:
    assert normalize_text(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("我喜欢 Python 3", ["我", "喜", "欢", "python", "3"]),
        ("python3中文", ["python3", "中", "文"]),
        ("The answer: 42.", ["answer", "42"]),
        ("ひらがなカタカナ", ["ひ", "ら", "が", "な", "カ", "タ", "カ", "ナ"]),
        ("ｶﾅ", ["カ", "ナ"]),
        ("안녕!", ["안", "녕"]),
        ("㐀㐁", ["㐀", "㐁"]),
        ("", []),
    ],
)
def test_tokenize_for_f1(text: str, expected: list[str]) -> None:
    assert tokenize_for_f1(text) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("The answer is 42.", "answer is 42", 1.0),
        ("北京。", "北京", 1.0),
        ("ＡＢＣ", "abc", 1.0),
        ("北京", "上海", 0.0),
        ("42", "43", 0.0),
        ("the cat", "cat sat", 0.0),
    ],
)
def test_exact_match(prediction: str, reference: str, expected: float) -> None:
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        # 2 shared of 3 and 3: P = R = 2/3.
        ("big red dog", "red dog barks", 2 / 3),
        # Articles dropped: "cat sat on mat" vs "cat sat on rug", P = R = 3/4.
        ("The cat sat on the mat.", "A cat sat on a rug", 0.75),
        # Repeats count, clipped to the smaller count: two "go" shared, P = 2/3, R = 1.
        ("go go go", "go go", 0.8),
        ("cat", "dog", 0.0),
        # Same characters in another order.
        ("北京是中国的首都", "中国的首都是北京", 1.0),
        # 北, 京 shared; P = 2/4, R = 2/5 -> 2 * 0.2 / 0.9.
        ("北京很大", "北京是首都", 4 / 9),
        # 我, 喜, 欢, 3 shared of 5 and 5.
        ("我喜欢 Python 3", "我喜欢Java 3", 0.8),
        ("", "", 1.0),
        ("。！", "the", 1.0),
        ("", "北京", 0.0),
        ("北京", "", 0.0),
    ],
)
def test_token_f1(prediction: str, reference: str, expected: float) -> None:
    assert token_f1(prediction, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "the cat sat. the cat sat. the cat sat. the cat sat.",
        "The cat sat. the cat sat. THE CAT SAT.",
        "哈哈哈哈哈哈哈哈哈哈哈哈",
        "我爱你。我爱你。我爱你。我爱你。",
        # A period-3 cycle is not a repeated 4-gram at stride 4 but covers 12 tokens.
        "好的呀好的呀好的呀好的呀",
        # A loop in the middle counts when the span is short.
        "Sure. no no no no no no no no no no no no. Anyway, here it is.",
        # Tail rule: a 6-token sentence repeated, the last copy cut off.
        "Hello! I am a helpful assistant. I am a helpful assistant. I am a helpful assistant. I am a",
        "答案如下：" + "这是一个很长的句子。" * 3,
    ],
)
def test_repeated_ngram_loop_detects_loops(text: str) -> None:
    assert repeated_ngram_loop(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yes",
        "哈哈哈",
        "哈" * 11,
        "very very very good",
        "the cat sat. the cat sat.",
        "我爱你。我爱你。",
        "Wait ...... and then ------------ a rule",
        NORMAL_ENGLISH,
        NORMAL_CHINESE,
        # A long sentence repeated three times, but the text moves on afterwards.
        "I am a helpful assistant. " * 3 + "What would you like to know today?",
    ],
)
def test_repeated_ngram_loop_ignores_normal_text(text: str) -> None:
    assert not repeated_ngram_loop(text)


def test_repeated_ngram_loop_parameters() -> None:
    assert repeated_ngram_loop("哈哈哈", n=1, min_repeats=3)
    assert not repeated_ngram_loop("哈哈哈哈哈哈哈哈哈哈哈哈", n=4, min_repeats=4)
    assert repeated_ngram_loop("a b c a b c a b c then more", n=3, min_repeats=3)
    assert not repeated_ngram_loop("a b c a b c a b c then more", n=2, min_repeats=3)
    span = " ".join(f"w{i}" for i in range(MAX_LOOP_SPAN + 1))
    assert not repeated_ngram_loop(f"{span} {span} {span}")
    with pytest.raises(ValueError, match="min_repeats"):
        repeated_ngram_loop("text", min_repeats=1)


def test_aggregate() -> None:
    rows = [
        {"em": 1.0, "f1": 0.5, "loop": True, "id": "a", "ppl": 4},
        {"em": 0.0, "f1": 1.0, "loop": False, "id": "b"},
    ]
    assert aggregate(rows) == {"em": 0.5, "f1": 0.75, "loop": 0.5, "ppl": 4.0}
    assert aggregate([{"name": "x"}]) == {}
    assert aggregate([]) == {}


def test_perplexity() -> None:
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(4.0)) == pytest.approx(4.0)
    assert math.isfinite(perplexity(709.0))
    assert perplexity(710.0) == math.inf
    assert perplexity(1e6) == math.inf
