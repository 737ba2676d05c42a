"""The text analyzer both full-text backends share: text in, search terms out.

NFKC, lower case, diacritics folded, runs of letters and digits, the original Porter stemmer.
Documents keep every term (stopwords count in row length); queries drop stopwords and keep at
most `MAX_QUERY_TERMS` distinct terms. A term is letters and digits only, so it is safe to put
into any match syntax.
"""

from __future__ import annotations

import re
import threading
import unicodedata

import Stemmer

#: Terms kept from one query; a 10 KB paste is cut to its first distinct words.
MAX_QUERY_TERMS = 64
#: Characters of user text looked at; the rest cannot change a 64-term query.
MAX_QUERY_CHARS = 4096
#: Longer runs of letters are not words (base64, unsegmented CJK lines); PostgreSQL would
#: refuse lexemes past 2 KB.
MAX_TERM_CHARS = 64

_TOKEN_RE = re.compile(r"[^\W_]+")

#: Words that carry no topic: dropped from queries (documents keep them, they count in row
#: length). They would otherwise make an OR query match nearly every row.
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves""".split()
)

# PyStemmer objects are not thread-safe: one per thread (each keeps its own stem cache).
_local = threading.local()


def _stem_words(words: list[str]) -> list[str]:
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = Stemmer.Stemmer("porter", 100_000)
    # Porter reduces a lone "s" to nothing; an empty term would be no term at all.
    return [stem or word for stem, word in zip(stemmer.stemWords(words), words)]


def _words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits of `text`, diacritics folded, junk runs dropped."""
    text = unicodedata.normalize("NFKC", text).lower()
    if not text.isascii():
        text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return [w for w in _TOKEN_RE.findall(text) if len(w) <= MAX_TERM_CHARS]


def analyze(text: str | None) -> list[str]:
    """The terms of `text` as both backends index them, in order (stopwords kept)."""
    return _stem_words(_words(text)) if text else []


def query_words(query: object) -> list[str]:
    """The distinct words of any user text, unstemmed, stopwords dropped, in order (snippets)."""
    if not isinstance(query, str):
        return []
    seen: dict[str, None] = {}
    for word in _words(query[:MAX_QUERY_CHARS]):
        if word not in STOPWORDS:
            seen[word] = None
    return list(seen)


def query_terms(query: object) -> list[str]:
    """The distinct analyzed terms of any user text, stopwords dropped, in order.

    Operators, quotes, punctuation, emoji and control characters are separators, so the
    result is safe to put into any match syntax.
    """
    terms = dict.fromkeys(_stem_words(query_words(query)))
    return list(terms)[:MAX_QUERY_TERMS]
