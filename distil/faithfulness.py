"""Is a summary backed by its report? Numbers and content words the report lacks: pure functions over strings.

ROUGE rewards a summary that names a plausible MRA the report never mentions; these measures do not.
The same number reader serves the teacher's source grounding (teacher_serving/grounding.py).

Numbers. A number is a run of digits not glued to a preceding letter or digit (`pO2`, `CD4` are
names, not numbers); a unit glued after it does not matter (`5mg` is 5). Its value is read with
the language's decimal mark: a separator followed by other than 3 digits is a decimal mark (11,7
= 11.7); several equal separators before 3-digit groups are thousands separators
(1,056,000 = 1.056.000 = 1 056 000, with a space, no-break or narrow no-break space); a lone
separator before exactly 3 digits is read by the language: in English `,` groups thousands and
`.` is decimal (3,110 = 3110; 7.418 = 7.418), in Spanish, French and Portuguese the reverse
(6.840 = 6840; 3,125 = 3.125); 0,001 and 0.001 are always decimals. Values are compared, not
spellings (2.50 = 2.5, 07 = 7). A numeric date (12/03/2020, 2020-03-12, 12.03.20) is one number
whose parts are its components (12, 3, 2020); so is a run that reads as no single number (a list
written 1,2,3). A number is supported when each of its parts is a value written somewhere in the
report (report dates contribute their components), so the date 12/03/2020 is supported by a
report writing 2020-03-12, not by one writing "12 de marzo de 2020". Numbers written in words are
not read.

Content words. Runs of letters (no digits), NFC, lowercased, of 3 letters or more, not in the
language's stop list below. A content word is in the report when its Snowball stem (accents
dropped first) is the stem of a word of the report (fevers ~ fever; neumonia ~ neumonía). A novel word
is a cheap proxy for an invented finding: read it against the gold summaries' own rate, since a
good summary also uses words of its own.

Every measure counts occurrences (a looped invention counts each time) and is 0 for a summary
with nothing to count.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from decimal import Decimal
from typing import NamedTuple

SNOWBALL_LANGUAGES = {"en": "english", "es": "spanish", "fr": "french", "pt": "portuguese"}  # Snowball stemmer names
DECIMAL_MARK = {"en": ".", "es": ",", "fr": ",", "pt": ","}  # the reading of a lone separator before 3 digits
SPACES = " \u00a0\u2009\u202f"  # space, no-break, thin, narrow no-break: thousands separators before 3 digits
DATE = re.compile(r"(?<![\w.,/-])(\d{1,4})([/.-])(\d{1,2})\2(\d{1,4})(?![\w/-]|[.,]\d)")
NUMBER = re.compile(rf"(?<!\w)(?<!\d[.,])\d+(?:(?:[.,]|[{SPACES}](?=\d{{3}}(?!\d)))\d+)*")
SEPARATOR = re.compile(rf"[.,{SPACES}]")
LETTERS = re.compile(r"[^\W\d_]+")

STOP_WORDS = {lang: frozenset(words.split()) for lang, words in {
    "en": """the and for are but not you all any can had her was one our out has have him his how its may now own
        she too who why yet also been both did does each from into just more most much must only other over same
        some such than that them then there these they this those very were what when where which while will with
        would about after again against because before being below between could down during few further here
        hers herself himself itself off once ourselves should their theirs themselves through under until upon your
        yours via within without whom whose shall might doing having nor per due thus however therefore although
        though whether either neither above across along among around behind beside beyond toward towards onto
        since even still well also another every many several""",
    "es": """que los las del con por para una uno unos unas como más mas pero sus este esta estos estas ese esa esos
        esas eso esto aquel aquella entre sin sobre tras desde hasta durante mediante según segun también tambien muy
        cuando donde quien quienes cual cuales cuyo cuya porque aunque mientras fue fueron era eran ser sido siendo
        está esta están estan estaba estaban estar estuvo había habia habían habian han has hay haber hubo tiene
        tenía tenia tener tuvo son sea ello ella ellos ellas nos les otro otra otros otras todo toda todos todas cada
        mismo misma mismos mismas así asi tanto tan sólo solo luego después despues antes además ademas dicho dicha
        sino pues qué cómo cuál dónde cuándo hacia contra bajo ante cual sus suyo suya nuestro nuestra mucho mucha
        muchos muchas poco poca varios varias algún algun alguna algunos algunas ningún ninguna""",
    "fr": """les des une dans par pour sur avec sans sous entre vers chez qui que quoi dont est sont été etait était
        étaient être avoir avait avaient ont aux ces cet cette son ses leur leurs nous vous ils elle elles lui mais
        donc car pas plus très tres aussi après apres avant pendant depuis lors comme tout tous toute toutes autre
        autres même mêmes ainsi alors quand chaque celui celle ceux celles cela ceci fut sera étant ayant non puis
        selon encore déjà deja lorsque tandis quelque quelques plusieurs aucun aucune notre votre une via fait
        afin auprès jusqu""",
    "pt": """que dos das com por para uma umas uns não nao mais mas como seu sua seus suas este esta estes estas esse
        essa esses essas isso isto aquele aquela entre sem sobre após apos desde até ate durante também tambem muito
        muita muitos muitas quando onde quem qual quais cujo cuja porque embora enquanto foi foram era eram ser sido
        sendo está esta estão estao estava estavam estar esteve havia tem tinha tinham ter teve são sao seja ele ela
        eles elas nos lhe lhes outro outra outros outras todo toda todos todas cada mesmo mesma assim tanto tão tao
        apenas logo depois antes além alem pelo pela pelos pelas num numa nas aos dum duma já contra sob ante pouco
        pouca vários varios várias varias algum alguma alguns algumas nenhum nenhuma nosso nossa""",
}.items()}


class Share(NamedTuple):
    """`count` of `total` items of a summary (unsupported numbers, novel words); share = count / total, 0 if none."""
    share: float
    count: int
    total: int


class Mention(NamedTuple):
    """A number (or date) of a text: where it is and the canonical values that must all occur in the report."""
    start: int
    end: int
    parts: tuple[str, ...]


def _check(lang: str) -> None:
    if lang not in SNOWBALL_LANGUAGES:
        raise ValueError(f"unknown language {lang!r} for faithfulness; supported: {sorted(SNOWBALL_LANGUAGES)}")


def _canonical(digits: str) -> str:
    """One spelling per value: 2.50 -> 2.5, 007 -> 7, 3.0 -> 3."""
    return format(Decimal(digits).normalize(), "f")


def read_number(token: str, lang: str) -> tuple[str, ...]:
    """The value of one digit run as (canonical,), or its parts when it reads as no single number."""
    _check(lang)
    groups, seps = SEPARATOR.split(token), [" " if s in SPACES else s for s in SEPARATOR.findall(token)]
    if not seps:
        return (_canonical(token),)
    last, lone = seps[-1], len(seps) == 1
    decimal = last in ".," and (
        len(groups[-1]) != 3                                          # 11,7  2.50
        or (not lone and seps[-2] != last)                            # 1.056,500  1,056.500
        or (lone and (groups[0] == "0" or last == DECIMAL_MARK[lang])))  # 0,001; 7.418 in en, 3,125 in es
    whole, whole_seps = (groups[:-1], seps[:-1]) if decimal else (groups, seps)
    grouped = len(set(whole_seps)) <= 1 and (not decimal or last not in whole_seps) and \
        (not whole_seps or (len(whole[0]) <= 3 and all(len(g) == 3 for g in whole[1:])))
    if not grouped:
        return tuple(_canonical(g) for g in groups)
    return (_canonical("".join(whole) + ("." + groups[-1] if decimal else "")),)


def number_mentions(text: str, lang: str) -> list[Mention]:
    """Every number and numeric date of `text`, in order; a date's parts are its components."""
    text = unicodedata.normalize("NFC", text)
    dates = [Mention(m.start(), m.end(), tuple(_canonical(m.group(i)) for i in (1, 3, 4))) for m in DATE.finditer(text)]
    masked = DATE.sub(lambda m: " " * len(m.group()), text)
    numbers = [Mention(m.start(), m.end(), read_number(m.group(), lang)) for m in NUMBER.finditer(masked)]
    return sorted(dates + numbers)


@functools.lru_cache(maxsize=256)
def _report_values(report: str, lang: str) -> frozenset[str]:
    return frozenset(p for m in number_mentions(report, lang) for p in m.parts)


def unsupported_number_mentions(summary: str, report: str, lang: str) -> tuple[list[Mention], list[Mention]]:
    """(all numbers of the summary, those with a part the report never writes)."""
    values = _report_values(unicodedata.normalize("NFC", report), lang)
    mentions = number_mentions(summary, lang)
    return mentions, [m for m in mentions if not set(m.parts) <= values]


def unsupported_numbers(summary: str, report: str, lang: str) -> Share:
    """Numbers (doses, lab values, ages, dates) of the summary that occur nowhere in the report."""
    mentions, unsupported = unsupported_number_mentions(summary, report, lang)
    return Share(len(unsupported) / len(mentions) if mentions else 0.0, len(unsupported), len(mentions))


@functools.lru_cache(maxsize=1 << 16)
def _key(word: str, lang: str) -> str:
    """Snowball stem of the word without accents: how a word is compared with the report's words (accents are
    dropped first, so neumonia and neumonía stem alike)."""
    bare = "".join(c for c in unicodedata.normalize("NFD", word) if not unicodedata.combining(c))
    return _stemmer(lang).stem(bare) if len(bare) > 3 else bare


@functools.lru_cache(maxsize=None)
def _stemmer(lang: str):
    from nltk.stem import SnowballStemmer

    return SnowballStemmer(SNOWBALL_LANGUAGES[lang])


def content_words(text: str, lang: str) -> list[tuple[int, int, str]]:
    """(start, end, word) of each content word of `text` (NFC, lowercased; see the module docstring)."""
    _check(lang)
    text = unicodedata.normalize("NFC", text)
    return [(m.start(), m.end(), w) for m in LETTERS.finditer(text)
            if len(w := m.group().lower()) >= 3 and w not in STOP_WORDS[lang]]


@functools.lru_cache(maxsize=256)
def _report_keys(report: str, lang: str) -> frozenset[str]:
    return frozenset(_key(w.lower(), lang) for w in LETTERS.findall(report))


def novel_word_spans(summary: str, report: str, lang: str) -> tuple[int, list[tuple[int, int, str]]]:
    """(how many content words the summary has, the (start, end, word) of those absent from the report)."""
    words = content_words(summary, lang)
    keys = _report_keys(unicodedata.normalize("NFC", report), lang)
    return len(words), [w for w in words if _key(w[2], lang) not in keys]


def novel_terms(summary: str, report: str, lang: str) -> Share:
    """Content words of the summary whose stem no word of the report has: a proxy for invented findings."""
    total, novel = novel_word_spans(summary, report, lang)
    return Share(len(novel) / total if total else 0.0, len(novel), total)


def unsupported_spans(summary: str, report: str, lang: str) -> list[tuple[int, int]]:
    """(start, end) in the NFC summary of every unsupported number and novel content word, in order."""
    _, numbers = unsupported_number_mentions(summary, report, lang)
    _, words = novel_word_spans(summary, report, lang)
    return sorted([(m.start, m.end) for m in numbers] + [(s, e) for s, e, _ in words])
