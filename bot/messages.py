"""Channel-neutral messages: what a person sent (Incoming) and what the hotline answers (Reply).

The conversation logic speaks only these types; the Telegram and console channels translate them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Button:
    label: str
    data: str  # callback data, at most 64 bytes (Telegram's limit)

    def __post_init__(self) -> None:
        if len(self.data.encode()) > 64:
            raise ValueError(f"callback data too long: {self.data!r}")


URGENT = "urgent"  # the outbox kind of an urgent Reply


@dataclass
class Reply:
    text: str
    buttons: list[list[Button]] = field(default_factory=list)
    ask_contact: bool = False  # show the "share my phone number" keyboard
    ask_location: bool = False  # show the "share my location" keyboard
    remove_keyboard: bool = False
    chat_id: str | None = None  # None = the chat the message came from
    edit_message_id: int | None = None  # edit this earlier message instead of sending a new one
    urgent: bool = False  # an emergency notice: retried within a second when a send fails (bot/outbox.py)

    def to_markup(self) -> dict[str, Any] | None:
        """A JSON-able description kept in the outbox."""
        if not (self.buttons or self.ask_contact or self.ask_location or self.remove_keyboard):
            return None
        return {
            "buttons": [[{"label": b.label, "data": b.data} for b in row] for row in self.buttons],
            "ask_contact": self.ask_contact,
            "ask_location": self.ask_location,
            "remove_keyboard": self.remove_keyboard,
        }

    @classmethod
    def from_markup(cls, text: str, markup: dict[str, Any] | None, **kw: Any) -> Reply:
        markup = markup or {}
        rows = [[Button(b["label"], b["data"]) for b in row] for row in markup.get("buttons", [])]
        return cls(
            text=text,
            buttons=rows,
            ask_contact=bool(markup.get("ask_contact")),
            ask_location=bool(markup.get("ask_location")),
            remove_keyboard=bool(markup.get("remove_keyboard")),
            **kw,
        )


@dataclass
class Incoming:
    """One thing a person did in a chat."""

    channel: str  # telegram | console
    chat_id: str
    user_id: str
    chat_type: str = "private"  # private | group | supergroup
    display_name: str = ""
    text: str | None = None
    command: str | None = None  # "start", "status", ... without the slash
    args: str = ""
    callback: str | None = None  # button data
    callback_message_id: int | None = None
    contact_name: str | None = None
    contact_phone: str | None = None
    contact_user_id: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    photo: str | None = None  # file id of the largest size
    caption: str | None = None
    other: str | None = None  # sticker | voice | video | document | animation | audio | unknown

    @property
    def is_private(self) -> bool:
        return self.chat_type == "private"
