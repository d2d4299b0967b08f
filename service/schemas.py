"""Request and response models of the native API (the v2 protocol's are in service/v2.py).

Strict types: a number where a string is expected is a client error, never silently coerced.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    inputs: StrictStr | list[StrictStr] = Field(
        description="one text, or a list of texts (at most BERTSERVE_MAX_CLIENT_BATCH)",
        examples=["The central bank raised interest rates again."],
    )
    top_k: StrictInt | None = Field(None, ge=1, description="return only the k most likely labels; null: all")
    truncate: StrictBool = Field(
        True, description="cut texts longer than the model's max_length; false: such a text is a 422"
    )
    timeout_s: StrictFloat | None = Field(
        None, gt=0, description="this request's deadline in seconds (capped by BERTSERVE_MAX_REQUEST_TIMEOUT_S)"
    )


class LabelScore(BaseModel):
    label: str
    score: float


class PredictResponse(BaseModel):
    model: str
    version: str
    predictions: list[list[LabelScore]] = Field(description="per input, labels by descending score")


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, in words")
    type: str = Field(description="machine-readable error kind")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: StrictStr | None = Field(None, description="bundle directory; default: the configured one")
    variant: StrictStr | None = Field(None, description="variant to serve; default: the configured one")
