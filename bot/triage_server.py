"""One triage model for several bot processes (issue 8): ``hotline triage-serve``.

Behind webhooks, two or more bot processes share the work (README, "Several processes"). Each would otherwise
load the model (about 1 GB and 10-30 s of CPU), run it in batches half as large, and make a restarted bot wait
for its model before it can triage again. ``hotline triage-serve`` loads the product's brain once (model,
knowledge base) and answers the bots over a Unix socket or a TCP port (``multiprocessing.connection``, with a
password: ``HOTLINE_TRIAGE_KEY``, by default derived from the bot token the processes share). The bots find it
through ``HOTLINE_TRIAGE_SERVER`` (bot/triage_process.py ``own_process``). Requests from all bots that arrive
together are triaged as one batch (``BatchingTriage``).

A bot whose server is away (restarting) gets an error for that call, as from a failed model: the step answers
"busy" and the update is tried again later (bot/telegram_app.py); the next call connects again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from bot.triage_process import RemoteBrain, TriageUnavailable, vectors_of

log = logging.getLogger(__name__)


def parse_address(address: str) -> str | tuple[str, int]:
    """"host:port" for TCP, anything else is a Unix socket path."""
    host, sep, port = address.rpartition(":")
    if sep and port.isdigit() and "/" not in address:
        return (host or "127.0.0.1", int(port))
    return address


def authkey(settings: Any) -> bytes:
    """The password bots and server share: ``triage_key``, else one derived from the bot token."""
    if settings.triage_key:
        return settings.triage_key.encode()
    return hashlib.sha256(b"hotline-triage:" + settings.telegram_token.encode()).digest()


# --------------------------------------------------------------------------- the server


class TriageServer:
    """Serves ``brain`` (triage_many, embed_many, load) to bot processes; one thread per connection."""

    def __init__(self, address: str, key: bytes, brain: Any) -> None:
        from bot.telegram_app import BatchingTriage

        self.address, self.key, self.brain = address, key, brain
        self.batching = BatchingTriage.wrap(brain)
        self.listener: Listener | None = None
        self.ready = threading.Event()
        self._closed = False
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()  # a connection is closed once, by whoever takes it out of _conns

    def load(self) -> None:
        load = getattr(self.batching, "load", None)
        if callable(load):
            load()

    def serve_forever(self) -> None:
        addr = parse_address(self.address)
        if isinstance(addr, str) and os.path.exists(addr):
            os.unlink(addr)  # left by a server that was killed
        self.listener = Listener(addr, authkey=self.key)
        if isinstance(addr, str):
            os.chmod(addr, 0o600)
        self.ready.set()
        log.info("triage server listening on %s", self.address)
        while not self._closed:
            try:
                conn = self.listener.accept()
            except AuthenticationError:
                log.warning("a connection to the triage server gave a wrong password; refused")
                continue
            except (OSError, EOFError):
                if self._closed:
                    return
                log.warning("a connection to the triage server failed", exc_info=True)
                continue
            with self._conns_lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="triage-conn").start()

    def close(self) -> None:
        self._closed = True
        if self.listener is not None:
            self.listener.close()
        for conn in list(self._conns):
            self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        """Close a client's connection once: ``close`` and the thread serving it both try, and a second
        close of the same descriptor failed with EBADF — or could close a file opened since under its number."""
        with self._conns_lock:
            if conn not in self._conns:
                return
            self._conns.discard(conn)
        conn.close()

    def _serve(self, conn: Connection) -> None:
        try:
            self._serve_requests(conn)
        finally:
            self._drop(conn)

    def _serve_requests(self, conn: Connection) -> None:
        while True:
            try:
                op, arg = conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: ``close`` closed it under this read
                return
            try:
                reply = ("ok", self._answer(op, arg))
            except Exception as err:  # the bot raises it, as a brain in its own process would
                reply = ("error", err)
            try:
                conn.send(reply)
            except (OSError, ValueError):
                return

    def _answer(self, op: str, arg: Any) -> Any:
        if op == "load":
            self.load()
            return os.getpid()
        if op == "triage_many":
            texts = list(arg)
            prefetch = getattr(self.batching, "prefetch", None)
            if callable(prefetch):  # batched with what other bots are asking right now
                for text in texts:
                    prefetch(text)
            return [self.batching(text) for text in texts], vectors_of(self.brain, texts)
        if op == "embed":
            return self.brain.embed(arg)
        raise ValueError(f"unknown triage request {op!r}")


def serve(address: str, key: bytes, brain: Any) -> TriageServer:
    """Load ``brain`` and serve it (blocking, until the process is stopped)."""
    server = TriageServer(address, key, brain)
    server.load()
    server.serve_forever()
    return server


# --------------------------------------------------------------------------- the bots' side


class TriageClient(RemoteBrain):
    """A bot's brain that asks the triage server; one connection per calling thread at a time (a small pool)."""

    def __init__(self, address: str, key: bytes) -> None:
        super().__init__()
        self.address, self.key = address, key
        self._idle: list[Connection] = []
        self.pid: int | None = None

    def _connect(self) -> Connection:
        try:
            return Client(parse_address(self.address), authkey=self.key)
        except (OSError, EOFError, AuthenticationError) as err:
            raise TriageUnavailable(f"triage server {self.address} unavailable: {err}") from err

    def _request(self, op: str, arg: Any) -> Any:
        for attempt in (1, 2):
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            fresh = conn is None
            if conn is None:
                conn = self._connect()
            try:
                conn.send((op, arg))
                status, value = conn.recv()
            except (EOFError, OSError) as err:
                conn.close()
                if fresh or attempt == 2:  # a pooled connection may have outlived a restarted server
                    raise TriageUnavailable(f"triage server {self.address} went away: {err}") from err
                continue
            with self._lock:
                self._idle.append(conn)
            if status == "error":
                raise value
            return value
        raise AssertionError("unreachable")

    def load(self, wait: float = 180.0) -> None:
        """Wait until the server has its model loaded (it may be starting too: up to ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                self.pid = self._request("load", None)
                return
            except TriageUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _triage_many(self, texts: list[str]) -> tuple[list[dict[str, Any]], list[Any] | None]:
        return self._request("triage_many", texts)

    def _embed(self, text: str) -> Any:
        return self._request("embed", text)


# --------------------------------------------------------------------------- the process


def run(listen: str = "", database_url: str = "", policy: str = "") -> int:
    """``hotline triage-serve``: the product's brain for the bots on this machine or network."""
    from bot.triage_process import product_brain
    from models.settings import get_settings

    settings = get_settings()
    address = listen or settings.triage_server
    if not address:
        print("请用 --listen 或 HOTLINE_TRIAGE_SERVER 指定分诊服务的地址（套接字路径或 主机:端口）。")
        return 2
    brain = product_brain(database_url or settings.effective_database_url, policy or settings.policy)
    print(f"triage server {os.getpid()} loading the model; then listening on {address}", flush=True)
    try:
        serve(address, authkey(settings), brain)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m bot.triage_server")
    p.add_argument("--listen", default="")
    p.add_argument("--db", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    return run(args.listen, args.db)


if __name__ == "__main__":
    raise SystemExit(main())
