"""`taskd dead-letters` against the real broker: it streams, one message at a time."""
import json

import pika

from taskd import config as config_mod, deadletters


def test_dead_letters_are_listed_one_at_a_time_and_replayed_in_full(topo, broker):
    config = config_mod.load(topo.config())
    target = topo.name("celery")
    broker.delete(queues=[topo.dead])
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        ch = conn.channel()
        ch.queue_declare(topo.dead, durable=True)
        ch.queue_declare(target, durable=True)
        for i in range(5):
            ch.basic_publish("", topo.dead, json.dumps([[i], {}, {}]).encode(),
                             pika.BasicProperties(headers={"task": "ttasks.add", "id": str(i),
                                                           "x-taskd-queue": target,
                                                           "x-taskd-reason": "test"}))
    finally:
        conn.close()
    listing = iter(deadletters.list_dead(config))
    assert next(listing)["id"] == "0"
    assert broker.queue_state(topo.dead)[0] == 4        # only the one listed is taken
    assert [e["id"] for e in listing] == ["1", "2", "3", "4"]
    assert broker.queue_state(topo.dead)[0] == 5        # all given back
    assert deadletters.replay(config) == (5, 0)
    assert broker.queue_state(topo.dead)[0] == 0
    assert [json.loads(b)[0][0] for _, b in broker.get_all(target)] == [0, 1, 2, 3, 4]
