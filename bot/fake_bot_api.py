"""A fake Telegram Bot API server on 127.0.0.1, for tests, benchmarks and smoke tests of a deployment.

python-telegram-bot talks to it through ``base_url``. It records everything the bot sends, feeds
updates (messages, contacts, locations, photos, stickers, button presses) through getUpdates or to a
webhook, and injects faults: 429 with retry_after, 500, slow answers, and 403 for users who blocked the
bot. Run it alone with ``python -m bot.fake_bot_api --port 8081``.
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


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return  # the bot hung up a long poll on shutdown
        super().handle_error(request, client_address)


class FakeBotAPI:
    """Start with ``start()``, feed with ``message()`` / ``press()`` …, read ``sent``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.state = FakeState()
        self.server = _QuietServer((host, port), _make_handler(self.state))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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
            self.state.cond.notify_all()
        if self.state.webhook_url:
            _post_webhook(self.state.webhook_url, self.state.webhook_secret, update)
        return uid

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


def _post_webhook(url: str, secret: str | None, update: dict[str, Any]) -> None:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(update).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    if secret:
        req.add_header("X-Telegram-Bot-Api-Secret-Token", secret)
    try:
        urllib.request.urlopen(req, timeout=10).read()
    except Exception:  # the bot may be down: Telegram would retry; the test decides
        pass


def _make_handler(state: FakeState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

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
                offset = int(p.get("offset") or 0)
                timeout = min(float(p.get("timeout") or 0), 2.0)
                deadline = time.monotonic() + timeout
                with state.cond:
                    while True:
                        ready = [u for u in state.updates if u["update_id"] >= offset]
                        left = deadline - time.monotonic()
                        if ready or left <= 0:
                            return ready[:100]
                        state.cond.wait(left)
            if method in ("setWebhook",):
                state.webhook_url = p.get("url") or None
                state.webhook_secret = p.get("secret_token")
                return True
            if method in ("deleteWebhook",):
                state.webhook_url = None
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
    args = parser.parse_args()
    api = FakeBotAPI(port=args.port).start()
    print(f"fake Bot API on {api.base_url}", flush=True)
    try:
        api.thread.join()
    except KeyboardInterrupt:
        api.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
