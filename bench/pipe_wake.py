"""What it costs to write to a pipe whose reader sleeps in read() (as an idle child does).

    .venv/bin/python bench/pipe_wake.py [--n 20000]

Writes 200 bytes every 100 us to a forked reader, and reports the writer's wall
time and system CPU time per write; then the same with both processes pinned to
one CPU. On a virtual machine, waking a process on the other CPU costs the writer
an inter-processor interrupt.
"""
import argparse
import os
import resource
import time


def measure(n, pin):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        if pin:
            os.sched_setaffinity(0, {0})
        os.close(w)
        while os.read(r, 65536):
            pass
        os._exit(0)
    os.close(r)
    if pin:
        os.sched_setaffinity(0, {0})
    wall = 0.0
    sys_before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for _ in range(n):
        t = time.perf_counter()
        os.write(w, b"x" * 200)
        wall += time.perf_counter() - t
        until = time.perf_counter() + 100e-6
        while time.perf_counter() < until:      # let the reader fall asleep again
            pass
    sys_time = resource.getrusage(resource.RUSAGE_SELF).ru_stime - sys_before
    os.close(w)
    os.waitpid(pid, 0)
    if pin:
        os.sched_setaffinity(0, set(range(os.cpu_count())))
    return 1e6 * wall / n, 1e6 * sys_time / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args()
    for pin, label in ((False, "reader free to run on any CPU"), (True, "both on CPU 0")):
        wall, system = measure(args.n, pin)
        print(f"{label}: {wall:.1f} us wall, {system:.1f} us system CPU per write")


if __name__ == "__main__":
    main()
