"""The Celery worker and beat entry point: `celery -A worker.app worker` / `celery -A worker.app beat`."""
import logging

from shared.dispatch import make_celery
from shared.logs import configure_logging
from shared.schedules import ScheduleFileError, load_schedules
from shared.settings import get_settings

configure_logging(get_settings().LOG_LEVEL)
for warning in get_settings().warnings():
    logging.getLogger("worker").warning(warning)
try:
    load_schedules(get_settings().SCHEDULES_FILE)
except ScheduleFileError as e:  # stop at start, naming the schedule and the field
    raise SystemExit(f"predq: {e}") from e
app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]
