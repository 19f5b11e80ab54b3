"""The seed page, option by option, against a real worker and the real broker."""
import os
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

import pika
import pytest

from conftest import wait_for
from taskd import Task
from taskd.exceptions import (ConnectionError, ContentDisallowed, NotDeliveredError,
                              NotRegistered, PublishError, TaskRevokedError, UnroutableError)


@pytest.fixture
def served(topo, workers, app_for):
    """A worker on the default queue and a client app, sharing one config."""
    path = topo.config({"accept_content": ["json", "yaml", "msgpack", "reversed-json"],
                        "serializer_modules": ["revser"], "imports": ["ttasks", "revser"]})
    worker = workers(path).ready()
    return app_for(path), worker


def test_delay_is_apply_async_with_args_and_kwargs(served):
    app, _ = served
    a = app.send_task("ttasks.echo", [1, 2], {"kwarg1": "x", "kwarg2": "y"}).get(timeout=10)
    assert a == {"args": [1, 2], "kwargs": {"kwarg1": "x", "kwarg2": "y"}}


def test_unknown_option_raises_type_error_naming_it():
    class T(Task):
        name = "ttasks.add"
    with pytest.raises(TypeError, match="retry_policyy"):
        T.apply_async((1, 2), retry_policyy={})


def test_countdown_runs_no_earlier_than_due(served):
    app, _ = served
    sent = time.time()
    ran_at = app.send_task("ttasks.now", countdown=1.5).get(timeout=15)
    assert ran_at >= sent + 1.5
    assert ran_at < sent + 5       # and reasonably soon after


def test_eta_naive_means_local_time_and_aware_is_honoured(served):
    app, _ = served
    naive = datetime.now() + timedelta(seconds=1)
    aware = datetime.now(timezone.utc) + timedelta(seconds=1)
    r1 = app.send_task("ttasks.now", eta=naive)
    r2 = app.send_task("ttasks.now", eta=aware)
    assert r1.get(timeout=15) >= naive.timestamp()
    assert r2.get(timeout=15) >= aware.timestamp()


def test_expired_task_is_revoked_not_run(served):
    app, _ = served
    result = app.send_task("ttasks.add", [1, 1], expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=10)
    assert result.state == "REVOKED"


def test_expires_after_eta_runs(served):
    app, _ = served
    assert app.send_task("ttasks.add", [2, 3], countdown=0.5, expires=30).get(timeout=10) == 5


@pytest.mark.parametrize("serializer", ["json", "yaml", "msgpack", "reversed-json"])
def test_serializers_round_trip(served, serializer):
    pytest.importorskip("msgpack") if serializer == "msgpack" else None
    app, _ = served
    out = app.send_task("ttasks.typed", [[1, "two", 3.5]], serializer=serializer).get(timeout=10)
    assert out == {"type": "list", "value": [1, "two", 3.5]}


def test_json_carries_datetimes_decimals_uuids_bytes(served):
    import uuid
    from decimal import Decimal
    app, _ = served
    when = datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc)
    for value, type_name in [(when, "datetime"), (Decimal("1.10"), "Decimal"),
                             (uuid.UUID(int=7), "UUID"), (b"\x00\xff", "bytes"), ({1, 2}, "set")]:
        out = app.send_task("ttasks.typed", [value]).get(timeout=10)
        assert out == {"type": type_name, "value": value}


def test_refused_content_type_is_dead_lettered_with_a_failure_result(served, topo, broker):
    app, _ = served
    result = app.send_task("ttasks.add", [1, 1], serializer="pickle")
    with pytest.raises(ContentDisallowed, match="application/x-python-serialize"):
        result.get(timeout=10)
    dead = wait_for(lambda: broker.get_all(topo.dead), message="dead letter")
    props, _ = dead[0]
    assert "ContentDisallowed" in props.headers["x-taskd-reason"]
    assert props.headers["id"] == result.id


def test_serializer_precedence_argument_task_config(topo, broker, app_for):
    path = topo.config({"default_serializer": "yaml"})
    app = app_for(path)
    queue = topo.name("celery")

    class WithAttr(Task):
        name = "ttasks.add"
        abstract = False
        serializer = "msgpack"
    WithAttr.app = app
    app.send_task("ttasks.add", [1, 1], ignore_result=True)               # config default
    WithAttr.apply_async((1, 1), ignore_result=True)                      # task attribute
    WithAttr.apply_async((1, 1), serializer="json", ignore_result=True)   # argument
    wait_for(lambda: broker.queue_state(queue)[0] == 3, message="3 messages queued")
    types = [p.content_type for p, _ in broker.get_all(queue)]
    assert types == ["application/x-yaml", "application/x-msgpack", "application/json"]


def test_unknown_task_name_fails_instead_of_hanging(served):
    app, _ = served
    result = app.send_task("tasks.does_not_exist", [1])
    with pytest.raises(NotRegistered, match="tasks.does_not_exist"):
        result.get(timeout=10)


def test_headers_reach_the_task(served):
    app, _ = served
    out = app.send_task("ttasks.whoami", headers={"x-custom": "hello"}).get(timeout=10)
    assert out["custom"] == "hello" and out["retries"] == 0 and out["delivery_count"] == 1


def test_task_id_option(served):
    app, _ = served
    result = app.send_task("ttasks.whoami", task_id="my-own-id")
    assert result.id == "my-own-id"
    assert result.get(timeout=10)["id"] == "my-own-id"


def test_mandatory_raises_when_nothing_is_bound(served, topo):
    app, _ = served
    assert app.send_task("ttasks.add", [1, 2], mandatory=True).get(timeout=10) == 3
    with pytest.raises(UnroutableError, match="no binding for routing key 'nowhere'"):
        app.send_task("ttasks.add", [1, 2], exchange=topo.name("celery"), routing_key="nowhere",
                      mandatory=True)


def test_publishing_to_a_missing_exchange_fails_at_once_and_names_it(served, topo):
    app, _ = served
    missing = topo.name("no-such-exchange")
    started = time.monotonic()
    for mandatory in (True, False):
        with pytest.raises(UnroutableError, match=f"no exchange '{missing}'.*declare the exchange"):
            app.send_task("ttasks.add", [1, 2], exchange=missing, routing_key="x",
                          mandatory=mandatory)
    assert time.monotonic() - started < 10     # not the 30 s confirm timeout
    assert app.send_task("ttasks.add", [1, 2]).get(timeout=10) == 3   # the client recovers


def test_immediate_both_outcomes(served, topo, broker):
    app, _ = served
    assert app.send_task("ttasks.add", [2, 2], immediate=True).get(timeout=10) == 4
    lonely = topo.name("lonely")
    topo.queues.add(lonely)
    with pytest.raises(NotDeliveredError, match="no worker is consuming"):
        app.send_task("ttasks.add", [2, 2], queue=lonely, immediate=True)
    assert broker.queue_state(lonely) is None        # nothing was published or declared


def test_connect_timeout_against_a_silent_broker(topo, app_for):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    threading.Thread(target=lambda: [server.accept() for _ in range(4)], daemon=True).start()
    path = topo.config({"broker": {"url": f"amqp://guest:guest@127.0.0.1:{port}/"}})
    app = app_for(path)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        app.send_task("ttasks.add", [1, 1], connect_timeout=1)
    assert time.monotonic() - started < 4    # one try at 1 s, one retry at 1 s, some slack
    server.close()


def test_publisher_reuse_as_on_the_page(served):
    app, _ = served

    class Add(Task):
        name = "ttasks.add"
        abstract = False
    Add.app = app
    numbers = [(2, 2), (4, 4), (8, 8), (16, 16)]
    results = []
    publisher = Add.get_publisher(connect_timeout=3)
    for args in numbers:
        results.append(Add.apply_async(args=args, publisher=publisher))
    publisher.close()
    assert [res.get(timeout=10) for res in results] == [4, 8, 16, 32]
    with Add.get_publisher() as p:
        many = [Add.apply_async(args=(i, i), publisher=p) for i in range(50)]
    assert [r.get(timeout=10) for r in many] == [2 * i for i in range(50)]


def test_a_borrowed_connection_is_reused(served, broker):
    app, _ = served
    conn = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        results = [app.send_task("ttasks.add", [i, 1], connection=conn) for i in range(3)]
        assert [r.get(timeout=10) for r in results] == [1, 2, 3]
        assert conn.is_open                         # taskd does not close what it borrowed
    finally:
        conn.close()


def test_pipelined_publisher_reports_unroutable_on_flush(served, topo):
    app, _ = served
    p = app.get_publisher()
    with pytest.raises(UnroutableError):
        app.send_task("ttasks.add", [1, 1], exchange=topo.name("celery"), routing_key="nope",
                      mandatory=True, publisher=p)
    p.close()
    assert isinstance(UnroutableError("x"), PublishError)


def test_pooled_connection_is_recreated_after_fork(served):
    app, _ = served
    assert app.send_task("ttasks.add", [1, 1]).get(timeout=10) == 2   # parent connects first
    pid = os.fork()
    if pid == 0:   # the child must not reuse the parent's socket
        code = 1
        try:
            code = 0 if app.send_task("ttasks.add", [20, 1]).get(timeout=10) == 21 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert app.send_task("ttasks.add", [3, 3]).get(timeout=10) == 6   # parent still fine


def test_priority_zero_is_served_first(topo, workers, app_for, tmp_path):
    path = topo.config({"queues": [{"name": "prio", "max_priority": 9}]},
                       queues=["prio"], concurrency=1, prefetch_multiplier=1)
    app = app_for(path)
    out = tmp_path / "order.txt"
    # Fill the queue while no worker consumes it, lowest priority first.
    for p in (9, 5, 7, 0, 3):
        app.send_task("ttasks.record", [str(out), f"p{p}"], queue=topo.name("prio"),
                      priority=p, ignore_result=True)
    workers(path).ready()
    wait_for(lambda: out.exists() and len(out.read_text().split("\n")) > 5, message="5 tasks")
    order = [line.split()[0] for line in out.read_text().splitlines()]
    assert order == ["p0", "p3", "p5", "p7", "p9"]


def test_seed_routing_with_video_and_image_workers(topo, workers, app_for, tmp_path):
    cfg = {"exchanges": [{"name": "tasks", "type": "topic"}],
           "queues": [{"name": "video", "exchange": "tasks", "binding_key": "video.#"},
                      {"name": "image", "exchange": "tasks", "binding_key": "image.#"},
                      {"name": "lowpri", "exchange": "tasks", "binding_key": "misc.#"}],
           "default_exchange": "tasks"}
    video_cfg = topo.config(cfg, name="video.yaml", queues=["video"])
    image_cfg = topo.config(cfg, name="image.yaml", queues=["image"])
    video, image = workers(video_cfg, "-Q", topo.name("video")).ready(), \
        workers(image_cfg, "-Q", topo.name("image")).ready()
    app = app_for(video_cfg)
    out = tmp_path / "who.txt"

    class CompressVideoTask(Task):
        name = "ttasks.record"
        abstract = False
        routing_key = "video.compress"
    CompressVideoTask.app = app
    assert CompressVideoTask.apply_async(args=[str(out), "v"]).get(timeout=10) == "v"
    for key, token in (("image.rotate", "r"), ("image.crop", "c")):
        assert app.send_task("ttasks.record", [str(out), token], routing_key=key).get(timeout=10) == token
    by_token = {line.split()[0]: int(line.split()[1]) for line in out.read_text().splitlines()}
    assert by_token == {"v": video.pid, "r": image.pid, "c": image.pid}
    # misc.* reaches lowpri, which neither worker consumes: it waits there
    app.send_task("ttasks.record", [str(out), "m"], routing_key="misc.recommend", ignore_result=True)
    assert wait_for(lambda: (topo.broker.queue_state(topo.name("lowpri")) or (0,))[0] == 1,
                    message="message in lowpri")
