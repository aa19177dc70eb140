"""Request and response schemas: they validate requests and they are what /openapi.json describes."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobRequest(_Strict):
    """Options of POST /v1/jobs: a JSON body, or form fields before the `file` part, or query parameters."""

    model: str = Field(min_length=1, description="Model name.")
    version: str | None = Field(None, description="Model version; the newest when left out.")
    rows: list[Any] | None = Field(None, description="Input rows as JSON objects (JSON bodies only).")
    source: str | None = Field(None, description="A URI the server reads itself; only under allowed roots.")
    id_column: str | None = Field(None, min_length=1, description="A column passed through to results and errors.")
    probabilities: bool = Field(False, description="Add probability_<class> columns (classifiers).")
    chunk_size: int | None = Field(None, ge=1, description="Rows per chunk; chosen from the row width when left out.")
    max_error_rate: float | None = Field(None, ge=0, le=1, description="Fail the job once more rows than this fraction fail.")
    metadata: dict[str, str] | None = Field(None, description="Caller's labels, returned with the job.")


class ErrorField(BaseModel):
    name: str
    code: str
    message: str


class ErrorBody(BaseModel):
    code: str
    message: str
    details: dict[str, Any] | None = None


class Error(BaseModel):
    error: ErrorBody


class Feature(BaseModel):
    name: str
    dtype: Literal["float64", "int64", "bool", "string", "category"]


class Model(BaseModel):
    name: str
    version: str
    versions: list[str]
    sha256: str
    task: Literal["classification", "regression"]
    features: list[Feature]
    classes: list[Any] | None
    allows_missing: bool


class ModelList(BaseModel):
    data: list[Model]


class ModelRef(BaseModel):
    name: str
    version: str


class RowErrorOut(BaseModel):
    row: int
    code: str
    message: str


class PredictOne(BaseModel):
    model: ModelRef
    prediction: Any
    probabilities: dict[str, float] | None = Field(None, description="Only when asked for, for classifiers.")


class PredictMany(BaseModel):
    model: ModelRef
    predictions: list[Any]
    probabilities: list[dict[str, float] | None] | None = None
    errors: list[RowErrorOut]


class JobModel(BaseModel):
    name: str
    version: str
    sha256: str


class Counts(BaseModel):
    total: int | None
    succeeded: int
    failed: int
    skipped: int


class JobError(BaseModel):
    code: str
    message: str


class Links(BaseModel):
    self: str
    results: str
    errors: str


class Job(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "partially_succeeded", "failed", "cancelled"]
    model: JobModel
    created_at: str
    started_at: str | None
    finished_at: str | None
    counts: Counts
    progress: float | None
    rows_per_second: float | None
    eta_seconds: float | None
    metadata: dict[str, str]
    schedule: dict[str, str] | None = Field(description="For a schedule's run: name, slot and date.")
    error: JobError | None
    links: Links
    workers: dict[str, int] | None = Field(
        None, description="Only for admin keys, on GET /v1/jobs/{id}: chunks each worker (by node name) committed.")


class JobList(BaseModel):
    data: list[Job]
    next_cursor: str | None


class ScheduleRun(BaseModel):
    slot: str
    date: str
    job_id: str
    status: str


class SkippedSlot(BaseModel):
    slot: str
    reason: str
    at: float


class ScheduleOut(BaseModel):
    name: str
    cron: str
    timezone: str
    model: str
    source: str
    output: str
    next_run_at: str
    last_run: ScheduleRun | None
    skipped: list[SkippedSlot] = Field(description="Slots skipped lately because the previous run still ran.")


class ScheduleList(BaseModel):
    data: list[ScheduleOut]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, Any]


# -- MLflow scoring protocol --------------------------------------------------------------------------

class MlflowError(BaseModel):
    """MLflow's error body: its error code (BAD_REQUEST, RESOURCE_DOES_NOT_EXIST, ...) and a message."""

    error_code: str
    message: str


class MlflowPredictions(BaseModel):
    predictions: list[Any] = Field(description="One prediction per input row, in input order.")


# -- Open Inference Protocol v2 -----------------------------------------------------------------------

OipDatatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                      "FP16", "FP32", "FP64", "BYTES"]


class OipError(BaseModel):
    error: str


class OipLive(BaseModel):
    live: bool


class OipReady(BaseModel):
    ready: bool


class OipModelReady(BaseModel):
    name: str
    ready: bool


class OipServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class OipTensorMetadata(BaseModel):
    name: str
    datatype: OipDatatype
    shape: list[int] = Field(description="-1 for the batch dimension.")


class OipModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[OipTensorMetadata]
    outputs: list[OipTensorMetadata]


class OipInputTensor(BaseModel):
    name: str = Field(description="A feature's name (one tensor per feature), or any name for one [rows, features] "
                                  "tensor with the features in the model's order.")
    shape: list[int]
    datatype: OipDatatype
    parameters: dict[str, Any] | None = None
    data: list[Any] = Field(description="Row-major values, flat or nested as the shape.")


class OipRequestedOutput(BaseModel):
    name: Literal["predict", "predict_proba"]
    parameters: dict[str, Any] | None = None


class OipInferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[OipInputTensor]
    outputs: list[OipRequestedOutput] | None = Field(None, description="predict when left out.")


class OipOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: OipDatatype
    data: list[Any]


class OipInferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OipOutputTensor]
