"""Every setting in one place: defaults in code, overrides from the environment or an explicit mapping."""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared import broker

RABBITMQ_CONSUMER_TIMEOUT = 1800.0  # seconds; RabbitMQ's default `consumer_timeout` (30 minutes)


class Settings(BaseSettings):
    """predq's configuration; each field is read from the environment variable of the same name."""

    model_config = SettingsConfigDict(case_sensitive=True, extra="ignore", frozen=True)

    REDIS_URL: str = "redis://127.0.0.1:6379/0"
    CELERY_BROKER_URL: str | None = Field(None, description="Broker for task messages (redis:// or amqp://); "
                                                           "defaults to REDIS_URL.")
    MODELS_DIR: str = "./models"
    MODEL_RESCAN_SECONDS: float = Field(2.0, ge=0, description="How often a process looks for new model versions, and for model files changed in place.")

    SYNC_MAX_ROWS: int = Field(1000, ge=1)
    DEFAULT_MODEL: str | None = Field(None, description="Model of MLflow-style /invocations that name none.")
    PREDICT_MAX_BATCH_SIZE: int = Field(64, ge=1, description="Single predictions merged into one predict call.")
    PREDICT_MAX_WAIT_MS: float = Field(2.0, ge=0, description="Longest a batch waits for requests on their way.")
    PREDICTION_CACHE_SIZE: int = Field(0, ge=0, description="Answers kept per web process; 0: no cache.")
    PREDICT_FAST_PATH: Literal["on", "off"] = Field("on", description="Serve single predictions of one JSON object "
                                                    "without Flask's request handling (same answers); off: through Flask.")
    RESULT_TTL: int = Field(7 * 24 * 3600, ge=60, description="Seconds a finished job and its results are kept.")
    CHUNK_SIZE: int = Field(0, ge=0, description="Rows per chunk; 0 picks it from the row width.")
    CHUNK_TARGET_CELLS: int = Field(500_000, ge=1000, description="Cells per chunk when CHUNK_SIZE is 0.")
    MAX_CHUNK_ROWS: int = Field(200_000, ge=1)
    CHUNK_COMPRESSION: str = Field("zstd", pattern="^(zstd|lz4|none)$")
    CHUNK_STORE_URL: str | None = Field(None, description="fsspec URL for chunk blobs (file://, s3://, gs://); "
                                                          "unset: the blobs stay in Redis.")
    MAX_CHUNK_ATTEMPTS: int = Field(3, ge=1, description="Deliveries of one chunk before its rows fail.")
    MAX_CHUNK_REFUSALS: int = Field(10, ge=1, description="Refusals of one chunk by workers whose copy of the "
                                    "job's model differs before the job fails.")
    BISECT_MAX_PREDICT_CALLS: int = Field(200, ge=1)

    CHUNK_SOFT_TIME_LIMIT: float = Field(120, gt=0)
    CHUNK_TIME_LIMIT: float = Field(150, gt=0)
    VISIBILITY_TIMEOUT: float = Field(600, gt=0)
    UNACKED_RESTORE_INTERVAL: float = Field(60, gt=0)
    CHUNK_QUEUE: str = "predq.chunks"
    JOB_QUEUE_WINDOW: int = Field(16, ge=1, description="Chunks of one job in the broker at once.")
    STALE_CHUNK_SECONDS: float = Field(900, gt=0, description="A queued chunk not done after this is re-sent.")
    RECONCILE_INTERVAL: float = Field(60, gt=0)
    HEARTBEAT_INTERVAL: float = Field(5, gt=0)

    STORE_MAX_BYTES: int = Field(0, ge=0, description="Redis memory budget when Redis has no maxmemory; 0: none.")
    STORE_FULL_FRACTION: float = Field(0.9, gt=0, le=1, description="New jobs get 503 store_full past this.")
    WAITAOF_TIMEOUT_MS: int = Field(1000, ge=0)
    WORKER_STALE_SECONDS: float = Field(60, gt=0, description="A worker whose canary is older is not consuming.")
    IDEMPOTENCY_LEASE_SECONDS: int = Field(60, ge=1, description="How long an unfinished request holds its key.")
    SCHEDULES_FILE: str | None = Field(None, description="TOML or YAML file of schedules.")
    SOURCE_ROOTS: str = Field("", description="Comma-separated roots that `source` URIs must lie under.")
    SOURCE_READ_TIME_LIMIT: float = Field(3600, gt=0, description="Seconds a worker may take to read one source.")
    SCHEDULE_TICK_SECONDS: float = Field(10, gt=0, description="How often beat looks for due schedule runs.")
    BEAT_LOCK_TIMEOUT: float = Field(90, gt=0, description="Seconds before a second beat takes over a silent one.")
    API_KEYS_FILE: str | None = Field(None, description="JSON file of API keys (names, sha256 hashes, scopes).")
    AUTH: Literal["on", "off"] = Field("on", description="off: serve without keys on any address.")
    RATE_LIMIT_PER_MINUTE: int = Field(6000, ge=0, description="Requests per API key per minute; 0: no limit.")
    CORS_ORIGINS: str = Field("", description="Comma-separated origins browsers may call from; none: no CORS.")
    MAX_UPLOAD_BYTES: int = Field(20 * 1024**3, ge=1)
    MAX_JSON_BYTES: int = Field(100 * 1024**2, ge=1)
    MAX_COLUMNS: int = Field(10_000, ge=1, description="Columns a file may have (CSV header, JSON keys, Parquet).")
    MAX_CELL_BYTES: int = Field(64 * 1024, ge=1, description="Bytes one text value may hold; longer fails its row.")
    MAX_JOB_ROWS: int = Field(100_000_000, ge=1, description="Rows one job may have.")
    MAX_CHUNK_BYTES: int = Field(8 * 1024**2, ge=1 << 20, description="Bytes of rows one chunk or batch may hold.")
    SPOOL_DIR: str | None = None
    LOG_LEVEL: str = "INFO"

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> Settings:
        if not self.CHUNK_SOFT_TIME_LIMIT < self.CHUNK_TIME_LIMIT:
            raise ValueError("CHUNK_SOFT_TIME_LIMIT must be below CHUNK_TIME_LIMIT")
        if self.CELERY_BROKER_URL:
            broker.kind(self.CELERY_BROKER_URL)  # names a scheme no transport here speaks
        return self

    def warnings(self) -> list[str]:
        """Settings that work but cost something; each process logs these at start."""
        found = []
        if broker.kind(self.broker_url) == "amqp":
            longest = max(self.CHUNK_TIME_LIMIT, self.SOURCE_READ_TIME_LIMIT + 30)
            if longest > RABBITMQ_CONSUMER_TIMEOUT:
                # RabbitMQ closes the channel of a delivery unacknowledged for longer; the task is then cut short
                # and delivered again, and again.
                found.append(f"tasks may hold a RabbitMQ delivery for {longest:g} s (SOURCE_READ_TIME_LIMIT + 30, "
                             f"CHUNK_TIME_LIMIT): set RabbitMQ's consumer_timeout above that (its default is "
                             f"{RABBITMQ_CONSUMER_TIMEOUT:g} s)")
        elif self.VISIBILITY_TIMEOUT < 3 * self.CHUNK_TIME_LIMIT:
            # Counting stays exact (a chunk commits once), but a slow chunk is delivered again and runs twice.
            found.append(f"VISIBILITY_TIMEOUT ({self.VISIBILITY_TIMEOUT:g} s) is less than 3 x CHUNK_TIME_LIMIT "
                         f"({self.CHUNK_TIME_LIMIT:g} s): slow chunks will be delivered and run more than once")
        return found

    @property
    def source_roots(self) -> list[str]:
        return [r.strip() for r in self.SOURCE_ROOTS.split(",") if r.strip()]

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.CORS_ORIGINS.split(",") if o.strip()]

    @property
    def broker_url(self) -> str:
        return self.CELERY_BROKER_URL or self.REDIS_URL


def load_settings(overrides: dict[str, Any] | None = None) -> Settings:
    """Environment first, then explicit overrides (tests and the app factory pass these)."""
    return Settings(**(overrides or {}))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
