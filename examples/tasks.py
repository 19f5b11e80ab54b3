"""The tasks of the seed page ("Executing Tasks"), as a taskd module.

The worker imports this module (``imports: [tasks]``); clients import it to
call the tasks by reference. The class-based tasks keep the page's names.
"""
from taskd import App, Task, current_app

# App(config=...) when $TASKD_CONFIG is set, else the defaults (+ $TASKD_BROKER_URL).
app = current_app()


@app.task
def add(x, y):
    return x + y


@app.task
def mul(x, y):
    return x * y


@app.task
def fail(message="this task always fails"):
    raise ValueError(message)


@app.task
def tsum(numbers):
    """A chord body: the sum of its header's results."""
    return sum(numbers)


@app.task
def on_error(task_id):
    """An error callback: called with the id of the task that failed."""
    return f"handled the failure of {task_id}"


class CompressVideoTask(Task):
    routing_key = "video.compress"

    def run(self, filename):
        return f"compressed {filename}"


class ImageRotateTask(Task):
    routing_key = "image.rotate"

    def run(self, filename, degrees):
        return f"rotated {filename} by {degrees}"


class ImageCropTask(Task):
    routing_key = "image.crop"

    def run(self, filename, selection):
        return f"cropped {filename} to {selection}"


class UpdateReccomendationsTask(Task):   # (sic) the page's spelling
    routing_key = "misc.recommend"

    def run(self):
        return "recommendations updated"


class UnbanTask(Task):
    def run(self, username):
        return f"unbanned {username}"
