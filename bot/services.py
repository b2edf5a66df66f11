"""What the conversations need from the rest of the product, gathered in one object.

Built once by ``build_services()`` for the real product (database, triage model, knowledge base); tests
build it the same way on their own database.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from models.settings import get_settings

log = logging.getLogger(__name__)

TriageFn = Callable[[str], dict[str, Any]]


@dataclass
class Services:
    sessions: sessionmaker[Session]
    triage: TriageFn
    policy_name: str = field(default_factory=lambda: get_settings().policy)


class ProductBrain:
    """Triage + knowledge base for the live product: loaded lazily, refreshed when KB entries change.

    issue 8: ``triage_many`` triages several messages in one model call (the Telegram channel batches the
    messages that arrive together); whether units changed the knowledge base is checked at most every
    ``kb_check_every`` seconds, not before every message (one query and one connection each time)."""

    def __init__(
        self, sessions: sessionmaker[Session], policy_name: str, kb_check_every: float = 2.0
    ) -> None:
        self.sessions = sessions
        self.policy_name = policy_name
        self.kb_check_every = kb_check_every
        self._lock = threading.Lock()
        self._triager = None
        self._kb_index = None
        self._kb_checked = 0.0

    def _kb_lookup(self, text: str):
        hit = self._kb_index.answer(text) if self._kb_index is not None else None
        return (hit.entry_id, float(hit.score)) if hit is not None else None

    def load(self) -> None:
        with self._lock:
            if self._triager is not None:
                return
            from models.policy import load_policy
            from triage.pipeline import Triager

            self.refresh_kb()
            self._triager = Triager.load(policy=load_policy(self.policy_name), kb_lookup=self._kb_lookup)

    def refresh_kb(self) -> None:
        from kb.retrieval import open_index

        with self.sessions() as s:
            self._kb_index = open_index(s)
        self._kb_checked = time.monotonic()

    def _fresh_kb(self) -> None:
        """Pick up entries that units added, edited or retired since the index was built."""
        if self._kb_index is None or time.monotonic() - self._kb_checked < self.kb_check_every:
            return
        self._kb_checked = time.monotonic()  # one look per period, even when it fails
        with self.sessions() as s:
            self._kb_index.ensure_fresh(s)

    def _ready(self) -> None:
        self.load()
        try:
            self._fresh_kb()
        except Exception:  # a database hiccup must not stop triage; the old index still answers
            log.warning("knowledge base refresh failed", exc_info=True)

    def __call__(self, text: str) -> dict[str, Any]:
        return self.triage_many([text])[0]

    def embed(self, text: str):
        """The message's e5 vector as triage computed it (the encoder's cache answers), for similar tickets."""
        return self.embed_many([text])[0]

    def embed_many(self, texts: list[str]) -> list[Any]:
        from triage.embedding import get_encoder
        from triage.pipeline import MAX_CHARS

        return list(get_encoder().encode([t[:MAX_CHARS] for t in texts], prefix="query: "))

    def triage_many(self, texts: list[str]) -> list[dict[str, Any]]:
        """One model call for all of ``texts`` (their knowledge base lookups reuse the embeddings it made)."""
        self._ready()
        return [r.to_dict() for r in self._triager.triage_many(list(texts))]


def build_services(sessions: sessionmaker[Session], policy_name: str | None = None) -> Services:
    policy_name = policy_name or get_settings().policy
    return Services(sessions=sessions, triage=ProductBrain(sessions, policy_name), policy_name=policy_name)
