"""`hotline`: the administrator's command line. Each subcommand is a thin wrapper over plain functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def wrap(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return wrap


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False, indent=2, default=str))


# --------------------------------------------------------------------------- database and policy


@command("init")
def cmd_init(args: argparse.Namespace) -> int:
    from models.bootstrap import init_database
    from models.db import make_engine
    from models.settings import get_settings

    engine = make_engine()
    stats = init_database(engine, seed_kb=not args.no_kb)
    url = engine.url.render_as_string(hide_password=True)
    print(f"数据库已就绪：{url}")
    print(f"承办单位目录：更新 {stats['units_changed']} 个；知识库导入 {stats['kb_loaded']} 条")
    print(f"当前政策：{get_settings().policy}")
    return 0


@command("policy")
def cmd_policy(args: argparse.Namespace) -> int:
    from models.policy import load_policy, preset_names

    if args.action == "list":
        for name in preset_names():
            p = load_policy(name)
            print(f"{name:8s} {p.jurisdiction}  {p.title}（{p.document}）")
        return 0
    if not args.name:
        print("请指定政策名称，例如：hotline policy show quxian", file=sys.stderr)
        return 2
    try:
        p = load_policy(args.name)
    except KeyError as err:
        print(str(err), file=sys.stderr)
        return 2
    if args.json:
        _print_json(p.summary())
        return 0
    from bot.render_policy import render_policy

    print(render_policy(p))
    return 0


@command("demo")
def cmd_demo(args: argparse.Namespace) -> int:
    if args.workflow:
        from bot.demo import run_demo

        run_demo(print, policy=args.policy)
        return 0
    from bot.demo_chat import run_chat_demo

    run_chat_demo(None, print)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hotline", description="12345 政务服务便民热线")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create or upgrade the database, load the unit catalog and the seed KB")
    p.add_argument("--no-kb", action="store_true")

    p = sub.add_parser("policy", help="list or show policy presets")
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="a scripted conversation across citizen, unit and center chats")
    p.add_argument("--workflow", action="store_true", help="instead: one ticket's lifecycle, step by step")
    p.add_argument("--policy", default=None)

    from bot.cli_more import add_more_commands

    add_more_commands(sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from models.settings import get_settings

    level = (
        logging.DEBUG if args.verbose else getattr(logging, get_settings().log_level.upper(), logging.INFO)
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "sentence_transformers", "apscheduler.executors.default", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print("\n已退出。")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
