"""issue 8: the triage model runs in a process of its own (bot/triage_process.py). A citizen must get the same
answer as from the model in the bot's process, and keeps getting answers when that process dies."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from bot.services import ProductBrain
from bot.telegram_app import BatchingTriage
from bot.triage_process import TriageProcess, own_process
from models.db import make_engine, make_session_factory


class KeywordBrain:
    """A stand-in brain for the child: a keyword rule, a vector per text, and faults on demand."""

    def __init__(self, crash_flag: str) -> None:
        self.crash_flag = Path(crash_flag)

    def load(self) -> None:
        pass

    def triage_many(self, texts: list[str]) -> list[dict]:
        out = []
        for text in texts:
            if "崩溃" in text and not self.crash_flag.exists():
                self.crash_flag.write_text("crashed once")
                os._exit(3)  # the process dies mid-call, as under the out-of-memory killer
            if "出错" in text:
                raise ValueError("模型出错")
            kind = "complaint" if "投诉" in text else "consultation"
            out.append({"category": kind, "pid": os.getpid()})
        return out

    def embed_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.array([len(t), os.getpid()], dtype=np.float32) for t in texts]

    def embed(self, text: str) -> np.ndarray:
        return self.embed_many([text])[0] + 1000  # told apart from a vector kept from a triage batch


def keyword_brain(crash_flag: str) -> KeywordBrain:
    return KeywordBrain(crash_flag)


@pytest.fixture
def remote(tmp_path):
    brain = TriageProcess(f"{__name__}:keyword_brain", str(tmp_path / "crashed"))
    yield brain
    brain.close()


def test_triage_answers_from_another_process_and_keeps_its_vectors(remote):
    remote.load()
    assert remote.pid not in (None, os.getpid())
    got = remote.triage_many(["我要投诉噪音", "居住证怎么办理"])
    assert [r["category"] for r in got] == ["complaint", "consultation"]
    assert {r["pid"] for r in got} == {remote.pid}
    # similar tickets get the vector triage made, without asking the child again
    assert remote.embed("我要投诉噪音").tolist() == [6.0, float(remote.pid)]
    assert remote.embed("没见过的话").tolist()[0] == 1005.0  # not triaged: the child embeds it


def test_a_triage_process_that_dies_is_started_again_and_the_message_still_answered(remote):
    remote.load()
    first = remote.pid
    got = remote.triage_many(["系统崩溃了怎么办，我要投诉"])
    assert got[0]["category"] == "complaint"
    assert got[0]["pid"] != first
    assert remote("居住证怎么办理")["pid"] == got[0]["pid"]  # the new process keeps serving


def test_an_error_inside_the_model_reaches_the_caller_and_the_process_lives_on(remote):
    remote.load()
    with pytest.raises(ValueError, match="模型出错"):
        remote.triage_many(["模型出错了"])
    assert remote("你好，咨询一下")["pid"] == remote.pid


def test_the_channel_batches_through_the_process_and_passes_its_vectors_on(remote):
    triage = BatchingTriage.wrap(remote)
    assert isinstance(triage, BatchingTriage)
    assert triage("投诉楼下烧烤")["category"] == "complaint"
    assert triage.embed("投诉楼下烧烤").tolist()[0] == 6.0


def test_only_the_product_brain_on_a_shared_database_moves_out(tmp_path):
    file_db = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'h.db'}"))
    moved = own_process(ProductBrain(file_db, "quxian"))
    assert isinstance(moved, TriageProcess) and moved.args[1] == "quxian"
    assert moved.args[0].endswith("h.db")
    memory = ProductBrain(make_session_factory(make_engine("sqlite://")), "quxian")
    assert own_process(memory) is memory  # an in-memory database cannot be opened by another process

    def plain(text):
        return {"category": "consultation"}

    assert own_process(plain) is plain


# --------------------------------------------------------------------------- one model for several bots


@pytest.fixture
def server(tmp_path):
    from bot.triage_server import TriageServer

    srv = TriageServer(str(tmp_path / "triage.sock"), b"test-key", KeywordBrain(str(tmp_path / "never")))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    assert srv.ready.wait(5)
    yield srv
    srv.close()


def test_two_bots_share_one_triage_server(server):
    from bot.triage_server import TriageClient

    bots = [TriageClient(server.address, b"test-key") for _ in range(2)]
    for bot in bots:
        bot.load()
    assert bots[0].pid == bots[1].pid == os.getpid()  # the server's process (a thread of this test)
    answers = [bot.triage_many(["我要投诉夜间施工", "公积金怎么提取"]) for bot in bots]
    assert [[r["category"] for r in a] for a in answers] == [["complaint", "consultation"]] * 2
    assert bots[1].embed("我要投诉夜间施工").tolist() == [8.0, float(os.getpid())]
    with pytest.raises(ValueError, match="模型出错"):  # an error in the model reaches the bot as it is
        bots[0]("模型出错了")
    assert bots[0]("我要投诉")["category"] == "complaint"  # and the connection serves on


def test_a_bot_reconnects_after_the_triage_server_restarts(server, tmp_path):
    from bot.triage_server import TriageClient, TriageServer, TriageUnavailable

    bot = TriageClient(server.address, b"test-key")
    assert bot("投诉噪音")["category"] == "complaint"
    server.close()  # the server goes away: its connections with it
    with pytest.raises(TriageUnavailable):
        bot("投诉噪音")
    with pytest.raises(TriageUnavailable):
        bot.load(wait=0.3)  # waits a little for a server that is starting, then says so
    again = TriageServer(server.address, b"test-key", KeywordBrain(str(tmp_path / "never")))
    threading.Thread(target=again.serve_forever, daemon=True).start()
    assert again.ready.wait(5)
    try:
        assert bot("居住证怎么办")["category"] == "consultation"
    finally:
        again.close()


def test_a_client_without_the_password_is_refused(server):
    from bot.triage_server import TriageClient, TriageUnavailable

    with pytest.raises(TriageUnavailable):
        TriageClient(server.address, b"wrong-key")("投诉噪音")


def test_the_bot_uses_the_configured_triage_server(tmp_path, monkeypatch):
    from bot.triage_server import TriageClient
    from models.settings import reset_settings_cache

    monkeypatch.setenv("HOTLINE_TRIAGE_SERVER", str(tmp_path / "t.sock"))
    monkeypatch.setenv("HOTLINE_TELEGRAM_TOKEN", "123:abc")
    reset_settings_cache()
    try:
        moved = own_process(ProductBrain(make_session_factory(make_engine("sqlite://")), "quxian"))
        assert isinstance(moved, TriageClient) and moved.address == str(tmp_path / "t.sock")
        assert moved.key != b"" and b"123:abc" not in moved.key  # derived from the token, not the token
    finally:
        monkeypatch.undo()
        reset_settings_cache()


def test_a_killed_bot_does_not_leave_its_model_process_behind(tmp_path):
    """SIGKILL (or the out-of-memory killer) gives the bot no chance to stop its child: the child must notice
    and exit, or every restart would leave a model's memory behind."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "bot.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from bot.triage_process import TriageProcess\n"
        "if __name__ == '__main__':\n"
        f"    brain = TriageProcess('{__name__}:keyword_brain', {str(tmp_path / 'never')!r})\n"
        "    brain.load()\n"
        "    print(brain.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    bot = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(bot.stdout.readline())
        assert Path(f"/proc/{child}").exists()
    finally:
        bot.send_signal(signal.SIGKILL)
        bot.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
