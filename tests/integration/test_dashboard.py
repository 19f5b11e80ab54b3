"""``taskd dashboard`` in a real browser (headless chromium via Playwright) on real history.

The peer is a real ``celery worker -E`` (tests/support/dashcelery.py): it sends
Celery's events to ``celeryev`` and answers the ``celery.pidbox`` mailbox, the
two protocols the dashboard speaks. One stack and one browser for this module
(dashstack.py); the suite runs each test file whole in one process (``--dist loadfile``).
"""
import json
import os
import pathlib
import uuid

import pika
import pytest

from dashstack import CHROMIUM, CHROMIUM_ARGS, ROOT, TOKEN, Stack, wait_for

pytestmark = pytest.mark.broker
playwright_api = pytest.importorskip("playwright.sync_api")
# Screenshots go to docs/img/ (the ones docs/dashboard.md shows) when
# TASKD_DOCS_SCREENSHOTS=1, else beside the test's files, so a test run leaves the tree clean.
DOCS_IMG = ROOT / "docs" / "img"
XSS = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"


@pytest.fixture(scope="session")
def img(tmp_path_factory):
    return DOCS_IMG if os.environ.get("TASKD_DOCS_SCREENSHOTS") == "1" else tmp_path_factory.mktemp("img")


# Module scope, not session: the file runs whole in one xdist process, and Playwright's
# sync API keeps an event loop running in the main thread while it is open, which would
# break the asyncio.run() of later tests in the same process.
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not pathlib.Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/browser.sh (the suite's command does)")
    s = Stack(tmp_path_factory.mktemp("dashboard"))
    s.start_celery()
    s.start_dashboard()
    wait_for(lambda: s.channel_call(lambda ch: ch.queue_declare(s.queue, passive=True)
                                    .method.consumer_count or None), 60,
             message="the celery worker to consume")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    # CSP bypassed: the XSS test must prove the escaping alone (the dashboard's
    # Content-Security-Policy would block an injected script too; a unit test checks it).
    context = browser.new_context(viewport={"width": 1200, "height": 800}, bypass_csp=True)
    yield context.new_page()
    context.close()


def login(page, stack):
    page.goto(stack.url + "/login")
    page.fill("input[name=token]", TOKEN)
    page.click("form.login button")
    page.wait_for_selector(".flash")


def test_pages_render_history_from_a_real_worker(stack, page, img):
    ok = stack.send("dash.add", 2, 3)
    bad = stack.send("dash.fail", XSS)
    parent = stack.send("dash.parent", 2)
    wait_for(lambda: stack.recorded(ok, "SUCCESS"), message="dash.add recorded as SUCCESS")
    wait_for(lambda: stack.recorded(bad, "FAILURE"), message="dash.fail recorded as FAILURE")
    wait_for(lambda: stack.recorded(parent, "SUCCESS"), message="dash.parent recorded")
    children = json.loads(stack.recorded(parent)["result"].replace("'", '"'))
    wait_for(lambda: all(stack.recorded(c, "SUCCESS") for c in children), message="children")

    page.goto(stack.url + "/")
    assert page.locator("svg.chart rect.ok").count() >= 1       # a bar for this minute
    wait_card = page.locator(".card", has_text="wait, median").inner_text()
    assert " s" in wait_card and "–" not in wait_card           # sent -> started, measured
    page.screenshot(path=str(img / "dashboard-overview.png"), full_page=True)

    page.goto(stack.url + "/workers")
    row = page.locator("tr.worker", has_text=stack.node)
    row.locator("span.pill.ok").wait_for()                      # online, from heartbeats
    assert stack.queue in row.locator("td.queues").inner_text()  # from active_queues
    assert row.locator("td.pool").inner_text() == "1 process"    # from stats
    assert page.locator(".error").count() == 0                   # the mailbox answered
    page.screenshot(path=str(img / "dashboard-workers.png"), full_page=True)

    page.goto(stack.url + "/tasks?name=dash.*")
    assert page.locator(f"a[href='/tasks/{ok}']").count() == 1
    page.goto(stack.url + "/tasks?state=FAILURE&name=dash.fail")
    assert page.locator(f"a[href='/tasks/{bad}']").count() == 1
    assert page.locator(f"a[href='/tasks/{ok}']").count() == 0
    page.screenshot(path=str(img / "dashboard-tasks.png"), full_page=True)

    page.goto(stack.url + f"/tasks/{ok}")
    assert page.locator("pre.result").inner_text() == "5"
    timeline = page.locator("ol.timeline").inner_text()
    for kind in ("task-sent", "task-received", "task-started", "task-succeeded"):
        assert kind in timeline

    page.goto(stack.url + f"/tasks/{parent}")
    for child in children:
        page.click(f"a[href='/tasks/{child}']")                  # parent -> child
        page.click(f"a[href='/tasks/{parent}']")                 # child -> parent
    page.screenshot(path=str(img / "dashboard-task.png"), full_page=True)

    page.goto(stack.url + "/queues")
    assert stack.queue in page.locator("table").inner_text()


def test_task_supplied_text_is_escaped(stack, page, img):
    bad = stack.send("dash.fail", XSS)
    wait_for(lambda: stack.recorded(bad, "FAILURE"), message="dash.fail recorded")
    page.goto(stack.url + f"/tasks/{bad}")
    assert "<script>window.__xss = 1</script>" in page.locator("pre.exception").inner_text()
    assert "<script>window.__xss" in page.locator("pre.traceback").inner_text()
    assert page.evaluate("window.__xss") is None                # shown, never run
    assert page.locator("main script, main img").count() == 0
    page.screenshot(path=str(img / "dashboard-xss-escaped.png"), full_page=True)


def stats_pool(stack):
    from taskd.config import load
    from taskd.dashboard.mailbox import Mailbox
    with Mailbox(load(str(stack.config))) as mb:
        reply = mb.call("stats", destination=[stack.node])
    return len(reply[stack.node]["pool"]["processes"])      # max-concurrency stays as started


def test_an_action_needs_the_admin_token(stack, page, img):
    page.goto(stack.url + "/workers")
    row = page.locator("tr.worker", has_text=stack.node)
    row.locator("button[value=pool_grow]").click()              # not logged in
    assert "actions need the admin token" in page.locator(".error").inner_text()
    assert stats_pool(stack) == 1

    login(page, stack)
    # Logged in, but a POST from another site's page is refused (Origin check).
    response = page.request.post(stack.url + "/workers/action", headers={"Origin": "http://evil.example"},
                                 form={"worker": stack.node, "action": "pool_grow", "csrf": "x"})
    assert response.status == 403
    assert stats_pool(stack) == 1

    page.goto(stack.url + "/workers")
    page.locator("tr.worker", has_text=stack.node).locator("button[value=pool_grow]").click()
    assert "pool_grow" in page.locator(".flash").inner_text()
    wait_for(lambda: stats_pool(stack) == 2, 10, message="the pool to grow to 2")

    def shown():
        page.goto(stack.url + "/workers")
        return "2 processes" == page.locator("tr.worker", has_text=stack.node).locator("td.pool").inner_text()
    wait_for(shown, 10, message="the workers page to show 2 processes")
    page.goto(stack.url + "/audit")
    assert "pool_grow" in page.locator("table.audit").inner_text()
    assert stack.node in page.locator("table.audit").inner_text()
    page.screenshot(path=str(img / "dashboard-audit.png"), full_page=True)


def test_dead_letters_replay_one(stack, page, img):
    task_id = str(uuid.uuid4())

    def put(ch):
        ch.queue_declare(stack.dead, durable=True)
        ch.queue_declare(stack.replay_to, durable=True)
        ch.basic_publish("", stack.dead, b'[[], {}, {}]', pika.BasicProperties(
            content_type="application/json", delivery_mode=2, headers={
                "id": task_id, "task": "dash.add", "x-taskd-queue": stack.replay_to,
                "x-taskd-reason": "test: <b>not bold</b>", "x-taskd-dead-at": "now",
                "x-taskd-delivery-count": 3}))
    stack.channel_call(put)
    page.goto(stack.url + "/dead-letters")
    row = page.locator("tr.dead", has_text=task_id)
    assert "<b>not bold</b>" in row.inner_text()
    row.locator("button").click()                               # not logged in: refused
    assert page.locator(".error").count() == 1
    assert stack.channel_call(lambda ch: ch.queue_declare(stack.dead, passive=True)
                              .method.message_count) == 1

    login(page, stack)
    page.goto(stack.url + "/dead-letters")
    page.screenshot(path=str(img / "dashboard-dead-letters.png"), full_page=True)
    page.locator("tr.dead", has_text=task_id).locator("button").click()
    assert "replayed 1" in page.locator(".flash").inner_text()
    moved = stack.channel_call(lambda ch: ch.queue_declare(stack.replay_to, passive=True).method.message_count)
    left = stack.channel_call(lambda ch: ch.queue_declare(stack.dead, passive=True).method.message_count)
    assert (moved, left) == (1, 0)


def test_history_survives_a_dashboard_restart(stack, page):
    before = stack.send("dash.add", 1, 1)
    wait_for(lambda: stack.recorded(before, "SUCCESS"), message="recorded before the restart")
    stack.stop_dashboard()
    during = stack.send("dash.add", 20, 22)                      # sent while it is down
    stack.start_dashboard()
    wait_for(lambda: stack.recorded(during, "SUCCESS"), message="events kept in the durable queue")
    page.goto(stack.url + f"/tasks/{during}")
    assert page.locator("pre.result").inner_text() == "42"
    page.goto(stack.url + f"/tasks/{before}")
    assert page.locator("pre.result").inner_text() == "2"


def test_scheduled_lists_a_held_eta_task_and_revoking_it_needs_the_token(stack, page):
    held = stack.app.app.send_task("dash.add", args=[7, 7], queue=stack.queue, countdown=600).id

    def listed():
        page.goto(stack.url + "/scheduled")
        return page.locator("tr", has_text=held).count() == 1
    wait_for(listed, 30, interval=1,
             message=f"the ETA task on /scheduled (recorded as {stack.recorded(held)})")
    row = page.locator("tr", has_text=held)
    assert "dash.add" in row.inner_text() and stack.node in row.inner_text()

    # Revoke it from its page: refused without the token, done with it.
    page.goto(stack.url + f"/tasks/{held}")
    page.click("form.revoke button")
    assert "actions need the admin token" in page.locator(".error").inner_text()
    assert held not in revoked(stack)
    login(page, stack)
    page.goto(stack.url + f"/tasks/{held}")
    page.click("form.revoke button")
    assert f"revoke {held}" in page.locator(".flash").inner_text()
    assert held in revoked(stack)


def revoked(stack):
    from taskd.config import load
    from taskd.dashboard.mailbox import Mailbox
    with Mailbox(load(str(stack.config))) as mb:
        return mb.call("revoked", destination=[stack.node]).get(stack.node, [])


def test_live_update_without_reload_under_the_dashboards_csp(stack, browser):
    context = browser.new_context()                             # the real CSP applies here
    page = context.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(stack.url + "/")
    page.evaluate("window.__marker = 'same page';"
                  "document.getElementById('live').insertAdjacentHTML('beforeend', '<i id=stale></i>')")
    wait_for(lambda: page.evaluate("document.getElementById('live').dataset.refreshed"), 12,
             interval=0.5, message="a live refresh")
    assert page.locator("#stale").count() == 0                  # the content was fetched anew
    assert page.evaluate("window.__marker") == "same page"      # in place: no reload
    assert page.locator("svg.chart").count() == 1
    assert not errors, errors                                   # nothing refused by the CSP
    context.close()
