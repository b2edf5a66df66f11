"""Configuration: HOTLINE_* environment variables and an optional .env file (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "hotline"


class Settings(BaseSettings):
    """Everything an administrator can set. Defaults give the embedded product (SQLite, quxian policy)."""

    model_config = SettingsConfigDict(env_prefix="HOTLINE_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir, description="models, caches, SQLite file")
    database_url: str = Field(default="", description="SQLAlchemy URL; empty = SQLite in data_dir")
    policy: str = Field(default="quxian", description="policy preset name (models/presets/NAME.yaml)")
    timezone: str = "Asia/Shanghai"
    jurisdiction: str = Field(default="", description="county or city name; empty = the preset's own")
    telegram_token: str = ""
    webhook_secret: str = ""
    telegram_base_url: str = ""
    embedding_model: str = Field(
        default="", description="sentence-transformers name or path; empty = bundled e5"
    )
    triage_process: bool = Field(
        default=True, description="Telegram channel: run the triage model in a child process (issue 8)"
    )
    step_workers: int = Field(
        default=6, ge=1, le=8, description="Telegram channel: conversation steps run at once (issue 8)"
    )
    queue_notice_after_s: float = Field(
        default=2.0,
        ge=0,
        description="Telegram channel: a citizen's message expected to wait this many seconds or more for the "
        "triage model and a step worker is told at once that it was received (0: never)",
    )
    triage_server: str = Field(
        default="",
        description="address of a shared triage server (`hotline triage-serve`): a socket path or host:port",
    )
    triage_key: str = Field(default="", description="the triage server's password; empty = derived from the token")
    holiday_file: Path | None = Field(default=None, description="extra holiday/workday YAML for future years")
    log_level: str = "INFO"

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'hotline.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings_cache() -> None:
    get_settings.cache_clear()
