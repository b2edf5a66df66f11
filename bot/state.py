"""Conversation state kept in the database (table ``conversations``), so a restart loses nothing."""

from __future__ import annotations

import copy
import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from models.clock import now
from models.tables import Conversation


@dataclass
class ChatState:
    state: str = "idle"
    data: dict[str, Any] = field(default_factory=dict)
    # issue 8: the row it was loaded from, so that saving does not read it again (the session's identity
    # map holds rows weakly: without this reference the row is gone by the time the step saves)
    row: Conversation | None = field(default=None, repr=False, compare=False)
    # the step read the chat's row and found none: saving adds it without reading again
    absent: bool = field(default=False, repr=False, compare=False)

    def reset(self) -> None:
        self.state, self.data = "idle", {}

    def start(self, state: str, **data: Any) -> str:
        """Enter a new step with a fresh token; buttons carry the token so stale ones are recognised."""
        token = secrets.token_hex(3)
        self.state = state
        self.data = {**data, "token": token}
        return token

    def renew_token(self) -> str:
        """A fresh token for the same step (its content changed): buttons shown before are now stale, and
        ``superseded`` tells them from buttons of an older step."""
        old = self.token
        if old:
            self.data["superseded"] = [*self.data.get("superseded", [])[-4:], old]
        self.data["token"] = secrets.token_hex(3)
        return self.data["token"]

    def superseded(self, token: str) -> bool:
        return token in self.data.get("superseded", [])

    @property
    def token(self) -> str:
        return self.data.get("token", "")


def load_state(session: Session, channel: str, chat_id: str) -> ChatState:
    return state_of(session.get(Conversation, (channel, str(chat_id))))


def state_of(row: Conversation | None) -> ChatState:
    """The state held by a conversation row (None: a chat with no state yet)."""
    if row is None:
        return ChatState(absent=True)
    # a deep copy: the step changes lists inside; the row's loaded value must stay what the database holds
    return ChatState(row.state, copy.deepcopy(row.data or {}), row=row)


def save_state(session: Session, channel: str, chat_id: str, st: ChatState) -> None:
    row = st.row
    stale = row is not None and (row not in session or (row.channel, row.chat_id) != (channel, str(chat_id)))
    # ``absent``: read in this step and not there, and the chat's lock keeps it so: no second read
    if stale or (row is None and not st.absent):
        row = session.get(Conversation, (channel, str(chat_id)))
    if row is None:
        row = Conversation(channel=channel, chat_id=str(chat_id))
        session.add(row)
        st.row, st.absent = row, False
    row.state = st.state
    row.data = dict(st.data)
    row.updated_at = now()
    # no flush here (issue 8): the step's next statement or its commit writes the row, in the same flush as
    # the step's replies (a flush per save cost 3% of the bot's CPU under load)
