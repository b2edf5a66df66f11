"""Subcommands that sit on triage, the knowledge base, the bot and the scheduler."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def _services():
    from bot.services import build_services
    from models.bootstrap import open_database

    _, factory = open_database()
    return build_services(factory)


def cmd_run(args: argparse.Namespace) -> int:
    """The product's main job: the Telegram bot when a token is set, else the console channel."""
    from models.settings import get_settings

    settings = get_settings()
    token = args.token or settings.telegram_token
    services = _services()
    if not token:
        print("未设置 HOTLINE_TELEGRAM_TOKEN：启动控制台渠道（与 Telegram 相同的对话）。")
        if not sys.stdin.isatty():
            from bot.demo_chat import run_chat_demo

            run_chat_demo(services, print)
            return 0
        from bot.console import interactive

        services.triage("预热")  # load the model before the first question
        interactive(services)
        return 0
    from bot.telegram_app import build_application

    app, _ = build_application(services, token, base_url=settings.telegram_base_url or None)
    if args.with_scheduler:
        from scheduler.runner import attach_to_application

        attach_to_application(app, services.sessions)
    if args.webhook:
        from urllib.parse import urlparse

        url = urlparse(args.webhook)
        secret = args.secret or settings.webhook_secret
        if not secret:
            print("webhook 模式须设置 --secret 或 HOTLINE_WEBHOOK_SECRET", file=sys.stderr)
            return 2
        app.run_webhook(listen=args.listen, port=args.port, url_path=url.path.lstrip("/"),
                        webhook_url=args.webhook, secret_token=secret)
    else:
        app.run_polling()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from bot.console import interactive

    services = _services()
    services.triage("预热")
    interactive(services)
    return 0


def add_more_commands(sub, command) -> None:
    """Register the remaining subcommands on the `hotline` parser."""
    p = sub.add_parser("run", help="run the bot (Telegram with a token, else the console channel)")
    p.add_argument("--token", default="")
    p.add_argument("--webhook", default="", help="public URL of the webhook, e.g. https://host/tg")
    p.add_argument("--secret", default="", help="webhook secret token")
    p.add_argument("--listen", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443)
    p.add_argument("--no-scheduler", dest="with_scheduler", action="store_false",
                   help="do not run the scheduler in this process (run `hotline scheduler` instead)")
    command("run")(cmd_run)

    sub.add_parser("chat", help="the citizen's conversation in this terminal")
    command("chat")(cmd_chat)
    _ = json
