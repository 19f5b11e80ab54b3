"""`taskd inspect` and `taskd control`: their command lines and their tables (no broker)."""
import pytest

from taskd import cli
from taskd.controlcli import format_answers


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (("inspect", "nosuch"), "invalid choice: 'nosuch'"),
    (("control", "ping"), "invalid choice: 'ping'"),
    (("inspect", "ping", "--timeout", "0"), "expected more than 0 seconds"),
    (("control", "revoke", "x", "--bogus"), "unrecognized arguments: --bogus"),
])
def test_unknown_commands_and_flags_exit_64_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 64 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (("control", "revoke"), "revoke needs at least one task id"),
    (("control", "pool_shrink", "two"), "pool_shrink takes [N]"),
    (("control", "cancel_consumer"), "cancel_consumer takes QUEUE"),
    (("inspect", "ping", "extra"), "ping takes no arguments (got extra)"),
    (("inspect", "query_task"), "query_task needs at least one task id"),
])
def test_wrong_arguments_exit_64_before_anything_is_sent(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("TASKD_BROKER_URL", "amqp://nobody:x@127.0.0.1:1/")   # never reached
    assert cli.controlcli.run(parse(*argv)) == 64
    assert message in capsys.readouterr().err


def test_answers_print_as_tables():
    ping = format_answers("ping", {"b@x": {"ok": "pong"}, "a@x": {"error": "No such command"}})
    assert ping.splitlines() == ["NODE  STATUS  REPLY", "a@x   error   No such command",
                                 "b@x   ok      pong"]
    active = format_answers("active", {"a@x": [{"id": "i1", "name": "t.add", "args": [1, 2],
                                                "kwargs": {}, "time_start": None}]})
    assert active.splitlines()[1].split() == ["a@x", "i1", "t.add", "[[1,", "2],", "{}]", "-"]
    stats = format_answers("stats", {"a@x": {
        "pid": 7, "uptime": 3, "pool": {"processes": [1, 2], "max-concurrency": 2},
        "prefetch_count": 8, "total": {"t.add": 5, "t.mul": 1},
        "broker": {"hostname": "h", "port": 5672, "virtual_host": "/"}}})
    assert stats.splitlines()[1].split() == ["a@x", "7", "3s", "2/2", "8", "6", "h:5672/"]
    assert format_answers("revoked", {"a@x": []}) == "NODE  TASK ID\na@x   -"
