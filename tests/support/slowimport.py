"""A task module that takes $TASKD_TEST_IMPORT_DELAY seconds to import (a slow deployment)."""
import os
import time

time.sleep(float(os.environ.get("TASKD_TEST_IMPORT_DELAY", "0")))
