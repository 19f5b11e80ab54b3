"""Imported by a worker's supervisor (as a serializer module) to give it a large heap that
its children inherit through fork: ``$TASKD_TEST_BALLAST_MB`` megabytes, every page touched."""
import os

_ballast = b"\x01" * (int(os.environ.get("TASKD_TEST_BALLAST_MB", "0")) << 20)
