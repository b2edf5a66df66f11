"""Subcommands that sit on triage, the knowledge base, the bot and the scheduler."""

from __future__ import annotations


def add_more_commands(sub, command) -> None:
    """Register the remaining subcommands on the `hotline` parser."""
    return None
