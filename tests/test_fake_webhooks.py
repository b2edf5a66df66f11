"""The fake Telegram's webhook delivery used by ``hotline bench e2e --bots 2``: like Telegram, it posts updates
to the bots' webhooks several at a time and keeps retrying an update while every bot is down, so a bot
restart in the benchmark loses nothing on the Telegram side."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bot.fake_bot_api import FakeBotAPI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Bot:
    """A stand-in webhook endpoint that records what it is given (and the secret it was given with)."""

    def __init__(self, port: int) -> None:
        self.got: list[tuple[int, str | None]] = []
        bot = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                bot.got.append((body["update_id"], self.headers.get("X-Telegram-Bot-Api-Secret-Token")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _set_webhook(api: FakeBotAPI, url: str) -> None:
    data = json.dumps({"url": url, "secret_token": "s3"}).encode()
    req = urllib.request.Request(
        f"{api.base_url}/bot1:T/setWebhook", data=data, headers={"Content-Type": "application/json"}
    )
    urllib.request.urlopen(req, timeout=5).read()


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_update_written_while_every_bot_is_down_reaches_the_bot_once_it_is_back():
    api = FakeBotAPI(balance_webhooks=True, webhook_workers=2).start()
    port = _free_port()
    try:
        _set_webhook(api, f"http://127.0.0.1:{port}/tg")
        uid = api.message(5001, "楼下路灯不亮")  # nobody listens yet: refused, retried
        bot = _Bot(port)
        try:
            _wait(lambda: bot.got)
            time.sleep(0.7)  # one more retry interval: a delivered update is not posted again
            assert bot.got == [(uid, "s3")]
        finally:
            bot.stop()
    finally:
        api.stop()


def test_updates_are_shared_between_two_bots_and_a_dead_one_is_skipped():
    api = FakeBotAPI(balance_webhooks=True, webhook_workers=4).start()
    ports = [_free_port(), _free_port()]
    bots = [_Bot(p) for p in ports]
    try:
        for p in ports:
            _set_webhook(api, f"http://127.0.0.1:{p}/tg")
        first = [api.message(5000 + i, f"第{i}条") for i in range(6)]
        _wait(lambda: sum(len(b.got) for b in bots) == 6)
        assert all(b.got for b in bots)  # both took a share
        bots[0].stop()  # one bot dies: the other takes everything, nothing is lost
        later = [api.message(6000 + i, f"第{i}条") for i in range(4)]
        _wait(lambda: len(bots[1].got) + len(bots[0].got) == 10)
        delivered = sorted(u for b in bots for u, _ in b.got)
        assert delivered == sorted(first + later)
    finally:
        bots[1].stop()
        api.stop()
