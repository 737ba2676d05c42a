"""Person names in a paper's author block: the lines under the title split into given and family names.

A line holds names separated by commas, "and", wide gaps or nothing at all ("Sage A. Weil
Andrew W. Leung"); affiliations, places and e-mail addresses end or are cut from a run. Each
person is {"given", "family"} and "suffix" when printed ("Jr."). Plain Python; no Dagster.
"""

from __future__ import annotations

import re

from research_pipeline.lib.ingest.page_lines import (
    PageLine,
    find_author_lines,
    letters,
    same_size,
)

_PARTICLES = frozenset("van von de der den da di du la le del della dos das bin ibn al el ten ter zu y st.".split())
_ORG_RE = re.compile(
    r"(?i)\b(?:universit\w*|univ\.?|college|institut\w*|department|dept\.?|school|laborator\w*|labs?|research"
    r"|cent(?:er|re)|inc\.?|corp\.?|corporation|company|ltd\.?|gmbh|group|division|project|foundation|academy"
    r"|society|national|technolog\w*|systems|sciences?|engineering|computing|computer|faculty|program+e?"
    r"|google|microsoft|ibm|intel|yahoo!?|facebook|akamai|nokia|xerox|amazon|apple|oracle|sun microsystems"
    r"|microsystems|bell|at&t|mit|cmu|epfl|inria|cnrs|csiro|nasa|berkeley|stanford|cornell|princeton|usa|u\.s\.a\."
    r"|uk|street|avenue|road|box|square|polytechni\w*|ecole|école|telecom|télécom|paristech|lab\.?|hospital"
    r"|ministry|agency|council|conference|paper|profile|publications?|citations?|reads|abstract|introduction"
    r"|keywords?|draft|report|supervised|advisers?|editor|chair|email|e-mail|www|http"
    r"|departament\w*|departement|dipartimento|informati\w+|h[oö]gskola|universidad|universit[aàäé]\w*"
    r"|building|entertainment|intelligence|germany|france|italy|spain|portugal|china|japan|canada|australia"
    r"|india|israel|switzerland|netherlands|sweden|denmark|norway|finland|korea|brazil|austria|belgium)\b"
)


_INITIALS_RE = re.compile(r"^(?:[A-Z]\.?-?){1,3}\.?$|^[A-Z]\.(?:-?[A-Z]\.)+$")
_NAME_WORD_RE = re.compile(r"^[^\W\d_][^\W\d_'’\-]*(?:['’\-][^\W\d_]+)*\.?$")
_FOOTNOTE_DIGITS_RE = re.compile(r"(?<=[^\W\d_])\d+(?:,\d+)*\b")
_EMAIL_RE = re.compile(r"[(<]?\s*[\w.+\-]+@[\w.\-]+\s*[)>]?")
# A place, not a person: "Santa Clara, CA", "Palo Alto, California", "Ithaca, NY".
_PLACE_AFTER_RE = re.compile(
    r"^(?:[A-Z]{2}|USA|U\.S\.A\.|UK|Alabama|Alaska|Arizona|Arkansas|California|Colorado|Connecticut|Delaware"
    r"|Florida|Georgia|Hawaii|Idaho|Illinois|Indiana|Iowa|Kansas|Kentucky|Louisiana|Maine|Maryland"
    r"|Massachusetts|Michigan|Minnesota|Mississippi|Missouri|Montana|Nebraska|Nevada|New Hampshire"
    r"|New Jersey|New Mexico|New York|North Carolina|North Dakota|Ohio|Oklahoma|Oregon|Pennsylvania"
    r"|Rhode Island|South Carolina|South Dakota|Tennessee|Texas|Utah|Vermont|Virginia|Washington"
    r"|West Virginia|Wisconsin|Wyoming|Canada|England|Scotland|United Kingdom|United States)"
    r"(?:\s+\d[\d\-]*)?\.?$")  # the whole piece: "CA 94304", not "Massachusetts Institute of ..."
_SUFFIX_RE = re.compile(r"^(?:Jr\.?|Sr\.?|II|III|IV)$")
_NOT_NAME_WORDS = frozenset("and by with of the for in on at to from".split())
_BY_RE = re.compile(r"^(?:by|BY|By|Prof\.|Professor|Dr\.|Mr\.|Mrs\.|Ms\.)\s+")
_NAME_SPLIT_RE = re.compile(r"\s*[,;]\s*|\s+(?:and|AND|And)\s+|\s*&\s*")


def _name_word(token: str) -> str | None:
    """'initial', 'particle', 'word' (a capitalised or all-caps name word) or None."""
    if _INITIALS_RE.match(token):
        return "initial"
    if token.lower() in _PARTICLES and token.islower():
        return "particle"
    if token.lower() in _NOT_NAME_WORDS:
        return None
    if _NAME_WORD_RE.match(token) and token[0].isupper() and letters(token) >= 2:
        return "word"
    return None


def _split_run(tokens: list[str]) -> list[list[str]]:
    """Names in a run that no comma separates ("Sage A. Weil Andrew W. Leung", "S E Robertson S Walker").

    A name ends after a full word when the next token starts another name; three full words,
    or four without initials, are one name ("Angela Demke Brown", "Ana Candida Cruz Natali").
    """
    kinds = [_name_word(t) for t in tokens]
    words = sum(1 for k in kinds if k == "word")
    if words < 4 or (words == 4 and "initial" not in kinds) or None in kinds:
        return [tokens]  # a phrase with a word no name has ("An Overlooked Paradigm in ...") stays whole
    names: list[list[str]] = [[]]
    for token, kind in zip(tokens, kinds):
        current = names[-1]
        if current and len(current) >= 2 and _name_word(current[-1]) == "word" and kind in ("word", "initial"):
            names.append([])
        names[-1].append(token)
    return names


def _person(tokens: list[str]) -> dict[str, str] | None:
    """{'given', 'family'} (and 'suffix': "Jr.") for a name's tokens, or None if they are no person's name."""
    if not 2 <= len(tokens) <= 5:
        return None
    suffix = tokens[-1] if len(tokens) > 2 and _SUFFIX_RE.match(tokens[-1]) else ""
    if suffix:
        tokens = tokens[:-1]
    kinds = [_name_word(t) for t in tokens]
    if None in kinds or kinds[-1] != "word" or kinds[0] == "particle":
        return None
    k = len(tokens) - 1
    # Particles belong to the family name ("van Renesse"), capitalised ones too after a given
    # name ("Alfredo De la Fuente").
    while k > 1 and (kinds[k - 1] == "particle" or tokens[k - 1].lower() in _PARTICLES):
        k -= 1
    given = " ".join(_name_case(t) for t in tokens[:k])
    family = " ".join(_name_case(t) for t in tokens[k:])
    if not given:
        return None
    return {"given": given, "family": family, "suffix": suffix} if suffix else {"given": given, "family": family}


def _name_case(token: str) -> str:
    # "HOARE" -> "Hoare"; initials and mixed-case names ("McKenney") stay as printed.
    if token.isupper() and letters(token) >= 3:
        return "-".join(p.capitalize() for p in token.split("-"))
    return token


def _names_in(text: str) -> list[dict[str, str]]:
    """The person names in one run of author text ("A. Fox, E. Brewer and J. Doe")."""
    text = _FOOTNOTE_DIGITS_RE.sub("", _EMAIL_RE.sub(" ", text).strip())
    if not text or re.search(r"\d|@|\{|\}|\(|\)|:", text):
        return []
    if ";" in text and "," in text:
        # "Bonnichsen, Lars Frydendal; Karlsson, Sven": family name first. "Qi Chen, Peking
        # University; Zhaoguo Wang and Russell Power, New York University": names, affiliation.
        out = []
        for piece in text.split(";"):
            piece = re.sub(r"\s+(?:and|AND|And|&)\s*$", "", piece)  # "Sachin Katti and" / "Mendel ..."
            family, _, given = piece.partition(",")
            if not given.strip() or _ORG_RE.search(given):
                out.extend(_names_in(family))
                continue
            if _ORG_RE.search(piece):
                break
            person = _person(given.split() + family.split()) if given.strip() else None
            if person:
                person = {"given": " ".join(given.split()), "family": " ".join(family.split())}
                out.append(person)
        return out
    out = []
    pieces = _NAME_SPLIT_RE.split(text)
    for k, piece in enumerate(pieces):
        if _ORG_RE.search(piece):
            break  # an affiliation; what follows it is its place ("University of California, Santa Cruz")
        if k + 1 < len(pieces) and _PLACE_AFTER_RE.match(pieces[k + 1].strip()):
            break  # a town before its state or country
        tokens = _tokens(_BY_RE.sub("", re.sub(r"^(?:and|AND|And|&)\s+", "", piece)))
        for run in _split_run(tokens):
            person = _person(run)
            if person:
                out.append(person)
    return out


def _tokens(text: str) -> list[str]:
    return text.replace("\u00a0", " ").split()


def person_names(parts: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
    """The names in a line's parts, or in the parts joined when that finds more ("CYNTHIA DWORK AND ...")."""
    def names_in(pieces: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
        names = []
        for piece in pieces:
            for sub in re.split(r"\s+[–—|·•]\s+|\s{2,}", piece):
                names.extend(_names_in(sub))
        return names

    separate = names_in(parts)
    if len(parts) > 1:
        joined = names_in([" ".join(parts)])
        if len(joined) > len(separate):
            return joined
    return separate


def only_names(text: str) -> list[dict[str, str]]:
    """The names in `text` when they are all it says ("Ken Birman"), else []."""
    names = person_names([text])
    words = sum(len(n["given"].split()) + len(n["family"].split()) for n in names)
    return names if names and words == len(re.findall(r"[^\W\d_][^\s,;&]*", _BY_RE.sub("", text))) - len(
        re.findall(r"\b(?:and|AND|And)\b", text)) else []


def authors_from_lines(
    lines: list[PageLine], block: list[int], below: list[int] | None = None
) -> list[dict[str, str]]:
    """Person names on the lines between the title and the abstract (`below`, the lines found there)."""
    names: list[dict[str, str]] = []
    seen: set[str] = set()
    size = 0.0  # the authors' font size, from the first line with names
    for i in find_author_lines(lines, block) if below is None else below:
        ln = lines[i]
        if size and not same_size(ln.size, size):
            continue  # affiliation and address lines are set smaller ("Santa Clara", "Palo Alto")
        found = person_names(ln.parts or (ln.text,))
        if found and not size:
            size = ln.size
        for person in found:
            key = f"{person['given']} {person['family']}".casefold()
            if key not in seen:
                seen.add(key)
                names.append(person)
    return names


def authors_from_info(info: dict[str, str], first_page: str) -> list[dict[str, str]]:
    """The info dict's authors, when each of them is printed on page 1 (else it is an account name)."""
    raw = (info.get("Author") or "").strip()
    if not raw or len(raw) > 500:
        return []
    page = " ".join(first_page.split()).casefold()
    names = []
    for person in _names_in(raw) if not _ORG_RE.search(raw) else []:
        if person["family"].casefold() not in page:
            return []
        names.append(person)
    return names
