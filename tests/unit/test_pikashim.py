"""The pika internals taskd relies on (taskd.broker.pikashim) still fit the installed pika.

When one of these fails after a pika upgrade, read its message: it names what moved.
Then adapt taskd/broker/pikashim.py, or drop the part pika now does itself.
"""
import pika
from pika.adapters import blocking_connection

from taskd.broker import pikashim


def test_the_pika_internals_taskd_uses_are_unchanged():
    assert pikashim.check_pika() == [], \
        f"pika {pika.__version__} changed: {pikashim.check_pika()}"


def test_a_moved_confirm_internal_is_reported(monkeypatch):
    monkeypatch.delattr(blocking_connection, "_IoloopTimerContext")
    monkeypatch.delattr(pika.BlockingConnection, "_flush_output")
    assert pikashim.check_pika() == [
        "pika.adapters.blocking_connection._IoloopTimerContext is gone",
        "BlockingConnection._flush_output is gone"]


def test_a_changed_confirm_signature_is_reported(monkeypatch):
    def confirm_delivery(self, ack_nack_callback, callback=None, ordered=True):
        pass
    monkeypatch.setattr(pika.channel.Channel, "confirm_delivery", confirm_delivery)
    assert pikashim.check_pika() == [
        "pika.channel.Channel.confirm_delivery now takes "
        "['ack_nack_callback', 'callback', 'ordered'], not ['ack_nack_callback', 'callback']"]


class _Impl:
    """pika's underlying channel, as far as watch_channel uses it."""

    def __init__(self):
        self.calls = []

    def add_on_close_callback(self, cb):
        self.calls.append(("close", cb))

    def confirm_delivery(self, ack_nack_callback, callback):
        self.calls.append(("confirm", ack_nack_callback, callback))

    def add_on_return_callback(self, cb):
        self.calls.append(("return", cb))


def test_watch_channel_registers_taskds_callbacks_on_the_underlying_channel():
    channel = type("BlockingChannel", (), {})()
    channel._impl = _Impl()
    hooks = dict(on_confirm=object(), on_return=object(), on_close=object(),
                 on_selected=object())
    pikashim.watch_channel(channel, **hooks)
    assert channel._impl.calls == [("close", hooks["on_close"]),
                                   ("confirm", hooks["on_confirm"], hooks["on_selected"]),
                                   ("return", hooks["on_return"])]
