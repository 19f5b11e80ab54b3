"""Run every example of the seed page ("Executing Tasks") against a live worker.

Started by ``scripts/demo.sh`` with ``TASKD_CONFIG`` pointing at
``etc/taskd.yaml`` and ``examples/`` on ``PYTHONPATH``. Each section prints
the code it runs and what came back.
"""
import argparse
import subprocess
import time
from datetime import datetime, timedelta

from taskd.exceptions import NotDeliveredError, UnroutableError
from taskd.execute import send_task

from tasks import (CompressVideoTask, ImageCropTask, ImageRotateTask, UnbanTask,
                   UpdateReccomendationsTask, add)


def show(code, value):
    print(f"  {code:<66} -> {value!r}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker-pid", type=int)
    args = parser.parse_args()

    print("delay and apply_async")
    show("add.delay(2, 2).get(timeout=30)", add.delay(2, 2).get(timeout=30))
    show("add.apply_async(args=[10, 10]).get()", add.apply_async(args=[10, 10]).get(timeout=10))
    show('add.apply_async(args=[2], kwargs={"y": 5}).get()',
         add.apply_async(args=[2], kwargs={"y": 5}).get(timeout=10))

    print("send_task by name")
    show('send_task("tasks.add", [2, 2]).get()', send_task("tasks.add", [2, 2]).get(timeout=10))

    print("ETA and countdown")
    started = time.monotonic()
    result = add.apply_async(args=[10, 10], countdown=3)
    value = result.get(timeout=30)
    show("add.apply_async(args=[10, 10], countdown=3).get()",
         f"{value} after {time.monotonic() - started:.2f}s")
    soon = datetime.now() + timedelta(seconds=2)   # the page uses days=1; 2 s keeps the demo short
    started = time.monotonic()
    value = UnbanTask.apply_async(args=["bob"], eta=soon).get(timeout=30)
    show('UnbanTask.apply_async(args=["bob"], eta=now + 2s).get()',
         f"{value} after {time.monotonic() - started:.2f}s")

    print("serializers")
    for name in ("json", "yaml"):
        show(f'add.apply_async(args=[10, 10], serializer="{name}").get()',
             add.apply_async(args=[10, 10], serializer=name).get(timeout=10))

    print("connections: one publisher for many sends")
    numbers = [(2, 2), (4, 4), (8, 8), (16, 16)]
    results = []
    with add.get_publisher(connect_timeout=3) as publisher:
        for pair in numbers:
            results.append(add.apply_async(args=pair, publisher=publisher))
    show("[res.get() for res in results]", [res.get(timeout=10) for res in results])
    show("add.apply_async([10, 10], connect_timeout=3).get()",
         add.apply_async([10, 10], connect_timeout=3).get(timeout=10))

    print("routing: topic exchange 'tasks', queues video (video.#), image (image.#), lowpri (misc.#)")
    show('CompressVideoTask.apply_async(args=["f.mp4"], routing_key="video.compress")',
         CompressVideoTask.apply_async(args=["f.mp4"], routing_key="video.compress").get(timeout=10))
    show('ImageRotateTask.apply_async(args=["f.png", 360], routing_key="image.rotate")',
         ImageRotateTask.apply_async(args=["f.png", 360], routing_key="image.rotate").get(timeout=10))
    show('ImageCropTask.apply_async(args=["f.png", (0, 0, 9, 9)], routing_key="image.crop")',
         ImageCropTask.apply_async(args=["f.png", (0, 0, 9, 9)],
                                   routing_key="image.crop").get(timeout=10))
    show('UpdateReccomendationsTask.apply_async(routing_key="misc.recommend")',
         UpdateReccomendationsTask.apply_async(routing_key="misc.recommend").get(timeout=10))

    print("AMQP options")
    show('add.apply_async(args=[1, 1], routing_key="misc.add", priority=0).get()',
         add.apply_async(args=[1, 1], routing_key="misc.add", priority=0).get(timeout=10))
    show("add.apply_async(args=[1, 2], mandatory=True).get()",
         add.apply_async(args=[1, 2], mandatory=True).get(timeout=10))
    try:
        add.apply_async(args=[1, 3], routing_key="nowhere.at.all", mandatory=True)
    except UnroutableError as exc:
        show('apply_async(routing_key="nowhere.at.all", mandatory=True)', f"UnroutableError: {exc}")
    show("add.apply_async(args=[1, 4], immediate=True).get()",
         add.apply_async(args=[1, 4], immediate=True).get(timeout=10))
    try:
        add.apply_async(args=[1, 5], queue="nobody-consumes-this", immediate=True)
    except NotDeliveredError as exc:
        show('apply_async(queue="nobody-consumes-this", immediate=True)', f"NotDeliveredError: {exc}")

    if args.worker_pid:
        print("the worker's processes")
        out = subprocess.run(["ps", "-o", "pid,args", "--pid", str(args.worker_pid),
                              "--ppid", str(args.worker_pid)], capture_output=True, text=True)
        print("".join(f"  {line}\n" for line in out.stdout.splitlines()), end="")


if __name__ == "__main__":
    main()
