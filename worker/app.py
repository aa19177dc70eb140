"""The Celery worker and beat entry point: `celery -A worker.app worker` / `celery -A worker.app beat`."""
import logging

from shared.dispatch import make_celery
from shared.logs import configure_logging
from shared.settings import get_settings

configure_logging(get_settings().LOG_LEVEL)
for warning in get_settings().warnings():
    logging.getLogger("worker").warning(warning)
app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]
