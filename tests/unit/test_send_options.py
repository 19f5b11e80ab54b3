"""The options of one send (taskd.options): checks, precedence call > task > config,
routing. Pure: no broker."""
import math
from datetime import datetime, timedelta, timezone

import pytest

from taskd import config, options as routing
from taskd.exceptions import OptionError
from taskd.options import SendOptions

SEED = config.loads("""
exchanges: [{name: tasks, type: topic}]
queues:
  - {name: video, exchange: tasks, binding_key: "video.#"}
  - {name: image, exchange: tasks, binding_key: "image.#"}
routes:
  "tasks.compress_*": {exchange: tasks, routing_key: video.compress}
  "tasks.thumb": image
""", environ={})


def test_routing_precedence():
    # call options win
    r = routing.resolve_route(SEED, "tasks.compress_x", routing_key="image.crop", task_routing_key="x")
    assert (r.exchange, r.routing_key) == ("tasks", "image.crop")
    # then task attributes
    r = routing.resolve_route(SEED, "tasks.compress_x", task_routing_key="image.rotate")
    assert (r.exchange, r.routing_key) == ("tasks", "image.rotate")
    # then routes:
    r = routing.resolve_route(SEED, "tasks.compress_x")
    assert (r.exchange, r.routing_key) == ("tasks", "video.compress")
    r = routing.resolve_route(SEED, "tasks.thumb")
    assert (r.exchange, r.routing_key) == ("tasks", "image.#")
    # then the default queue, published as Celery does: default exchange, key = queue
    r = routing.resolve_route(SEED, "tasks.other")
    assert (r.exchange, r.routing_key) == ("", "celery")
    assert r.declare[0].name == "celery"


def test_unknown_queue_is_declared_like_celery():
    r = routing.resolve_route(SEED, "t", queue="adhoc")
    assert (r.exchange, r.routing_key) == ("", "adhoc")
    spec = r.declare[0]
    assert (spec.name, spec.exchange, spec.binding_key, spec.arguments) == \
        ("adhoc", "adhoc", "adhoc", None)


def test_priority_maps_zero_to_the_highest():
    assert routing.amqp_priority(0) == 9
    assert routing.amqp_priority(9) == 0
    assert routing.amqp_priority(None) is None
    with pytest.raises(ValueError, match="0 \\(highest\\) to 9"):
        routing.amqp_priority(10)




class VideoTask:
    """Stands in for a Task class: only its attributes are read."""
    serializer = "yaml"
    priority = 3
    time_limit = 60
    soft_time_limit = None
    ignore_result = False
    mandatory = True
    immediate = False
    queue = None
    exchange = None
    routing_key = "video.compress"


NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_the_call_wins_then_the_task_then_the_configuration():
    resolved = SendOptions(priority=0).resolved(SEED, VideoTask, NOW)
    assert (resolved.priority, resolved.serializer, resolved.time_limit) == (0, "yaml", 60)
    assert resolved.mandatory is True and resolved.immediate is False
    assert resolved.task_id and resolved.eta is None
    assert SendOptions().resolved(SEED, None, NOW).serializer == "json"   # config default
    assert SendOptions(serializer="json").resolved(SEED, VideoTask, NOW).serializer == "json"


def test_the_routing_options_of_the_call_are_taken_together_before_the_tasks():
    by_task = SendOptions().resolved(SEED, VideoTask, NOW).route(SEED, "tasks.x")
    assert (by_task.exchange, by_task.routing_key) == ("tasks", "video.compress")
    # a queue given by the call wins over the task's routing key
    by_call = SendOptions(queue="image").resolved(SEED, VideoTask, NOW).route(SEED, "tasks.x")
    assert (by_call.exchange, by_call.routing_key) == ("tasks", "image.#")


def test_countdown_and_expires_become_datetimes():
    resolved = SendOptions(countdown=3, expires=60).resolved(SEED, None, NOW)
    assert resolved.eta == NOW + timedelta(seconds=3) and resolved.countdown is None
    assert resolved.expires == NOW + timedelta(seconds=60)
    eta = datetime(2031, 1, 1)
    assert SendOptions(eta=eta).resolved(SEED, None, NOW).eta is eta


@pytest.mark.parametrize("option, value, error, match", [
    ("countdown", "3", TypeError, "countdown must be a number of seconds"),
    ("countdown", math.nan, OptionError, "countdown must be a finite number"),
    ("eta", "tomorrow", TypeError, "eta must be a datetime"),
    ("expires", [1], TypeError, "expires must be seconds or a datetime"),
    ("priority", 10, OptionError, "priority must be an integer from 0"),
    ("priority", True, OptionError, "priority"),
    ("connect_timeout", -1, OptionError, "connect_timeout must be a positive"),
    ("time_limit", math.inf, OptionError, "time_limit must be a finite"),
    ("retries", -1, OptionError, "retries must be a non-negative integer"),
    ("headers", ["x"], TypeError, "headers must be a mapping"),
])
def test_each_option_is_checked_where_it_is_declared(option, value, error, match):
    with pytest.raises(error, match=match):
        SendOptions(**{option: value})


def test_a_task_attribute_is_checked_like_the_option():
    class Bad(VideoTask):
        priority = 12
    with pytest.raises(OptionError, match="priority"):
        SendOptions().resolved(SEED, Bad, NOW)


def test_a_countdown_beyond_the_year_9999_names_the_option():
    with pytest.raises(OptionError, match="countdown=.* out of range"):
        SendOptions(countdown=1e12).resolved(SEED, None, NOW)


def test_an_unknown_option_is_named():
    with pytest.raises(TypeError, match="send_task\\(\\) got an unexpected keyword argument "
                                        "'countdwn'"):
        SendOptions.of({"countdwn": 3})


def test_the_resolved_options_encode_the_message():
    resolved = SendOptions(priority=0, headers={"x-a": 1}, task_id="t1").resolved(
        SEED, VideoTask, NOW)
    message = resolved.encode("tasks.x", [1], {}, reply_to="taskd.reply.q")
    assert message.task_id == "t1" and message.priority == 9
    assert message.headers["timelimit"] == [60, None] and message.headers["x-a"] == 1
    assert message.content_type == "application/x-yaml" and message.reply_to == "taskd.reply.q"
