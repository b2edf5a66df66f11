"""A fake Telegram Bot API server on 127.0.0.1, for tests, benchmarks and smoke tests of a deployment.

python-telegram-bot talks to it through ``base_url``. It records everything the bot sends, feeds
updates (messages, contacts, locations, photos, stickers, button presses) through getUpdates or to a
webhook, and injects faults: 429 with retry_after, 500, slow answers, and 403 for users who blocked the
bot. Run it alone with ``python -m bot.fake_bot_api --port 8081``.

Run as a separate process (the end-to-end benchmark), it is driven over HTTP under ``/control/``:
``POST /control/updates`` feeds updates (``{"updates": [{"kind": "message", "chat_id": 5, "text": "…"}]}``,
kinds message | press | contact | location | photo, keyword arguments as the methods below), ``POST
/control/fail`` and ``/control/block`` inject faults, ``GET /control/sent?after=N`` reads what the bot sent
(with the server's timestamps) and ``GET /control/stats`` the counters.

Like Telegram, an update is forgotten once getUpdates is called with a higher offset, and getUpdates without
an offset returns the oldest update not yet confirmed, so a restarted bot gets again what it never
confirmed. With ``balance_webhooks`` every URL given to setWebhook is kept and updates are posted to them
in turn, as a load balancer in front of several bot processes would.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SEND_METHODS = ("sendMessage", "sendPhoto", "editMessageText", "editMessageReplyMarkup")
BOT_USER = {"id": 777000, "is_bot": True, "first_name": "12345热线", "username": "hotline12345_bot"}


@dataclass
class Sent:
    method: str
    params: dict[str, Any]
    at: float
    message_id: int | None = None

    @property
    def chat_id(self) -> str:
        return str(self.params.get("chat_id", ""))

    @property
    def text(self) -> str:
        return str(self.params.get("text") or self.params.get("caption") or "")

    @property
    def markup(self) -> dict[str, Any]:
        m = self.params.get("reply_markup")
        if isinstance(m, str):
            try:
                return json.loads(m)
            except ValueError:
                return {}
        return m or {}

    def buttons(self) -> list[tuple[str, str]]:
        rows = self.markup.get("inline_keyboard") or []
        return [(b.get("text", ""), b.get("callback_data", "")) for row in rows for b in row]


@dataclass
class Fault:
    status: int
    count: int
    retry_after: int | None = None
    delay: float = 0.0
    methods: tuple[str, ...] = ("sendMessage", "editMessageText", "sendPhoto")


@dataclass
class FakeState:
    updates: list[dict[str, Any]] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    blocked: set[str] = field(default_factory=set)
    update_ids: itertools.count = field(default_factory=lambda: itertools.count(1))
    message_ids: itertools.count = field(default_factory=lambda: itertools.count(1000))
    cond: threading.Condition = field(default_factory=threading.Condition)
    webhook_url: str | None = None
    webhook_secret: str | None = None
    confirmed: int = 0  # getUpdates offset: updates below it are confirmed and forgotten
    pushed_at: dict[int, float] = field(default_factory=dict)  # update id -> when it was fed (time.time())
    balance_webhooks: bool = False
    webhook_urls: list[str] = field(default_factory=list)  # balance mode: every URL set, used in turn
    webhook_turn: itertools.count = field(default_factory=itertools.count)
    webhook_hits: dict[str, int] = field(default_factory=dict)  # URL -> updates it accepted


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the bot hung up a long poll on shutdown
        super().handle_error(request, client_address)


class FakeBotAPI:
    """Start with ``start()``, feed with ``message()`` / ``press()`` …, read ``sent``."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, *, balance_webhooks: bool = False, webhook_workers: int = 0
    ) -> None:
        self.state = FakeState(balance_webhooks=balance_webhooks)
        self.server = _QuietServer((host, port), _make_handler(self.state, self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        # webhook_workers > 0: post updates from a pool, several at once, and retry while every bot is down, as
        # Telegram does (its max_connections); 0: post each update before the feeding call returns (tests)
        self._posting = None
        if webhook_workers:
            from concurrent.futures import ThreadPoolExecutor

            self._posting = ThreadPoolExecutor(webhook_workers, thread_name_prefix="webhook")

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeBotAPI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ feeding updates

    def _push(self, update: dict[str, Any]) -> int:
        with self.state.cond:
            uid = next(self.state.update_ids)
            update["update_id"] = uid
            self.state.updates.append(update)
            self.state.pushed_at[uid] = time.time()
            self.state.cond.notify_all()
            targets = self._webhook_targets()
        if targets and self._posting is not None:
            self._posting.submit(self._deliver, update, targets)
        else:
            self._post(update, targets)
        return uid

    def _post(self, update: dict[str, Any], targets: list[str]) -> bool:
        for url in targets:  # balance mode: the next bot takes it when one is down
            if _post_webhook(url, self.state.webhook_secret, update):
                with self.state.cond:
                    self.state.webhook_hits[url] = self.state.webhook_hits.get(url, 0) + 1
                return True
        return False

    def _deliver(self, update: dict[str, Any], targets: list[str], retries: int = 240) -> None:
        """Post until a bot accepts, retrying every 0.5 s for up to two minutes while every bot is down."""
        while not self._post(update, targets) and retries > 0:
            retries -= 1
            time.sleep(0.5)
            with self.state.cond:
                targets = self._webhook_targets() or targets

    def _webhook_targets(self) -> list[str]:
        st = self.state
        if st.balance_webhooks and st.webhook_urls:
            k = next(st.webhook_turn) % len(st.webhook_urls)
            return st.webhook_urls[k:] + st.webhook_urls[:k]
        return [st.webhook_url] if st.webhook_url else []

    @staticmethod
    def _chat(chat_id: int | str, chat_type: str) -> dict[str, Any]:
        chat: dict[str, Any] = {"id": int(chat_id), "type": chat_type}
        if chat_type != "private":
            chat["title"] = f"群{chat_id}"
        return chat

    def _message(self, chat_id: int | str, user_id: int | str, chat_type: str, **fields: Any) -> int:
        msg = {
            "message_id": next(self.state.message_ids),
            "date": int(time.time()),
            "chat": self._chat(chat_id, chat_type),
            "from": {"id": int(user_id), "is_bot": False, "first_name": f"用户{user_id}"},
            **fields,
        }
        return self._push({"message": msg})

    def message(self, chat_id: int | str, text: str, *, user_id: int | str | None = None,
                chat_type: str | None = None) -> int:
        user_id = user_id if user_id is not None else chat_id
        chat_type = chat_type or ("private" if int(chat_id) > 0 else "group")
        fields: dict[str, Any] = {"text": text}
        if text.startswith("/"):
            fields["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text.split(" ", 1)[0])}]
        return self._message(chat_id, user_id, chat_type, **fields)

    def contact(self, chat_id: int | str, phone: str, name: str = "王", *, user_id: int | str | None = None) -> int:
        uid = int(user_id if user_id is not None else chat_id)
        return self._message(chat_id, uid, "private",
                             contact={"phone_number": phone, "first_name": name, "user_id": uid})

    def location(self, chat_id: int | str, lat: float, lon: float) -> int:
        return self._message(chat_id, chat_id, "private", location={"latitude": lat, "longitude": lon})

    def photo(self, chat_id: int | str, caption: str | None = None, file_id: str = "PHOTO") -> int:
        sizes = [{"file_id": f"{file_id}-s", "file_unique_id": f"{file_id}s", "width": 90, "height": 90},
                 {"file_id": file_id, "file_unique_id": file_id, "width": 800, "height": 600}]
        fields: dict[str, Any] = {"photo": sizes}
        if caption:
            fields["caption"] = caption
        return self._message(chat_id, chat_id, "private", **fields)

    def sticker(self, chat_id: int | str) -> int:
        return self._message(chat_id, chat_id, "private", sticker={
            "file_id": "STK", "file_unique_id": "STK", "width": 512, "height": 512, "is_animated": False,
            "is_video": False, "type": "regular"})

    def voice(self, chat_id: int | str) -> int:
        return self._message(chat_id, chat_id, "private", voice={
            "file_id": "VOI", "file_unique_id": "VOI", "duration": 3})

    def press(self, chat_id: int | str, data: str, *, user_id: int | str | None = None,
              message_id: int = 1, chat_type: str | None = None) -> int:
        user_id = user_id if user_id is not None else chat_id
        chat_type = chat_type or ("private" if int(chat_id) > 0 else "group")
        query = {
            "id": str(next(self.state.update_ids) * 7919),
            "from": {"id": int(user_id), "is_bot": False, "first_name": f"用户{user_id}"},
            "chat_instance": str(chat_id),
            "data": data,
            "message": {"message_id": message_id, "date": int(time.time()), "chat": self._chat(chat_id, chat_type),
                        "from": BOT_USER, "text": "…"},
        }
        return self._push({"callback_query": query})

    # ------------------------------------------------------------------ faults

    def fail(self, status: int, count: int = 1, *, retry_after: int | None = None, delay: float = 0.0,
             methods: tuple[str, ...] = ("sendMessage", "editMessageText", "sendPhoto")) -> None:
        with self.state.cond:
            self.state.faults.append(Fault(status, count, retry_after, delay, methods))

    def block(self, chat_id: int | str) -> None:
        self.state.blocked.add(str(chat_id))

    # ------------------------------------------------------------------ reading what the bot sent

    @property
    def sent(self) -> list[Sent]:
        with self.state.cond:
            return list(self.state.sent)

    def sent_to(self, chat_id: int | str) -> list[Sent]:
        return [s for s in self.sent if s.chat_id == str(chat_id)]

    def wait_for(self, predicate: Callable[[list[Sent]], Any], timeout: float = 15.0) -> Any:
        """Block until ``predicate(sent)`` is truthy (returns its value) or raise TimeoutError."""
        deadline = time.monotonic() + timeout
        with self.state.cond:
            while True:
                value = predicate(list(self.state.sent))
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"bot did not send the expected message; sent: "
                                       f"{[(s.chat_id, s.text[:40]) for s in self.state.sent[-8:]]}")
                self.state.cond.wait(min(left, 0.5))

    def wait_text(self, chat_id: int | str, fragment: str, *, after: int = 0, timeout: float = 15.0) -> Sent:
        def find(sent: list[Sent]) -> Sent | None:
            for s in sent[after:]:
                if s.chat_id == str(chat_id) and fragment in s.text:
                    return s
            return None

        return self.wait_for(find, timeout)


def _post_webhook(url: str, secret: str | None, update: dict[str, Any]) -> bool:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(update).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if secret:
        req.add_header("X-Telegram-Bot-Api-Secret-Token", secret)
    try:
        urllib.request.urlopen(req, timeout=10).read()
        return True
    except Exception:  # the bot may be down: Telegram would retry; the test decides
        return False


def _sent_json(i: int, s: Sent) -> dict[str, Any]:
    markup = s.markup
    return {"i": i, "method": s.method, "chat_id": s.chat_id, "text": s.text, "at": s.at,
            "message_id": s.message_id, "buttons": s.buttons(), "keyboard": bool(markup.get("keyboard")),
            "parse_mode": s.params.get("parse_mode"), "params": s.params}


_FEED = {"message", "press", "contact", "location", "photo", "sticker", "voice"}


def _control(state: FakeState, api: FakeBotAPI | None, method: str, path: str, p: dict[str, Any]) -> Any:
    """The /control/ endpoints of a fake server running as its own process."""
    what = path.removeprefix("/control/")
    if what == "updates" and api is not None:
        out = []
        for u in p.get("updates", []):
            u = dict(u)
            kind = u.pop("kind", "message")
            if kind not in _FEED:
                raise ValueError(f"unknown update kind {kind!r}")
            uid = getattr(api, kind)(**u)
            out.append({"update_id": uid, "at": state.pushed_at[uid]})
        return {"updates": out}
    if what == "fail":
        with state.cond:
            state.faults.append(Fault(int(p["status"]), int(p.get("count", 1)), p.get("retry_after"),
                                      float(p.get("delay", 0.0)),
                                      tuple(p.get("methods") or ("sendMessage", "editMessageText", "sendPhoto"))))
        return True
    if what == "clear_faults":
        with state.cond:
            state.faults.clear()
        return True
    if what == "block":
        state.blocked.add(str(p["chat_id"]))
        return True
    if what == "sent":
        after = int(p.get("after") or 0)
        with state.cond:
            sent = state.sent[after:]
        return {"next": after + len(sent), "sent": [_sent_json(after + k, s) for k, s in enumerate(sent)]}
    if what == "stats":
        from collections import Counter

        with state.cond:
            return {"updates_fed": len(state.pushed_at), "unconfirmed": len(state.updates),
                    "confirmed_offset": state.confirmed, "sent": len(state.sent),
                    "calls": dict(Counter(state.calls)), "faults_left": sum(f.count for f in state.faults),
                    "webhooks": list(state.webhook_urls) or ([state.webhook_url] if state.webhook_url else []),
                    "webhook_hits": dict(state.webhook_hits)}
    raise KeyError(what)


def _make_handler(state: FakeState, api: FakeBotAPI | None = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # headers and body go out in two writes; without TCP_NODELAY the body waits for the client's
        # delayed ACK (~40 ms on every request), which real Telegram does not add
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            return

        def _params(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            ctype = self.headers.get("Content-Type", "")
            if query := urllib.parse.urlparse(self.path).query:
                body = body or query.encode()
            if "json" in ctype:
                return json.loads(body or b"{}")
            if "multipart" in ctype:
                return _parse_multipart(body, ctype)
            params = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items()}
            for k, v in list(params.items()):
                if v[:1] in ("{", "["):
                    try:
                        params[k] = json.loads(v)
                    except ValueError:
                        pass
            return params

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.do_POST()

        def do_POST(self) -> None:
            path = urllib.parse.urlparse(self.path).path
            method = path.rsplit("/", 1)[-1]
            params = self._params()
            if path.startswith("/control/"):
                try:
                    return self._reply(200, {"ok": True, "result": _control(state, api, method, path, params)})
                except (KeyError, ValueError, TypeError) as err:
                    return self._reply(400, {"ok": False, "description": f"bad control call: {err!r}"})
            with state.cond:
                state.calls.append(method)
                fault = next((f for f in state.faults if f.count > 0 and method in f.methods), None)
                if fault:
                    fault.count -= 1
            if fault:
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.status == 429:
                    return self._reply(429, {"ok": False, "error_code": 429,
                                             "description": "Too Many Requests: retry later",
                                             "parameters": {"retry_after": fault.retry_after or 1}})
                if fault.status >= 400:
                    return self._reply(fault.status, {"ok": False, "error_code": fault.status,
                                                      "description": "Internal Server Error"})
            if method in SEND_METHODS and str(params.get("chat_id", "")) in state.blocked:
                return self._reply(403, {"ok": False, "error_code": 403,
                                         "description": "Forbidden: bot was blocked by the user"})
            self._reply(200, {"ok": True, "result": self._dispatch(method, params)})

        def _dispatch(self, method: str, p: dict[str, Any]) -> Any:
            if method == "getMe":
                return BOT_USER
            if method == "getUpdates":
                offset = max(int(p.get("offset") or 0), 0)
                timeout = min(float(p.get("timeout") or 0), 2.0)
                deadline = time.monotonic() + timeout
                with state.cond:
                    if offset > state.confirmed:  # confirms (and forgets) every update below the offset
                        state.confirmed = offset
                        state.updates = [u for u in state.updates if u["update_id"] >= offset]
                    while True:
                        ready = [u for u in state.updates if u["update_id"] >= state.confirmed]
                        left = deadline - time.monotonic()
                        if ready or left <= 0:
                            return ready[:100]
                        state.cond.wait(left)
            if method in ("setWebhook",):
                state.webhook_url = p.get("url") or None
                state.webhook_secret = p.get("secret_token")
                if state.balance_webhooks and state.webhook_url and state.webhook_url not in state.webhook_urls:
                    state.webhook_urls.append(state.webhook_url)
                return True
            if method in ("deleteWebhook",):
                state.webhook_url = None
                state.webhook_urls.clear()
                return True
            if method == "getWebhookInfo":
                return {"url": state.webhook_url or "", "has_custom_certificate": False, "pending_update_count": 0}
            if method in SEND_METHODS:
                chat = str(p.get("chat_id", ""))
                mid = int(p["message_id"]) if method.startswith("edit") and p.get("message_id") else next(
                    state.message_ids)
                with state.cond:
                    state.sent.append(Sent(method, p, time.time(), mid))
                    state.cond.notify_all()
                msg: dict[str, Any] = {"message_id": mid, "date": int(time.time()),
                                       "chat": {"id": int(chat), "type": "private" if int(chat) > 0 else "group"},
                                       "from": BOT_USER}
                if method == "sendPhoto":
                    msg["photo"] = [{"file_id": "P", "file_unique_id": "P", "width": 1, "height": 1}]
                    msg["caption"] = p.get("caption", "")
                else:
                    msg["text"] = p.get("text", "")
                return msg
            return True

    return Handler


def _parse_multipart(body: bytes, ctype: str) -> dict[str, Any]:
    boundary = ctype.split("boundary=", 1)[-1].strip().strip('"').encode()
    out: dict[str, Any] = {}
    for part in body.split(b"--" + boundary):
        head, _, value = part.partition(b"\r\n\r\n")
        if b'name="' not in head:
            continue
        name = head.split(b'name="', 1)[1].split(b'"', 1)[0].decode()
        value = value.rstrip(b"\r\n-")
        if b"filename=" in head:
            out[name] = f"<file {len(value)} bytes>"
        else:
            out[name] = value.decode(errors="replace")
    return out


def main() -> None:  # pragma: no cover - a manual tool
    parser = argparse.ArgumentParser(description="fake Telegram Bot API server")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--balance-webhooks", action="store_true",
                        help="keep every webhook URL set and post updates to them in turn")
    parser.add_argument("--webhook-workers", type=int, default=0,
                        help="post webhooks from this many threads, retrying while every bot is down")
    args = parser.parse_args()
    api = FakeBotAPI(
        port=args.port, balance_webhooks=args.balance_webhooks, webhook_workers=args.webhook_workers
    ).start()
    print(f"fake Bot API on {api.base_url}", flush=True)
    try:
        api.thread.join()
    except KeyboardInterrupt:
        api.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
