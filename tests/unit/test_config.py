import pytest

from taskd import config
from taskd.exceptions import ConfigError

GOOD = """
broker:
  url: amqp://u:p@h:5672/%2F
imports: [tasks]
exchanges:
  - {name: tasks, type: topic}
queues:
  - {name: video, exchange: tasks, binding_key: "video.#"}
  - {name: lowpri, exchange: tasks, binding_key: "misc.#", max_priority: 9}
routes:
  "tasks.compress_*": {exchange: tasks, routing_key: video.compress}
worker:
  queues: [video]
  concurrency: 3
  max_memory_per_child: 512MiB
"""


def test_valid_file_gives_typed_values():
    cfg = config.loads(GOOD, environ={})
    assert cfg.broker_url == "amqp://u:p@h:5672/%2F"
    assert cfg["imports"] == ("tasks",)
    assert cfg["worker.concurrency"] == 3
    assert cfg["worker.max_memory_per_child"] == 512 * 1024 * 1024
    assert cfg.queue("lowpri").arguments == {"x-max-priority": 9}
    assert cfg.exchange("tasks").type == "topic"
    assert cfg.route_for("tasks.compress_video").routing_key == "video.compress"
    assert cfg.worker_queues() == ("video",)


def test_defaults_when_empty():
    cfg = config.loads("", environ={})
    assert cfg.broker_url == config.DEFAULT_BROKER_URL
    assert cfg["accept_content"] == ("json",)
    assert [q.name for q in config.effective_queues(cfg)] == ["celery"]


def test_environment_overrides_the_broker_url():
    cfg = config.loads(GOOD, environ={"TASKD_BROKER_URL": "amqp://other/"})
    assert cfg.broker_url == "amqp://other/"


def test_every_error_is_reported_with_key_and_line():
    text = """broker:
  url: amqp://x/
  heartbeat: soon
worker:
  concurrency: 0
  colour: blue
queues:
  - {name: a, exchange: missing}
bogus: 1
"""
    with pytest.raises(ConfigError) as info:
        config.loads(text, source="t.yaml", environ={})
    errors = info.value.errors
    assert any(e.startswith("broker.heartbeat (line 3): expected an integer >= 0") for e in errors)
    assert any(e.startswith("worker.concurrency (line 5): expected an integer >= 1") for e in errors)
    assert any(e.startswith("worker.colour (line 6): unknown setting") for e in errors)
    assert any(e.startswith("queues[0].exchange (line 8): exchange 'missing'") for e in errors)
    assert any(e.startswith("bogus (line 9): unknown setting") for e in errors)
    assert len(errors) == 5


def test_yaml_syntax_error_names_the_line():
    with pytest.raises(ConfigError) as info:
        config.loads("broker:\n  url: [unclosed\n", source="t.yaml", environ={})
    assert "not valid YAML" in info.value.errors[0]
    assert "line" in info.value.errors[0]


def test_soft_limit_must_be_below_hard_limit():
    with pytest.raises(ConfigError, match="soft_time_limit"):
        config.loads("worker: {time_limit: 10, soft_time_limit: 20}", environ={})


def test_worker_queue_must_be_configured():
    with pytest.raises(ConfigError, match="queue 'nope' is not listed"):
        config.loads("queues: [{name: a}]\nworker: {queues: [nope]}", environ={})


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration file"):
        config.load(str(tmp_path / "absent.yaml"), environ={})


def test_sample_config_in_etc_is_valid():
    import pathlib
    cfg = config.load(str(pathlib.Path(__file__).parents[2] / "etc" / "taskd.yaml"), environ={})
    assert {q.name for q in cfg.queues} == {"celery", "video", "image", "lowpri"}


@pytest.mark.parametrize("text,expected", [("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
                                           (0, 0), ("10kb", 10_000), (2048, 2048)])
def test_sizes(text, expected):
    assert config.parse_size(text) == (expected, None)


def test_reference_lists_every_setting():
    ref = config.reference_markdown()
    for s in config.SETTINGS:
        assert f"`{s.key}`" in ref


def test_docs_configuration_reference_is_current():
    import pathlib
    doc = pathlib.Path(__file__).parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == config.reference_markdown(), \
        "regenerate with: taskd config-reference > docs/configuration.md"
