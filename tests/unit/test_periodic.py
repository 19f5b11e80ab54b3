"""The schedule core (taskd/periodic.py), the clock passed in: slots of every and cron
entries across DST changes and leap days, the misfire policies, task ids, cursors, and
the checks of ``schedule:`` in the configuration and on the command line."""
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from taskd import cli, config as config_mod, periodic
from taskd.exceptions import ConfigError

UTC = timezone.utc
BERLIN, NEW_YORK = ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York")


def entry(**kw):
    kw.setdefault("task", "t.x")
    return periodic.Entry(name=kw.pop("name", "e"), **kw)


def slots(e, start, n):
    out, t = [], start
    for _ in range(n):
        t = periodic.next_slot(e, t)
        out.append(t)
    return out


def test_every_slots_are_multiples_of_the_period_since_the_epoch():
    e = entry(every=10)
    start = datetime(2026, 5, 1, 12, 0, 3, 500000, tzinfo=UTC)
    assert slots(e, start, 3) == [datetime(2026, 5, 1, 12, 0, s, tzinfo=UTC) for s in (10, 20, 30)]
    # strictly after: a slot is not its own next slot
    assert periodic.next_slot(e, datetime(2026, 5, 1, 12, 0, 10, tzinfo=UTC)).second == 20
    assert periodic.next_slot(entry(every=3600), start) == datetime(2026, 5, 1, 13, tzinfo=UTC)


def test_berlin_spring_forward_a_missing_time_fires_once_right_after_the_gap():
    # 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    e = entry(cron="30 2 * * *", timezone="Europe/Berlin")
    got = slots(e, datetime(2026, 3, 28, 12, tzinfo=BERLIN), 3)
    assert [t.astimezone(BERLIN).isoformat() for t in got] == [
        "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00", "2026-03-31T02:30:00+02:00"]


def test_berlin_fall_back_a_repeated_time_fires_once_an_interval_fires_in_both_hours():
    # 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:00-02:59 happens twice.
    daily = entry(cron="30 2 * * *", timezone="Europe/Berlin")
    got = slots(daily, datetime(2026, 10, 24, 12, tzinfo=BERLIN), 2)
    assert [t.isoformat() for t in got] == ["2026-10-25T00:30:00+00:00",
                                            "2026-10-26T01:30:00+00:00"]
    half_hourly = entry(cron="*/30 * * * *", timezone="Europe/Berlin")
    got = slots(half_hourly, datetime(2026, 10, 25, 1, 45, tzinfo=BERLIN), 5)
    # by elapsed time: 30 minutes apart in UTC, through both copies of 02:xx
    assert [b - a for a, b in zip(got, got[1:])] == [timedelta(minutes=30)] * 4
    assert [t.astimezone(BERLIN).strftime("%H:%M%z") for t in got] == [
        "02:00+0200", "02:30+0200", "02:00+0100", "02:30+0100", "03:00+0100"]


def test_new_york_spring_forward_and_fall_back():
    # 2026-03-08 02:00 EST -> 03:00 EDT; 2026-11-01 02:00 EDT -> 01:00 EST.
    e = entry(cron="30 2 * * *", timezone="America/New_York")
    spring = periodic.next_slot(e, datetime(2026, 3, 7, 12, tzinfo=NEW_YORK))
    assert spring.astimezone(NEW_YORK).isoformat() == "2026-03-08T03:00:00-04:00"
    e = entry(cron="30 1 * * *", timezone="America/New_York")
    got = slots(e, datetime(2026, 10, 31, 12, tzinfo=NEW_YORK), 2)
    assert [t.astimezone(NEW_YORK).isoformat() for t in got] == [
        "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]
    hourly = entry(cron="0 * * * *", timezone="America/New_York")
    got = slots(hourly, datetime(2026, 3, 8, 0, 30, tzinfo=NEW_YORK), 4)
    assert [b - a for a, b in zip(got, got[1:])] == [timedelta(hours=1)] * 3


def test_leap_day_cron_and_the_latest_slot_years_back():
    e = entry(cron="0 0 29 2 *")
    assert slots(e, datetime(2026, 1, 1, tzinfo=UTC), 2) == [
        datetime(2028, 2, 29, tzinfo=UTC), datetime(2032, 2, 29, tzinfo=UTC)]
    now = datetime(2033, 3, 1, tzinfo=UTC)
    first = datetime(2028, 2, 29, tzinfo=UTC)
    assert periodic.latest_slot(e, now, first) == datetime(2032, 2, 29, tzinfo=UTC)
    decision = periodic.decide(e, first, now)
    assert (decision.fire, decision.missed) == (datetime(2032, 2, 29, tzinfo=UTC), 1)


def test_on_time_a_due_slot_runs_under_both_policies():
    for misfire in periodic.MISFIRE_POLICIES:
        e = entry(every=60, misfire=misfire)
        due = datetime(2026, 5, 1, 12, 1, tzinfo=UTC)
        d = periodic.decide(e, due, due + timedelta(milliseconds=30))
        assert (d.fire, d.missed, d.last) == (due, 0, due)


def test_run_once_after_a_gap_runs_the_latest_slot_once():
    e = entry(every=60)
    due = datetime(2026, 5, 1, 12, 1, tzinfo=UTC)
    d = periodic.decide(e, due, due + timedelta(minutes=10, seconds=30))
    assert d.fire == d.last == due + timedelta(minutes=10)
    assert d.missed == 10
    assert periodic.next_slot(e, d.last) > due + timedelta(minutes=10, seconds=30)


def test_skip_after_a_gap_runs_nothing_unless_the_latest_slot_is_within_grace():
    e = entry(cron="0 3 * * *", timezone="Europe/Berlin", misfire="skip")
    due = datetime(2026, 5, 1, 1, tzinfo=UTC)        # 03:00 CEST
    late = periodic.decide(e, due, due + timedelta(hours=2))
    assert (late.fire, late.missed, late.last) == (None, 1, due)
    barely = periodic.decide(e, due, due + timedelta(seconds=periodic.GRACE - 1))
    assert barely.fire == due and barely.missed == 0
    days = periodic.decide(e, due, due + timedelta(days=3, hours=2))
    assert (days.fire, days.missed) == (None, 4)
    assert days.last == due + timedelta(days=3)


def test_task_ids_are_the_same_for_an_entry_and_slot_and_differ_otherwise():
    slot = datetime(2026, 5, 1, 12, tzinfo=UTC)
    same = periodic.task_id("a", slot.astimezone(BERLIN))
    assert same == periodic.task_id("a", slot)
    assert periodic.task_id("b", slot) != same
    assert periodic.task_id("a", slot + timedelta(seconds=1)) != same


def test_cursors_round_trip_and_refuse_garbage():
    t = datetime(2026, 5, 1, 12, tzinfo=UTC)
    assert periodic.decode_cursor(periodic.encode_cursor("x", t)) == ("x", t)
    for body in (b"", b"{}", b'{"entry": "x", "last": "2026-05-01T12:00:00"}', b"[1]"):
        with pytest.raises(ValueError):
            periodic.decode_cursor(body)


SCHEDULE_ERRORS = """\
exchanges: [{name: tasks, type: topic}]
schedule:
  heartbeat: {task: t.a, every: 10, cron: "* * * * *"}
  neither: {task: t.a}
  badcron: {task: t.a, cron: "61 * * * *"}
  badtz: {task: t.a, cron: "0 3 * * *", timezone: Mars/Olympus}
  badopt: {task: t.a, every: 5, options: {queu: x}}
  badexchange: {task: t.a, every: 5, options: {exchange: nope}}
  slow: {task: t.a, every: 0.5, misfire: later}
  good: {task: t.a, every: 5, options: {exchange: tasks, routing_key: a.b, priority: 0}}
"""


def test_schedule_errors_name_the_key_and_line():
    with pytest.raises(ConfigError) as info:
        config_mod.loads(SCHEDULE_ERRORS)
    errors = info.value.errors
    expected = [
        "schedule.heartbeat (line 3): has both every and cron",
        "schedule.neither (line 4): needs every (seconds) or cron",
        "schedule.badcron.cron (line 5): not a valid cron expression '61 * * * *'",
        "schedule.badtz.timezone (line 6): unknown time zone 'Mars/Olympus'",
        "schedule.badopt.options (line 7): unknown option 'queu'",
        "schedule.badexchange.options (line 8): exchange 'nope' is not listed",
        "schedule.slow.every (line 9): expected a number of seconds >= 1",
        "schedule.slow.misfire (line 9): expected one of run_once, skip",
    ]
    for prefix in expected:
        assert any(e.startswith(prefix) for e in errors), (prefix, errors)
    assert not any("good" in e for e in errors)


def test_a_valid_schedule_and_its_defaults():
    cfg = config_mod.loads("schedule:\n  hb: {task: t.hb, every: 10, args: [1], kwargs: {a: 2}}\n")
    (e,) = cfg["schedule"]
    assert (e.name, e.task, e.every, e.cron, e.timezone, e.args, e.kwargs, e.misfire) == \
        ("hb", "t.hb", 10.0, None, "UTC", (1,), {"a": 2}, "run_once")
    assert cfg["worker.beat"] is True and cfg["worker.beat_queue"] == "taskd.beat"
    assert config_mod.loads("")["schedule"] == ()


def test_check_config_refuses_a_bad_schedule_naming_the_key(tmp_path, capsys):
    path = tmp_path / "taskd.yaml"
    path.write_text(SCHEDULE_ERRORS)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check-config", "--config", str(path)])
    assert exit_info.value.code == 78
    err = capsys.readouterr().err
    assert "schedule.badcron.cron (line 5)" in err and "schedule.badtz.timezone" in err


def test_taskd_schedule_lists_entries_and_next_runs_without_a_worker(tmp_path, capsys):
    path = tmp_path / "taskd.yaml"
    path.write_text('schedule:\n  nightly: {task: t.n, cron: "30 2 * * *", '
                    'timezone: Europe/Berlin}\n  hb: {task: t.hb, every: 10}\n')
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["schedule", "--config", str(path), "-n", "2"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "nightly: t.n cron '30 2 * * *' Europe/Berlin (misfire: run_once)"
    assert out[1].strip().endswith(("T02:30:00+01:00", "T02:30:00+02:00", "T03:00:00+02:00"))
    assert out[3].startswith("hb: t.hb every 10s")
    rows = periodic.upcoming(config_mod.loads(path.read_text())["schedule"], 2,
                             now=datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert rows[0]["next"] == ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
