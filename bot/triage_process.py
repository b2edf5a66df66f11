"""The triage model in a process of its own (issue 8).

The bot's steps are Python work that holds the interpreter lock; so is much of a model call (the tokenizer,
sentence-transformers and transformers glue around torch, jieba, scikit-learn). In one process, a batch of
sixteen messages being triaged held up every step and every reply for tens of milliseconds at a time: under a
flood the whole bot ran at the speed of one core. ``TriageProcess`` runs the brain (``bot.services.ProductBrain``:
model, knowledge base, its own database connection for knowledge-base refreshes) in a child process and
answers ``triage_many``/``embed`` from it. The bot's process never imports torch.

A child that dies (killed, out of memory) is started again on the next call, which is retried once; a call
that fails inside the child raises its error in the caller, as the brain itself would.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger(__name__)

_brain: Any = None  # in the child: the brain built by ``_start``


class TriageUnavailable(ConnectionError):
    """The model's process or server could not be reached: a passing outage (the update is tried again
    later, as after a database outage), not a fault of the message."""


def _start(make: str, args: tuple) -> None:
    """Child initializer: build the brain with ``make`` ("module:function") and load it."""
    global _brain
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    module, _, name = make.partition(":")
    _brain = getattr(importlib.import_module(module), name)(*args)
    load = getattr(_brain, "load", None)
    if callable(load):
        load()


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """A bot killed outright (SIGKILL, out of memory) cannot stop its child: the child notices that it was
    handed to another parent and exits, instead of holding a model's memory for nobody."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(0)


def _loaded() -> int:
    return os.getpid()


def vectors_of(brain: Any, texts: list[str]) -> list[Any] | None:
    """The vectors ``brain`` made while triaging ``texts`` (its encoder's cache answers), for similar tickets;
    None when it has none, or they failed (similar tickets then compare words)."""
    embed_many = getattr(brain, "embed_many", None)
    if not callable(embed_many):
        return None
    try:
        return list(embed_many(texts))
    except Exception:
        log.warning("embeddings for similar tickets failed", exc_info=True)
        return None


def _child_triage_many(texts: list[str]) -> tuple[list[dict[str, Any]], list[Any] | None]:
    return _brain.triage_many(texts), vectors_of(_brain, texts)


def _child_embed(text: str) -> Any:
    return _brain.embed(text)


def product_brain(url: str, policy_name: str) -> Any:
    """What the child builds for the product: the brain on its own connection to the same database."""
    from bot.services import ProductBrain
    from models.db import make_engine, make_session_factory

    return ProductBrain(make_session_factory(make_engine(url)), policy_name)


class RemoteBrain:
    """A brain (``triage_many``, ``embed``, ``load``) that lives elsewhere: ``_triage_many(texts)`` returns
    the results and, when the brain has them, the vectors triage made, which are kept for ``embed``
    (similar tickets compare them: bot/citizen.py) so that it rarely needs to ask."""

    EMBED_CACHE = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._vectors: OrderedDict[str, Any] = OrderedDict()

    def _triage_many(self, texts: list[str]) -> tuple[list[dict[str, Any]], list[Any] | None]:
        raise NotImplementedError

    def _embed(self, text: str) -> Any:
        raise NotImplementedError

    def __call__(self, text: str) -> dict[str, Any]:
        return self.triage_many([text])[0]

    def triage_many(self, texts: list[str]) -> list[dict[str, Any]]:
        results, vectors = self._triage_many(list(texts))
        if vectors is not None:
            with self._lock:
                for text, vector in zip(texts, vectors, strict=True):
                    self._vectors[text] = vector
                    self._vectors.move_to_end(text)
                while len(self._vectors) > self.EMBED_CACHE:
                    self._vectors.popitem(last=False)
        return results

    def embed(self, text: str) -> Any:
        """The message's vector, as triage computed it (kept from its batch) or asked of the brain."""
        with self._lock:
            vector = self._vectors.get(text)
        return vector if vector is not None else self._embed(text)


class TriageProcess(RemoteBrain):
    """The brain in a child process of this one.

    ``make`` names a module-level function ("module:function") that the child calls with ``args`` to build the
    brain; ``bot.triage_process:product_brain`` with a database URL and a policy name for the product."""

    def __init__(self, make: str, *args: Any) -> None:
        super().__init__()
        self.make, self.args = make, args
        self._pool: ProcessPoolExecutor | None = None
        self.pid: int | None = None

    # ------------------------------------------------------------------ the child

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start,
                    initargs=(self.make, self.args),
                )
            return self._pool

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        for attempt in (1, 2):
            pool = self._executor()
            try:
                return pool.submit(fn, *args).result()
            except BrokenProcessPool:
                with self._lock:
                    if self._pool is pool:
                        self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
                if attempt == 2:
                    raise TriageUnavailable("the triage process died twice in one call") from None
                log.error("the triage process died; starting it again")
        raise AssertionError("unreachable")

    def load(self) -> None:
        """Start the child and wait until its brain is loaded (the model: 10-30 s)."""
        self.pid = self._call(_loaded)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _triage_many(self, texts: list[str]) -> tuple[list[dict[str, Any]], list[Any] | None]:
        return self._call(_child_triage_many, texts)

    def _embed(self, text: str) -> Any:
        return self._call(_child_embed, text)

def own_process(brain: Any) -> Any:
    """The product's brain moved out of the bot's process: to the shared triage server when one is configured
    (``HOTLINE_TRIAGE_SERVER``, bot/triage_server.py), else to a child process when the child can open the
    database too (a server or a file); any other triage function unchanged."""
    from bot.services import ProductBrain

    if not isinstance(brain, ProductBrain):
        return brain
    from models.settings import get_settings

    settings = get_settings()
    if settings.triage_server:
        from bot.triage_server import TriageClient, authkey

        return TriageClient(settings.triage_server, authkey(settings))
    url = brain.sessions.kw["bind"].url
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        return brain  # an in-memory database exists in this process only
    return TriageProcess(
        "bot.triage_process:product_brain", url.render_as_string(hide_password=False), brain.policy_name
    )
