"""How the acker coalesces acks, run on a real event loop against a stub channel that
records what it is asked to send."""
import asyncio

from taskd.worker.acker import ACK_DELAY, Acker


class RecordingChannel:
    def __init__(self):
        self.acks = []

    def basic_ack(self, tag, multiple=False):
        self.acks.append((tag, multiple))


class Consumer:
    is_open = True

    def __init__(self):
        self.channel = RecordingChannel()


class Job:
    def __init__(self, tag, channel):
        self.tag, self.channel = tag, channel


class Sup:
    """The acker and what it is given: the consuming channel, whether work is in hand."""

    def __init__(self, loop, ack_batch):
        self.running = ["a task"]       # other work in hand: acks may wait
        self.acker = Acker(loop, lambda: self.running, batch=ack_batch)
        self.consumer = Consumer()
        self.acker.attach(self.consumer)

    def complete(self, job):
        self.acker.complete(job)


def _deliver(sup, tags):
    jobs = [Job(t, sup.consumer.channel) for t in tags]
    for j in jobs:
        sup.acker.received(j.tag)
    return jobs


def test_acks_of_tasks_finishing_together_go_out_as_one():
    async def main():
        sup = Sup(asyncio.get_running_loop(), ack_batch=4)
        jobs = _deliver(sup, range(1, 9))
        for j in jobs[:4]:
            sup.complete(j)
        assert sup.consumer.channel.acks == [(4, True)]         # the batch was full: at once
        for j in jobs[4:7]:
            sup.complete(j)
        assert sup.consumer.channel.acks == [(4, True)]         # 3 < 4: waiting
        await asyncio.sleep(ACK_DELAY * 5)
        assert sup.consumer.channel.acks == [(4, True), (7, True)]   # the timer sent them
        assert not sup.acker.waiting
    asyncio.run(main())


def test_a_lone_completion_is_acked_after_the_delay_not_held_for_a_batch():
    async def main():
        sup = Sup(asyncio.get_running_loop(), ack_batch=16)
        (job,) = _deliver(sup, [1])
        sup.complete(job)
        assert sup.consumer.channel.acks == []
        await asyncio.sleep(ACK_DELAY * 5)
        assert sup.consumer.channel.acks == [(1, True)]
    asyncio.run(main())


def test_a_completion_from_a_closed_channel_is_never_acked():
    async def main():
        sup = Sup(asyncio.get_running_loop(), ack_batch=1)
        (job,) = _deliver(sup, [1])
        sup.consumer = Consumer()            # reconnected: a new channel
        sup.acker.conn = sup.consumer
        sup.complete(job)
        await asyncio.sleep(ACK_DELAY * 5)
        assert sup.consumer.channel.acks == [] and job.channel.acks == []
    asyncio.run(main())


def test_with_nothing_else_in_hand_a_completion_is_acked_at_once():
    async def main():
        sup = Sup(asyncio.get_running_loop(), ack_batch=16)
        sup.running = []
        (job,) = _deliver(sup, [1])
        sup.complete(job)
        assert sup.consumer.channel.acks == [(1, True)] and not sup.acker.waiting
    asyncio.run(main())
