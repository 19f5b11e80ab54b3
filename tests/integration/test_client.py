"""The client against the real broker (and a real worker where one is needed): what
reaches its reply queue, its locking, its reply queue's life, its memory and channels."""
import pickle
import uuid

import pika
import pytest

from taskd.exceptions import ContentDisallowed


class _Touch:
    """Unpickling this creates a file: proof that code ran in the client."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _publish_result(broker, queue, task_id, body, content_type, encoding="utf-8"):
    broker.publish(queue, body, pika.BasicProperties(
        content_type=content_type, content_encoding=encoding, correlation_id=task_id))


def test_a_result_of_a_content_type_not_accepted_is_a_failure_and_never_decoded(
        topo, broker, app_for, tmp_path):
    app = app_for(topo.config())      # accept_content: [json]; result_accept_content: null
    queue = app.session().results.reply_to()
    marker = tmp_path / "pwned"
    task_id = str(uuid.uuid4())
    body = pickle.dumps({"status": "SUCCESS", "result": _Touch(str(marker)), "task_id": task_id})
    _publish_result(broker, queue, task_id, body, "application/x-python-serialize", "binary")
    result = app.AsyncResult(task_id)
    with pytest.raises(ContentDisallowed, match="not accepted.*result_accept_content"):
        result.get(timeout=5)
    assert result.state == "FAILURE"
    assert not marker.exists()
