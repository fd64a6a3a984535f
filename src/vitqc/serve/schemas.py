"""The service's answers as pydantic models (the OpenAPI schema at ``/docs``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["BatchPrediction", "ErrorBody", "Health", "Limits", "ModelInfo", "Prediction"]


class Prediction(BaseModel):
    score: float = Field(description="raw image score (threshold units)")
    normalized_score: float = Field(
        description="operator score in [0, 1]: 0.5 at the threshold in use"
    )
    defective: bool = Field(description="the decision (threshold and minimum-area rule)")
    threshold: float = Field(description="raw-score threshold in use")
    model: str = Field(description="model id (sha256 of the bundle)")
    latency_ms: float = Field(description="server time for this request, queue wait included")
    file: str = Field(description="the upload's file name (or 'body')")
    width: int
    height: int
    sha256: str = Field(description="sha256 of the uploaded bytes")
    min_area_px: float | None = Field(
        default=None, description="minimum defect area in original pixels, when one is set"
    )
    largest_region_px: float | None = Field(
        default=None, description="largest region above the threshold, original pixels"
    )
    map_png: str | None = Field(
        default=None, description="?map=true: the heat-map overlay, base64 PNG"
    )


class BatchPrediction(BaseModel):
    results: list[Prediction] = Field(description="one per file, in the order sent")
    model: str
    latency_ms: float


class Health(BaseModel):
    status: str = "ok"
    model: str


class Limits(BaseModel):
    workers: int
    max_queue: int
    threads_per_worker: int
    max_body_mb: float
    max_pixels: int
    max_batch: int
    api_key_required: bool


class ModelInfo(BaseModel):
    model: str = Field(description="model id (sha256 of the bundle)")
    vitqc_version: str | None = Field(description="vitqc version that exported the model")
    server_version: str = Field(description="vitqc version serving it")
    backbone: dict[str, Any] | None
    head: dict[str, Any] | None
    input_size: list[int]
    threshold: float = Field(description="stored raw-score threshold")
    map_low: float = Field(description="typical normal pixel score (operator score 0)")
    min_area: float = Field(description="stored minimum defect area, original pixels (0: off)")
    image_score: str | None
    smoothing_sigma: float | None
    calibration: dict[str, Any] | None = Field(
        description="how the threshold was set: rule, target and expected false-reject "
        "rate with its interval (fpr_interval), min_area"
    )
    validation: dict[str, Any] | None = Field(
        description="the fit's validation figures (synthetic-defect proxy)"
    )
    limits: Limits


class ErrorBody(BaseModel):
    detail: str
