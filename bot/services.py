"""What the conversations need from the rest of the product, gathered in one object.

Built once by ``build_services()`` for the real product (database, triage model, knowledge base); tests
build it the same way on their own database.
"""

from __future__ import annotations

import logging
import threading
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
    """Triage + knowledge base for the live product: loaded lazily, refreshed when KB entries change."""

    def __init__(self, sessions: sessionmaker[Session], policy_name: str) -> None:
        self.sessions = sessions
        self.policy_name = policy_name
        self._lock = threading.Lock()
        self._triager = None
        self._kb_index = None

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

    def _fresh_kb(self) -> None:
        """Pick up entries that units added, edited or retired since the index was built."""
        if self._kb_index is not None:
            with self.sessions() as s:
                self._kb_index.ensure_fresh(s)

    def __call__(self, text: str) -> dict[str, Any]:
        self.load()
        try:
            self._fresh_kb()
        except Exception:  # a database hiccup must not stop triage; the old index still answers
            log.warning("knowledge base refresh failed", exc_info=True)
        return self._triager.triage(text).to_dict()


def build_services(sessions: sessionmaker[Session], policy_name: str | None = None) -> Services:
    policy_name = policy_name or get_settings().policy
    return Services(sessions=sessions, triage=ProductBrain(sessions, policy_name), policy_name=policy_name)
