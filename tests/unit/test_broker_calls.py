"""The supervisor's awaited broker calls, without a broker."""
import asyncio

import pytest

from taskd.worker.amqp import AsyncChannel, ChannelLost


class Connection:
    is_open, closed = True, False

    def close(self):
        self.closed, self.is_open = True, False


def test_a_broker_call_without_an_answer_fails_and_closes_the_connection():
    async def main():
        conn = AsyncChannel(asyncio.get_running_loop(), "amqp://", connect_timeout=1,
                            heartbeat=0, name="test", on_lost=None)
        conn.connection = Connection()

        def basic_cancel(tag, callback):      # like pika for a tag it does not know
            pass
        with pytest.raises(ChannelLost, match="no answer from the broker to basic_cancel"):
            await conn.call(basic_cancel, "ctag1", timeout=0.05)
        assert conn.connection.closed and not conn._pending
    asyncio.run(asyncio.wait_for(main(), 5))
