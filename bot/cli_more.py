"""Subcommands that sit on triage, the knowledge base, the bot and the scheduler."""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger(__name__)


def _services(*, pre_ping: bool = True):
    from bot.services import build_services
    from models.bootstrap import open_database

    _, factory = open_database(pre_ping=pre_ping)
    return build_services(factory)


def cmd_run(args: argparse.Namespace) -> int:
    """The product's main job: the Telegram bot when a token is set, else the console channel."""
    from models.settings import get_settings

    settings = get_settings()
    token = args.token or settings.telegram_token
    services = _services(pre_ping=not token)  # the Telegram channel retries instead (models/db.py)
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


def cmd_bind(args: argparse.Namespace) -> int:
    from bot.binding import cli_bind
    from models.bootstrap import open_database

    _, factory = open_database()
    return cli_bind(args.kind, args.code, args.role, ttl_hours=args.hours, sessions=factory)


def cmd_scheduler(args: argparse.Namespace) -> int:
    from models.bootstrap import open_database
    from scheduler.runner import run_forever

    _, factory = open_database()
    return run_forever(factory)


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from models.bootstrap import open_database
    from models.clock import CHINA_TZ, now
    from models.settings import get_settings
    from scheduler.reports import period_bounds, render_text, weekly_report, write_files

    _, factory = open_database()
    start, end = period_bounds(args.period, now().astimezone(CHINA_TZ).date())
    out_dir = Path(args.out) if args.out else get_settings().data_dir / "reports"
    with factory() as session:
        report = weekly_report(session, start, end, period=args.period)
        paths = write_files(report, out_dir)
    print(render_text(report))
    for p in paths:
        print(f"已写入 {p}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "sweep":
        from scheduler.bench import bench_sweep

        result = bench_sweep(n=args.n or 100_000, url=args.url or None)
    elif args.what == "triage":
        from triage.bench import bench_triage

        result = bench_triage(**({"n": args.n} if args.n else {}))
    elif args.what == "kb":
        from kb.bench import bench_kb

        result = bench_kb(**({"n_entries": args.n} if args.n else {}))
    elif args.what == "steps":
        from bot.bench_steps import bench_steps

        result = bench_steps(**({"citizens": args.n} if args.n else {}), url=args.url or None)
    elif args.what == "embedding":
        from triage.embedding_bench import bench_embedding

        result = bench_embedding(**({"n": args.n} if args.n else {}))
    else:
        try:
            from bot.bench_e2e import bench_e2e
        except ImportError:
            print("端到端压测（bench e2e）尚未安装在此版本中。", file=sys.stderr)
            return 2
        result = bench_e2e(
            **({"citizens": args.n} if args.n else {}),
            url=args.url or None,
            bots=args.bots,
            faults=not args.no_faults,
            triage_server=args.triage_server,
            **({"arrival_rate": args.rate} if args.rate else {}),
            mix=args.mix,
            **({"messages_per_citizen": args.per_citizen} if args.per_citizen else {}),
        )
    print(json.dumps(result, ensure_ascii=False, indent=2, default=str))
    return 0


def cmd_triage_serve(args: argparse.Namespace) -> int:
    from bot.triage_server import run

    return run(args.listen)


def cmd_triage(args: argparse.Namespace) -> int:
    from models.policy import load_policy
    from models.settings import get_settings
    from triage.commands import triage_stream
    from triage.pipeline import Triager

    lookup = None
    if not args.no_kb:
        from bot.services import ProductBrain
        from models.bootstrap import open_database

        _, factory = open_database()
        brain = ProductBrain(factory, get_settings().policy)
        brain.refresh_kb()
        lookup = brain._kb_lookup
    triager = Triager.load(policy=load_policy(args.policy or get_settings().policy), kb_lookup=lookup)
    triage_stream(triager, sys.stdin, sys.stdout)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from triage.training import DEFAULT_DATA_DIR, train

    data = args.data or DEFAULT_DATA_DIR
    print(json.dumps(train(args.out or None, data, seed=args.seed), ensure_ascii=False, indent=2, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.cv:
        from triage.evaluation import cross_validate
        from triage.training import DEFAULT_DATA_DIR

        folds = [int(k) for k in args.only_folds.split(",")] if args.only_folds else None
        report = cross_validate(
            args.data or DEFAULT_DATA_DIR, folds=args.cv, seed=args.seed, only_folds=folds,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        )
    else:
        if not args.file:
            print("请给出评测文件（JSON lines），或用 --cv 5 做交叉验证。", file=sys.stderr)
            return 2
        from triage.evaluation import evaluate_file

        report = evaluate_file(args.file)
    print(json.dumps(report, ensure_ascii=False, indent=2, default=str))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from triage.embedding import model_dir
    from triage.embedding_build import build_model

    dest = build_model(model_dir(), overwrite=args.force)
    print(f"嵌入模型已就绪：{dest}")
    return 0


def cmd_kb(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kb import io as kb_io
    from kb import store
    from models.bootstrap import open_database

    _, factory = open_database()
    if args.action in ("import", "export") and not args.arg:
        print("请指定文件路径（.yaml 或 .csv）", file=sys.stderr)
        return 2
    if args.action == "import":
        path = Path(args.arg)
        with factory.begin() as s:
            fn = kb_io.import_csv if path.suffix == ".csv" else kb_io.import_yaml
            result = fn(s, path)
        print(result.summary())
        return 0 if result.ok else 1
    if args.action == "export":
        path = Path(args.arg)
        with factory() as s:
            fn = kb_io.export_csv if path.suffix == ".csv" else kb_io.export_yaml
            n = fn(s, path, unit=args.unit or None)
        print(f"已导出 {n} 条到 {path}")
        return 0
    if args.action == "list":
        with factory() as s:
            for e in store.list_entries(s, unit=args.unit or None):
                print(f"{e.id}  {e.unit:10s} {e.status:9s} v{e.version}  {(e.questions or [''])[0]}")
        return 0
    if args.action == "stale":
        with factory() as s:
            print(store.format_stale_report(store.stale_report(s, review_days=args.days), unit=args.unit or None))
        return 0
    from kb.retrieval import open_index

    with factory() as s:
        index = open_index(s)
    hits = index.search(args.arg or "", k=3)
    answer = index.answer(args.arg or "")
    if args.json:
        print(json.dumps({"answer": answer.entry_id if answer else None,
                          "hits": [{"id": h.entry_id, "score": round(h.score, 4), "unit": h.unit,
                                    "updated_at": str(h.updated_at), "question": h.question} for h in hits]},
                         ensure_ascii=False, indent=2))
        return 0
    for h in hits:
        print(f"{h.entry_id}  {h.score:.3f}  {h.unit:10s} {h.question}")
    print("→ 直接答复：" + (answer.answer if answer else "无把握，转人工/工单"))
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

    p = sub.add_parser("bind", help="print a one-time code that binds a group chat to a unit or the center")
    p.add_argument("kind", choices=["unit", "center"])
    p.add_argument("code", nargs="?", help="unit code, e.g. chengguan")
    p.add_argument("--role", default="", help="handler|leader (unit), operator|supervisor (center)")
    p.add_argument("--hours", type=int, default=24, help="how long the code is valid")
    command("bind")(cmd_bind)

    p = sub.add_parser("triage", help="one message per line (or JSON lines) in, contract JSON out")
    p.add_argument("--policy", default="")
    p.add_argument("--no-kb", action="store_true", help="skip the knowledge-base lookup")
    command("triage")(cmd_triage)

    p = sub.add_parser("train", help="rebuild the triage model (deterministic)")
    p.add_argument("--data", default="", help="folder of labelled real messages (default ../shared/data)")
    p.add_argument("--out", default="", help="artifact folder (default triage/artifacts)")
    p.add_argument("--seed", type=int, default=0)
    command("train")(cmd_train)

    p = sub.add_parser("eval", help="evaluate the triage model on a JSON-lines file, or k-fold CV (--cv 5)")
    p.add_argument("file", nargs="?", default="")
    p.add_argument("--cv", type=int, default=0, help="k-fold cross-validation on the labelled real data")
    p.add_argument("--data", default="", help="folder of labelled real messages (default ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only-folds", default="", help="comma-separated fold numbers (quick checks)")
    command("eval")(cmd_eval)

    p = sub.add_parser("model", help="build the offline embedding model")
    p.add_argument("action", choices=["build"])
    p.add_argument("--force", action="store_true")
    command("model")(cmd_model)

    p = sub.add_parser("kb", help="knowledge base: import, export, search, list, stale")
    p.add_argument("action", choices=["import", "export", "search", "list", "stale"])
    p.add_argument("arg", nargs="?", default="", help="file (import/export) or question (search)")
    p.add_argument("--unit", default="")
    p.add_argument("--json", action="store_true")
    p.add_argument("--days", type=int, default=180, help="stale: not reviewed for this many days")
    command("kb")(cmd_kb)

    p = sub.add_parser("triage-serve", help="one triage model for several bot processes (HOTLINE_TRIAGE_SERVER)")
    p.add_argument("--listen", default="", help="socket path or host:port (default HOTLINE_TRIAGE_SERVER)")
    command("triage-serve")(cmd_triage_serve)

    sub.add_parser("scheduler", help="run the scheduler alone (deadline sweep, digests, reports)")
    command("scheduler")(cmd_scheduler)

    p = sub.add_parser("report", help="write the weekly or monthly report as PNG and CSV")
    p.add_argument("--period", choices=["week", "month"], default="week")
    p.add_argument("--out", default="", help="folder for the files (default: data folder/reports)")
    command("report")(cmd_report)

    p = sub.add_parser("bench", help="speed and memory benchmarks")
    p.add_argument("what", choices=["triage", "kb", "sweep", "embedding", "steps", "e2e"])
    p.add_argument("--n", type=int, default=0, help="size (messages, entries, tickets, citizens)")
    p.add_argument("--url", default="", help="database URL for sweep/e2e (default: a temporary SQLite)")
    p.add_argument("--bots", type=int, default=1, help="e2e: bot processes behind webhooks (1: one polling bot)")
    p.add_argument("--no-faults", action="store_true", help="e2e: the clean load only")
    p.add_argument("--rate", type=float, default=0, help="e2e: citizens starting per second (default 12.5)")
    p.add_argument("--per-citizen", type=int, default=0, help="e2e: requests each citizen writes (default 2)")
    p.add_argument("--mix", choices=["conversations", "flood"], default="conversations",
                   help="e2e: citizens answer and confirm (conversations), or only write (flood)")
    p.add_argument("--triage-server", action=argparse.BooleanOptionalAction, default=None,
                   help="e2e: one shared triage server for the bots (default: with 2 or more bots)")
    command("bench")(cmd_bench)
