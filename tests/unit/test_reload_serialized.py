"""SIGHUP handling runs reloads one at a time and always answers systemd."""
import asyncio

from taskd.worker import reload as reload_mod


class Notifier:
    def __init__(self):
        self.sent = []

    def reloading(self):
        self.sent.append("RELOADING")

    def ready(self, status=None):
        self.sent.append("READY")


class Sup:
    """Stands in for the reloader's shutdown (never stopping) and status (its notifier,
    its line)."""
    stopping = False

    def __init__(self, loop):
        self.loop, self.notifier = loop, Notifier()

    def line(self):
        return "ok"


def test_a_sighup_during_a_reload_runs_one_more_after_it(monkeypatch):
    async def main():
        sup = Sup(asyncio.get_running_loop())
        reloader = reload_mod.Reloader(sup.loop, sup, None, None, sup, sup, None)
        started, release = [], asyncio.Event()

        async def fake_reload(s):
            started.append(len(started) + 1)
            await release.wait()
            if len(started) == 2:
                raise RuntimeError("a bug in the second reload")
        monkeypatch.setattr(reload_mod, "_reload", fake_reload)
        reloader.request()
        await asyncio.sleep(0)
        reloader.request()              # during the first: queued, not interleaved
        reloader.request()              # coalesced with the queued one
        await asyncio.sleep(0.01)
        assert started == [1]
        release.set()
        await reloader.task
        assert started == [1, 2]
        # READY follows every RELOADING, also after the reload that failed
        assert sup.notifier.sent == ["RELOADING", "READY", "RELOADING", "READY"]
    asyncio.run(main())
