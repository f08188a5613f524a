"""The `offline` provider: deterministic, no network, good enough to demo.

Built on small libraries that carry their data in the wheel: VADER for sentiment, YAKE
for keywords, py3langid for the language, better-profanity for toxicity. Entities come
from patterns (emails, money, dates) and capitalisation cues (titles before names,
company suffixes, "in/at/from" before places). It writes JSON text exactly like a model
would, so its answers go through the same validation as the real provider's.
"""

from __future__ import annotations

import asyncio
import json
import re
from functools import cached_property
from typing import Any

from gql_service.models import MAX_SUMMARY_WORDS, TokenUsage
from gql_service.worker.llm.base import Completion, OnText, Repair

MODEL = "offline"

_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_MONEY = re.compile(
    r"(?:[$€£¥]\s?\d[\d,]*(?:\.\d+)?(?:\s?(?:k|m|bn|million|billion))?)"
    r"|(?:\b\d[\d,]*(?:\.\d+)?\s?(?:USD|EUR|GBP|JPY|dollars|euros|pounds)\b)",
    re.IGNORECASE,
)
_MONTHS = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|Jun(?:e)?|Jul(?:y)?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DATE = re.compile(
    rf"\b(?:\d{{4}}-\d{{2}}-\d{{2}}"
    rf"|\d{{1,2}}/\d{{1,2}}/\d{{2,4}}"
    rf"|\d{{1,2}}(?:st|nd|rd|th)?\s+{_MONTHS}(?:\s+\d{{4}})?"
    rf"|{_MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?(?:,?\s+\d{{4}})?"
    rf"|(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday|yesterday|today|tomorrow))\b",
    re.IGNORECASE,
)
_NAME = r"[A-Z][a-zA-Z'\-]+(?:\s+[A-Z][a-zA-Z'\-]+){0,2}"
_PERSON = re.compile(rf"\b(?:Dr|Mr|Mrs|Ms|Prof|Sir|Dame)\.?\s+({_NAME})")
_ORG = re.compile(
    r"\b((?:[A-Z][\w&'\-]*\s+){0,3}(?:Inc|Ltd|LLC|GmbH|Corp|Corporation|Company|Co|Group|Bank|"
    r"University|College|Hospital|Clinic|Institute|Foundation|Agency|Ministry|Airlines|Labs)\b\.?)"
)
_PLACE = re.compile(rf"\b(?:in|at|from|to|near|visited)\s+((?:the\s+)?{_NAME})")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_PIECE = re.compile(r"\s*\S+")  # about a word: what a model's token stream looks like


def _summary(text: str) -> str:
    words: list[str] = []
    for sentence in _SENTENCE.split(" ".join(text.split())):
        more = sentence.split()
        if words and len(words) + len(more) > MAX_SUMMARY_WORDS:
            break
        words += more
    if len(words) > MAX_SUMMARY_WORDS:
        words = words[: MAX_SUMMARY_WORDS - 1] + [words[MAX_SUMMARY_WORDS - 1].rstrip(".,;:") + "…"]
    return " ".join(words) or "(empty)"


def _entities(text: str) -> list[dict[str, Any]]:
    found: dict[tuple[str, str], float] = {}

    def add(kind: str, value: str, confidence: float) -> None:
        value = value.strip(" .,;:")
        if value and (kind, value) not in found:
            found[(kind, value)] = confidence

    for m in _EMAIL.finditer(text):
        add("EMAIL", m.group(0), 0.99)
    for m in _MONEY.finditer(text):
        add("MONEY", m.group(0), 0.95)
    for m in _DATE.finditer(text):
        add("DATE", m.group(0), 0.9)
    for m in _PERSON.finditer(text):
        add("PERSON", m.group(0), 0.85)
    for m in _ORG.finditer(text):
        add("ORG", m.group(1), 0.75)
    taken = {v for (_, v) in found}
    for m in _PLACE.finditer(text):
        place = m.group(1)
        if place not in taken and not any(place in v or v in place for v in taken) and not _DATE.fullmatch(place):
            add("LOCATION", place, 0.6)
    return [{"type": k, "value": v, "confidence": c} for (k, v), c in list(found.items())[:50]]


class OfflineProvider:
    """Deterministic heuristics; the same text always gives the same answer."""

    provider_name = "offline"  # gen_ai.provider.name, in the chat span

    def __init__(self, *, stream_delay_s: float = 0.0) -> None:
        # The answer's pieces reach `on_text` this far apart, as a model's tokens would.
        self.stream_delay_s = stream_delay_s

    @property
    def model(self) -> str:
        return MODEL

    @property
    def endpoint(self) -> str:
        return MODEL

    @cached_property
    def _tools(self) -> dict[str, Any]:
        # Imported lazily, then kept: the worker warms this before forking work horses.
        import py3langid
        import yake
        from better_profanity import profanity
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        profanity.load_censor_words()
        return {"langid": py3langid, "yake": yake, "profanity": profanity, "vader": SentimentIntensityAnalyzer()}

    def warm_up(self) -> None:
        self.analyse("Warm-up text from Dr. Warm at Example Inc on 1 May 2024.")

    def analyse(self, text: str) -> dict[str, Any]:
        t = self._tools
        language = str(t["langid"].classify(text)[0])[:2]
        scores = t["vader"].polarity_scores(text)
        compound = scores["compound"]
        sentiment = "positive" if compound >= 0.05 else "negative" if compound <= -0.05 else "neutral"
        lan = language if language in {"en", "es", "fr", "de", "it", "pt", "nl"} else "en"
        keywords = t["yake"].KeywordExtractor(lan=lan, n=2, top=8, dedupLim=0.7).extract_keywords(text)
        tags: list[str] = []
        for keyword, _score in keywords:
            tag = keyword.lower()[:40]
            if tag not in tags and not any(tag in other or other in tag for other in tags):
                tags.append(tag)
            if len(tags) == 5:
                break
        censored = t["profanity"].censor(text)
        profane = censored.count("****")
        toxicity = min(1.0, 0.6 + 0.1 * (profane - 1)) if profane else round(scores["neg"] * 0.3, 3)
        return {
            "summary": _summary(text),
            "sentiment": sentiment,
            "tags": tags or ["general"],
            "entities": _entities(text),
            "language": language,
            "toxicity_score": toxicity,
        }

    async def aclose(self) -> None:
        pass  # nothing per event loop

    async def extract(self, text: str, *, repair: Repair | None = None, on_text: OnText | None = None) -> Completion:
        # CPU work (a few ms to tens of ms for long texts): off the event loop, so the other
        # jobs of an async worker keep moving while it runs.
        content = json.dumps(await asyncio.to_thread(self.analyse, text), ensure_ascii=False)
        if on_text is not None:
            await self._reveal(content, on_text)
        # Rough token counts (about 0.75 words a token) so usage figures are never empty.
        prompt_tokens = max(1, len(text.split()) * 4 // 3)
        completion_tokens = max(1, len(content.split()) * 4 // 3)
        usage = TokenUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return Completion(content=content, usage=usage, model=MODEL, finish_reasons=("stop",))

    async def _reveal(self, content: str, on_text: OnText) -> None:
        if not self.stream_delay_s:
            on_text(content)
            return
        for piece in _PIECE.findall(content):
            on_text(piece)
            await asyncio.sleep(self.stream_delay_s)
