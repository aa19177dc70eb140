"""The Celery application both sides share: the API sends chunk messages by name, workers run them."""
from __future__ import annotations

from celery import Celery

from shared.broker import transport_options
from shared.settings import Settings

PROCESS_CHUNK = "predq.process_chunk"
RECONCILE = "predq.reconcile"
CANARY = "predq.canary"
READ_SOURCE = "predq.read_source"
TICK_SCHEDULES = "predq.tick_schedules"
WRITE_OUTPUT = "predq.write_output"


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured from settings, with the delivery guarantees the design needs."""
    app = Celery("predq", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.CHUNK_QUEUE,
        task_routes={PROCESS_CHUNK: {"queue": settings.CHUNK_QUEUE}},
        task_soft_time_limit=settings.CHUNK_SOFT_TIME_LIMIT,
        task_time_limit=settings.CHUNK_TIME_LIMIT,
        broker_transport_options=transport_options(settings.broker_url,
                                                   visibility_timeout=settings.VISIBILITY_TIMEOUT,
                                                   unacked_restore_interval=settings.UNACKED_RESTORE_INTERVAL),
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,  # with worker_send_task_events: what Flower and `celery events` show
        beat_scheduler="worker.scheduler:Scheduler",
        redbeat_redis_url=settings.REDIS_URL,
        redbeat_key_prefix="predq:beat:",
        redbeat_lock_timeout=int(settings.BEAT_LOCK_TIMEOUT),
        redbeat_redis_options={"socket_connect_timeout": 2, "socket_timeout": 10},
        beat_max_loop_interval=max(1, min(5, int(settings.BEAT_LOCK_TIMEOUT // 3))),
        beat_schedule={
            "reconcile": {"task": RECONCILE, "schedule": settings.RECONCILE_INTERVAL},
            "schedules": {"task": TICK_SCHEDULES, "schedule": settings.SCHEDULE_TICK_SECONDS},
        },
    )
    return app


def send_read(app: Celery, job_id: str, queue: str | None = None) -> None:
    """Send a source job to a worker, which reads its input into chunks (`queue`: one worker's own queue)."""
    app.send_task(READ_SOURCE, args=[job_id], **({"queue": queue} if queue else {}))


def send_output(app: Celery, job_id: str) -> None:
    """Have a worker write a finished run's files."""
    app.send_task(WRITE_OUTPUT, args=[job_id])


def send_chunk(app: Celery, job_id: str, index: int, queue: str | None = None) -> None:
    """Send one chunk's message: only the job id and chunk index travel through the broker.

    `queue`: one worker's own queue instead of the shared one (a chunk another worker refused).
    """
    if queue is None:
        app.send_task(PROCESS_CHUNK, args=[job_id, index])
    else:
        app.send_task(PROCESS_CHUNK, args=[job_id, index], queue=queue)
