"""The ``taskd`` command line: worker, check-config, call, status, schedule, dead-letters,
config-reference."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from . import __version__, config as config_mod, controlcli, deadletters, logsafe, serialization
from .app import App
from .broker.tls import for_url
from .exceptions import ConfigError, TaskdError
from .masking import mask_url

EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 64, 69, 78

DESCRIPTION = """\
taskd: a distributed task queue on RabbitMQ.

The configuration file is --config FILE, else $TASKD_CONFIG, else
/etc/taskd.yaml; $TASKD_BROKER_URL overrides broker.url in it.
"""

WORKER_EPILOG = """\
signals:
  TERM   warm shutdown: stop consuming, finish running tasks (worker.shutdown_timeout),
         give unstarted tasks back to the broker, exit 0
  INT    as TERM; a second INT is a cold shutdown
  QUIT   cold shutdown: kill the children now; their tasks are redelivered
         (a shutdown does not count against worker.max_deliveries)
  HUP    reload the configuration; nothing changes unless all of it checks out,
         a new child importing the task modules included; then replace the
         children gracefully
  TTIN   one more child          TTOU   one child fewer
  USR1   log a dump of children, running tasks and counters

exit codes:
  0 stopped cleanly   1 tasks were cut at shutdown   64 bad command line
  69 broker unreachable or lost   70 internal error   78 configuration error
"""


DASHBOARD_EPILOG = """\
environment:
  TASKD_DASHBOARD_TOKEN  the admin token (overrides dashboard.admin_token): unlocks
                         actions, and reading when --listen is not a loopback address

TERM or INT stops it; events sent meanwhile wait in dashboard.event_queue.
exit codes:
  0 stopped   1 cannot listen on the address   64 bad command line
  78 configuration error, missing extra, or
  no admin token for a non-loopback address
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def build_parser():
    parser = _Parser(prog="taskd", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    w = sub.add_parser("worker", help="run the worker daemon (supervisor + prefork children)",
                       description="Run the worker daemon: a supervisor process consuming the "
                       "configured queues and a pool of child processes running the tasks.",
                       epilog=WORKER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_arg(w)
    w.add_argument("-Q", "--queues", metavar="Q1,Q2",
                   help="comma-separated queues to consume (overrides worker.queues); a name "
                        "not under queues: is declared as Celery would (durable, direct)")
    w.add_argument("-c", "--concurrency", type=_positive_int, metavar="N",
                   help="number of child processes (overrides worker.concurrency)")
    w.add_argument("-l", "--loglevel", choices=config_mod.LOG_LEVELS, type=str.lower,
                   help="log level (overrides logging.level)")
    # -- events (docs/monitoring.md) --
    w.add_argument("-E", "--task-events", action="store_true", dest="send_events",
                   help="publish Celery events for Flower and celery-exporter (sets "
                        "worker.send_events)")
    w.add_argument("-n", "--hostname", metavar="NAME",
                   help="node name, e.g. taskd@%%h (overrides worker.hostname; default "
                        "taskd@<host name>; %%h host name, %%n its first label, %%d domain): "
                        "what events, `taskd inspect` and -d/--destination use")

    c = sub.add_parser("check-config",
                       help="validate the configuration file and probe each broker node",
                       description="Validate the configuration; print every error and exit 78. "
                       "Then connect to each broker node of broker.url (TLS verified as the "
                       "worker verifies it) and report each: reachable or why not, its "
                       "RabbitMQ version and cluster, TLS or not. Exit 0 when at least one "
                       "node answers, 69 when none does.")
    _config_arg(c)
    c.add_argument("--offline", action="store_true",
                   help="only validate the file: do not connect to the broker")

    call = sub.add_parser("call", help="send a task by name and print its result",
                          description="Send a task by name (no task code needed) and print "
                          "its result as JSON.")
    _config_arg(call)
    call.add_argument("name", help="task name, e.g. tasks.add")
    call.add_argument("args", nargs="?", default="[]", help="JSON list of arguments, e.g. '[2, 2]'")
    call.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments")
    call.add_argument("--queue", help="queue to send to")
    call.add_argument("--countdown", type=float, help="run no earlier than this many seconds from now")
    call.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the result")
    call.add_argument("--no-wait", action="store_true", help="print the task id and return")

    d = sub.add_parser("dead-letters", help="list (or replay) messages in the dead-letter queue",
                       description="List the messages in the dead-letter queue with the reason "
                       "each was dead-lettered, or with --replay move them back to the queue "
                       "they came from (confirmed by the broker before the dead copy is removed).")
    _config_arg(d)
    d.add_argument("--queue", help="dead-letter queue (default: worker.dead_letter_queue)")
    d.add_argument("--replay", action="store_true", help="move the messages back to their queues")
    d.add_argument("--task", help="only messages of this task name")
    d.add_argument("--to", metavar="QUEUE", help="with --replay: send them to this queue instead")
    d.add_argument("--limit", type=_positive_int, help="at most this many messages (listing: default 1000; the "
                   "listed ones stay unacknowledged until the listing ends)")
    d.add_argument("--json", action="store_true", help="list as JSON lines")

    st = sub.add_parser("status", help="show the state of the running worker",
                        description="Ask the running worker, over its control socket "
                        "(worker.control_socket), for its PID, uptime, configuration, queues, "
                        "children and their tasks, held ETA tasks and counters.")
    _config_arg(st)
    st.add_argument("--socket", metavar="PATH", help="control socket (default: from the config)")
    st.add_argument("--json", action="store_true", help="print the state as JSON")

    sc = sub.add_parser("schedule", help="list the periodic tasks and their next runs",
                        description="List the schedule: entries of the configuration, each "
                        "with its task, when it fires and its next runs (computed here; no "
                        "worker or broker needed). `taskd status` shows which worker leads "
                        "and what it last fired.")
    _config_arg(sc)
    sc.add_argument("-n", "--next", type=_positive_int, default=3, metavar="N",
                    help="how many next runs to show per entry (default 3)")
    sc.add_argument("--json", action="store_true", help="print the entries as JSON")
    controlcli.add_parsers(sub, _config_arg)      # inspect, control (remote control)

    db = sub.add_parser("dashboard", help="serve the web dashboard on recorded task history",
                        description="Record worker events (Celery's event protocol, from a "
                        "durable queue) into task history and serve the web dashboard on it "
                        "(docs/dashboard.md). Needs the 'dashboard' extra.",
                        epilog=DASHBOARD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_arg(db)
    db.add_argument("--listen", metavar="HOST:PORT",
                    help="address to serve on (overrides dashboard.listen; reading is open "
                         "only on loopback, elsewhere every page needs the admin token)")
    db.add_argument("-l", "--loglevel", choices=config_mod.LOG_LEVELS, type=str.lower,
                    help="log level (overrides logging.level)")

    sub.add_parser("config-reference", help="print the configuration reference (Markdown)")
    return parser


def _config_arg(p):
    p.add_argument("--config", metavar="FILE",
                   help="configuration file (default: $TASKD_CONFIG, else /etc/taskd.yaml)")


def _version():
    return f"taskd {__version__}"


def setup_logging(level):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logsafe.Formatter(
        "[%(asctime)s] %(levelname)s %(name)s[%(process)d]: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    # pika logs each failed connection attempt as seven ERROR lines; taskd says the same
    # in one line ("waiting for the broker: ..."), so pika speaks only at DEBUG.
    logging.getLogger("pika").setLevel(logging.DEBUG if level.lower() == "debug"
                                       else logging.CRITICAL)


def _load(args):
    try:
        return config_mod.load(args.config), None
    except ConfigError as exc:
        for error in exc.errors:
            print(f"taskd: {exc.source}: {error}", file=sys.stderr)
        return None, EX_CONFIG


def _store_errors(config):
    """The result store's client library, if it is missing (the extra to install)."""
    from . import stores
    try:
        if stores.kind(config["result_backend"]) != "rpc":
            stores.require(config["result_backend"])
    except ConfigError as exc:
        return exc.errors
    return []


def cmd_worker(args):
    config, code = _load(args)
    if config is None:
        return code
    setup_logging(args.loglevel or config["logging.level"])
    from .worker.supervisor import Supervisor
    from .worker.metrics import check_config as metrics_errors
    config = _worker_overrides(config, args)
    errors = serialization.check_config(config) + metrics_errors(config) + _store_errors(config)
    if errors:
        for error in errors:
            print(f"taskd: {config.source}: {error}", file=sys.stderr)
        return EX_CONFIG
    queues = tuple(q.strip() for q in args.queues.split(",") if q.strip()) if args.queues else None
    if args.queues is not None and not queues:
        print("taskd: -Q: expected at least one queue name", file=sys.stderr)
        return EX_USAGE
    supervisor = Supervisor(config, queues=queues, concurrency=args.concurrency,
                            config_path=args.config or config.source, hostname=args.hostname)
    return supervisor.run()


def _worker_overrides(config, args):
    """``-E`` and ``-n`` over the configuration (read at start, kept across reloads)."""
    values = {}
    if args.send_events:
        values["worker.send_events"] = True
    if args.hostname is not None:
        if not args.hostname.strip():
            print("taskd: -n: expected a node name", file=sys.stderr)
            sys.exit(EX_USAGE)
        values["worker.hostname"] = args.hostname
    return dataclasses.replace(config, values={**config.values, **values}) if values else config


def cmd_check_config(args):
    config, code = _load(args)
    if config is None:
        return code
    from .worker.metrics import check_config as metrics_errors
    errors = serialization.check_config(config) + metrics_errors(config)
    if errors:
        for error in errors:
            print(f"taskd: {config.source}: {error}", file=sys.stderr)
        return EX_CONFIG
    queues = ", ".join(q.name for q in config_mod.effective_queues(config))
    print(f"{config.source}: OK")
    print(f"  broker:    {'; '.join(mask_url(u) for u in config.broker_urls)}")
    tls = for_url(config.broker_url, config["broker.tls"])
    if tls is not None:
        print(f"  tls:       {tls.describe()}")
    print(f"  queues:    {queues}")
    print(f"  consumes:  {', '.join(config.worker_queues()) or config['default_queue']}")
    print(f"  imports:   {', '.join(config['imports']) or '(none)'}")
    print(f"  schedule:  {len(config['schedule'])} entr{'y' if len(config['schedule']) == 1 else 'ies'}"
          + ("" if config["worker.beat"] else " (worker.beat: false: this worker never leads)"))
    if len(config.broker_urls) > 1:
        print(f"  failover:  {config['broker.failover']}; taskd's own queues: "
              f"{config.system_queue_type}")
        classic = [q.name for q in config_mod.effective_queues(config) if not q.quorum]
        if classic:
            print(f"  warning:   classic queue(s) {', '.join(classic)}: their messages live on "
                  "one node and are out of reach while it is down (queue_type: quorum; "
                  "docs/clusters.md)")
    if args.offline:
        return 0
    return _check_nodes(config)


def _check_nodes(config):
    from .broker.probe import probe_all
    reports = probe_all(config)
    for i, report in enumerate(reports):
        print(f"  {'nodes:' if i == 0 else '':10} {report.line()}")
    answered = [r for r in reports if r.ok]
    if not answered:
        print(f"taskd check-config: no broker node answered ({len(reports)} tried)",
              file=sys.stderr)
        return EX_UNAVAILABLE
    return 0


def cmd_schedule(args):
    from . import periodic
    config, code = _load(args)
    if config is None:
        return code
    rows = periodic.upcoming(config["schedule"], args.next)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"{config.source}: no schedule: entries")
    for row in rows if not args.json else ():
        print(f"{row['name']}: {row['task']} {row['schedule']} (misfire: {row['misfire']})")
        for at in row["next"]:
            print(f"    {at}")
    return 0


def cmd_call(args):
    try:
        call_args = json.loads(args.args)
        call_kwargs = json.loads(args.kwargs)
    except json.JSONDecodeError as exc:
        print(f"taskd call: arguments are not valid JSON: {exc}", file=sys.stderr)
        return EX_USAGE
    if not isinstance(call_args, list) or not isinstance(call_kwargs, dict):
        print("taskd call: ARGS must be a JSON list and --kwargs a JSON object", file=sys.stderr)
        return EX_USAGE
    try:
        app = App(config=args.config) if args.config else App.from_environment()
        result = app.send_task(args.name, call_args, call_kwargs, queue=args.queue,
                               countdown=args.countdown, ignore_result=args.no_wait)
        if args.no_wait:
            print(result.id)
            return 0
        value = result.get(timeout=args.timeout, propagate=False)
    except ConfigError as exc:
        print(f"taskd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except TaskdError as exc:
        print(f"taskd call: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    if result.successful():
        print(json.dumps(value, default=str))
        return 0
    print(f"{result.state}: {type(value).__name__}: {value}", file=sys.stderr)
    return 1


def cmd_status(args):
    from .worker import control
    path = args.socket
    if path is None:
        config, code = _load(args)
        if config is None:
            return code
        path = config["worker.control_socket"]
    try:
        state = control.query(path)
    except OSError as exc:
        print(f"taskd status: no worker answers on {path} ({exc.strerror or exc}); is it "
              "running, and is worker.control_socket the same for both?", file=sys.stderr)
        return EX_UNAVAILABLE
    print(json.dumps(state, indent=2, default=str) if args.json else control.format_status(state))
    return 0


def cmd_remote(args):
    return controlcli.run(args)


def cmd_dead_letters(args):
    config, code = _load(args)
    if config is None:
        return code
    try:
        if args.replay:
            replayed, skipped = deadletters.replay(config, args.queue, args.limit, args.task,
                                                   args.to)
            print(f"replayed {replayed} message(s); left {skipped} in place")
            return 0
        limit = args.limit or deadletters.LIST_LIMIT
        looked = shown = 0
        for e in deadletters.list_dead(config, args.queue, limit):
            looked += 1
            if args.task and e["task"] != args.task:
                continue
            shown += 1
            if args.json:
                print(json.dumps(e, default=str))
            else:
                print(f"{e['dead_at']}  {e['task']}[{e['id']}] from {e['queue']} "
                      f"(deliveries: {e['deliveries']}): {e['reason']}")
    except TaskdError as exc:
        print(f"taskd dead-letters: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    if not args.json:
        more = looked == limit and args.limit is None
        print(f"{shown} message(s)" + (f" (only the first {limit} looked at; --limit for more)"
                                       if more else ""))
    return 0


def cmd_dashboard(args):
    from . import dashboard
    problem = dashboard.missing_extra()
    if problem:
        print(f"taskd: {problem}", file=sys.stderr)
        return EX_CONFIG
    config, code = _load(args)
    if config is None:
        return code
    listen = args.listen or config["dashboard.listen"]
    if args.listen is not None:
        _value, expected = next(
            s for s in config_mod.SETTINGS if s.key == "dashboard.listen").check(args.listen)
        if expected:
            print(f"taskd dashboard: --listen: expected {expected}, got {args.listen!r}",
                  file=sys.stderr)
            return EX_USAGE
    problem = dashboard.missing_driver(config["dashboard.database"])
    if problem:
        print(f"taskd: {problem}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(args.loglevel or config["logging.level"])
    from .dashboard import server
    return server.serve(config, listen)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "config-reference":
        sys.stdout.write(config_mod.reference_markdown())
        return 0
    handler = {"worker": cmd_worker, "check-config": cmd_check_config, "call": cmd_call,
               "dead-letters": cmd_dead_letters, "status": cmd_status,
               "schedule": cmd_schedule, "inspect": cmd_remote, "control": cmd_remote,
               "dashboard": cmd_dashboard}
    sys.exit(handler[args.command](args))
