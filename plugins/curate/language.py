"""`language`: a small, honest language guess, and a filter on it.

How it guesses: first the script of the letters (Latin, Cyrillic, Greek, Arabic, Hebrew, Devanagari,
Thai, Hangul, kana, Han); a script used by one major language names it (Greek -> el, Hangul -> ko,
kana -> ja, Han without kana -> zh, Hebrew -> he, Thai -> th, Devanagari -> hi, Arabic script -> ar).
For Latin and Cyrillic text it counts the words that are common function words ("stop words") of
each language it knows (en, de, fr, es, it, pt, nl, sv, pl, tr; ru, uk) and picks the language with
the largest share. The score is that share (for a script-only guess, the share of letters in that
script). Ordinary prose scores 0.3-0.6 in its language; lists, code and very short texts score low and
are reported as ``unknown``.

What it cannot do: tell apart languages it has no list for (Danish reads as Swedish or Norwegian is
unknown), mixed-language texts (the larger part wins), or languages that share a script it names
(Persian and Urdu read as ``ar``, Marathi as ``hi``). It is meant to drop text that is clearly in
another language, not to label a corpus.
"""

from __future__ import annotations

import re
from collections import Counter

from pydantic import Field

from llmforge_plugins.curate.api import CurationStep, Drop, StepOptions, row_text

_STOP = {
    "en": "the of and to in is that it for was on are as with his they at be this from have or by one had not "
    "but what all were when we there can an your which their if do will each about how up out them then "
    "she many some so these would has more her two like him see could no than been who its now my over "
    "did down only way just",
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden "
    "aus er hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur oder "
    "aber vor zur bis mehr durch man sein wurde sei",
    "fr": "le de la et les des en un du une que est pour qui dans par pas au sur ne se ce il sont elle avec "
    "son aux ou leur cette mais nous comme été ont sa ses tout fait lui bien aussi très deux entre dont",
    "es": "el la de que y en los del se las por un para con no una su al lo como más pero sus le ya o este sí "
    "porque esta entre cuando muy sin sobre también me hasta hay donde quien desde todo nos durante todos "
    "uno les ni contra otros ese eso",
    "it": "il di che e la per un in è a non una sono del della le da si con i dei gli come al ma anche più lo ha "
    "nel questo alla se delle ci nella mi cosa suo sua essere stato molto quando tutto fatto",
    "pt": "o de a que e do da em um para com não uma os no se na por mais as dos como mas ao ele das à seu sua "
    "ou quando muito nos já eu também só pelo pela até isso ela entre depois sem mesmo aos ter seus quem "
    "nas esse",
    "nl": "de het een van en in is dat op te zijn voor met die niet aan er maar om ook als dan bij of uit nog "
    "wat door naar deze kan wel worden zo heeft hij werd al was zij wordt tot hun meer onder",
    "sv": "och i att det som en på är av för med till den har de inte om ett han men var jag sig från vi så kan "
    "man när år säger hon under också efter eller nu sin där vid mot ska skulle kommer ut får finns",
    "pl": "i w na z do że się nie to jest o jak ale po co tak od za przez jego są tylko który może już dla ich "
    "jej przy tym ten oraz czy być był była było także przed gdy",
    "tr": "ve bir bu da de için ile çok olarak daha gibi en ne o ama kadar sonra olan var ki her şey mi değil "
    "ya veya bu olduğu göre ise aynı üzere",
    "ru": "и в не на что я с он как а то все она так его но да ты к у же вы за бы по только ее мне было вот от "
    "меня еще нет о из ему теперь когда даже ну ли если уже или быть был него до вас нибудь опять уж вам "
    "ведь там потом себя ничего ей может они тут где есть надо ней для мы тебя их чем была сам чтоб без",
    "uk": "і в не на що я з він як а то все вона так його але та ти до у же ви за би по тільки її мені було ось "
    "від мене ще немає про із йому тепер коли навіть чи якщо вже або бути був нього вас там потім себе "
    "нічого їй може вони тут де є треба ній для ми тебе їх ніж була сам без це",
}
STOP_WORDS = {lang: frozenset(words.split()) for lang, words in _STOP.items()}
_LATIN = ("en", "de", "fr", "es", "it", "pt", "nl", "sv", "pl", "tr")
_CYRILLIC = ("ru", "uk")
LANGUAGES = (*_LATIN, *_CYRILLIC, "el", "ar", "he", "hi", "th", "ko", "ja", "zh")

_SCRIPTS = [
    ("latin", re.compile(r"[A-Za-z\u00c0-\u024f]")),
    ("cyrillic", re.compile(r"[\u0400-\u04ff]")),
    ("el", re.compile(r"[\u0370-\u03ff\u1f00-\u1fff]")),
    ("ar", re.compile(r"[\u0600-\u06ff\u0750-\u077f]")),
    ("he", re.compile(r"[\u0590-\u05ff]")),
    ("hi", re.compile(r"[\u0900-\u097f]")),
    ("th", re.compile(r"[\u0e00-\u0e7f]")),
    ("ko", re.compile(r"[\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")),
    ("kana", re.compile(r"[\u3040-\u30ff]")),
    ("han", re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")),
]
_WORD = re.compile(r"[^\W\d_]+")
_SAMPLE = 4000  # characters looked at: the start of a long text says enough


def guess(text: str, min_words: int = 5, min_score: float = 0.0) -> tuple[str, float]:
    """(language code or "unknown", score in [0, 1]); below ``min_score`` the language is unknown."""
    lang, score = _guess(text, min_words)
    return (lang if score >= min_score and score > 0 else "unknown"), score


def _guess(text: str, min_words: int) -> tuple[str, float]:
    sample = text[:_SAMPLE]
    counts = {name: len(pattern.findall(sample)) for name, pattern in _SCRIPTS}
    letters = sum(counts.values())
    if not letters:
        return "unknown", 0.0
    script = max(counts, key=counts.__getitem__)
    share = counts[script] / letters
    if script in ("kana", "han"):
        # Japanese mixes kana and kanji; Chinese has no kana at all.
        cjk = counts["kana"] + counts["han"]
        return ("ja" if counts["kana"] else "zh"), cjk / letters
    if script not in ("latin", "cyrillic"):
        return script, share
    words = _WORD.findall(sample.lower())
    if len(words) < min_words:
        return "unknown", 0.0
    candidates = _LATIN if script == "latin" else _CYRILLIC
    hits = {lang: sum(1 for w in words if w in STOP_WORDS[lang]) for lang in candidates}
    best = max(candidates, key=lambda lang: hits[lang])
    return best, hits[best] / len(words)


class LanguageOptions(StepOptions):
    languages: list[str] = Field(
        default_factory=list,
        description=f"Keep rows in these languages "
        f"({', '.join(LANGUAGES)}); empty: keep every "
        f"row and only count the languages.",
    )
    min_score: float = Field(0.1, ge=0, le=1, description="Below this score the language is unknown.")
    keep_unknown: bool = Field(
        True, description="Keep rows whose language is unknown (short texts, lists, code): when in doubt, keep."
    )
    min_words: int = Field(5, ge=1, description="Texts with fewer words are unknown.")


class LanguageFilter(CurationStep[LanguageOptions]):
    """Guesses each row's language from its script and its common words, and keeps the rows in the
    chosen languages. Always counts the languages it saw (in the report)."""

    name = "language"
    summary = "Guess each row's language (script and stop words) and keep the chosen languages."
    action = "filter"
    Options = LanguageOptions

    def __init__(self, options: LanguageOptions, env):
        super().__init__(options, env)
        unknown = [lang for lang in options.languages if lang not in LANGUAGES]
        if unknown:
            from llmforge.errors import UsageError

            raise UsageError(f"language: cannot recognise {', '.join(unknown)}; it knows {', '.join(LANGUAGES)}")
        self.keep = set(options.languages)
        self.seen: Counter = Counter()

    @classmethod
    def check(cls, options, env) -> list[str]:
        unknown = [lang for lang in options.languages if lang not in LANGUAGES]
        return (
            [f"languages: cannot recognise {', '.join(unknown)} (it knows {', '.join(LANGUAGES)})"] if unknown else []
        )

    def process(self, row: dict):
        options = self.options
        lang, score = guess(row_text(row), options.min_words, options.min_score)
        self.seen[lang] += 1
        if not self.keep:
            return row
        if lang == "unknown":
            return (
                row
                if options.keep_unknown
                else Drop(f"language unknown (score {score:.2f} < {options.min_score})", code="unknown")
            )
        if lang not in self.keep:
            return Drop(f"language {lang} (score {score:.2f}), not one of {', '.join(sorted(self.keep))}", code=lang)
        return row

    def finish(self) -> dict:
        return {"languages": dict(self.seen.most_common())}
