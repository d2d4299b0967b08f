"""The native API's request and response models, for the OpenAPI document and /docs.

The hot route validates with explicit checks (service/frontend/native.py: same fields, statuses and messages);
these models describe the same contract to clients and to the schema-driven fuzz tests. Strict types: a number
where a string is expected is a client error, never silently coerced.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

TextPair = tuple[StrictStr, StrictStr]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: StrictStr | list[StrictStr] | list[TextPair] = Field(
        description="one text, a list of texts, or for pair models one pair [a, b] or a list of pairs "
        "(at most BERTSERVE_MAX_CLIENT_BATCH inputs)",
        examples=["The central bank raised interest rates again."],
    )
    model: StrictStr | None = Field(None, description="model name; optional when one model is served")
    version: StrictStr | None = Field(None, description="model version; default: the latest served")
    top_k: StrictInt | None = Field(None, ge=1, description="return only the k most likely labels; null: all")
    truncate: StrictBool = Field(
        True, description="cut texts longer than the model's max_length; false: such a text is a 422"
    )
    raw_scores: StrictBool = Field(False, description="return logits instead of calibrated probabilities")
    timeout_s: StrictFloat | StrictInt | None = Field(
        None, gt=0, description="this request's deadline in seconds (capped by BERTSERVE_MAX_REQUEST_TIMEOUT_S)"
    )


class LabelScore(BaseModel):
    label: str
    score: float


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[list[LabelScore]] = Field(description="per input, labels by descending score")
    labels: list[list[str]] = Field(
        description="per input, the predicted labels: [argmax] (single-label) or every label over its "
        "threshold, possibly none (multi-label)"
    )


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in words")
    type: str = Field(description="machine-readable error kind")
    request_id: str = Field(description="the request's id (also the x-request-id header), for the logs")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: StrictStr | None = Field(None, description="bundle directory; default: the configured one")
    variant: StrictStr | None = Field(None, description="variant to serve; default: the configured one")
