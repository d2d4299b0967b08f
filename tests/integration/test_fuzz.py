"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis 4), against a live server.

Every operation in ``/openapi.json`` gets generated requests, both schema-valid (positive) and schema-violating
(negative); operations with a ``{name}`` path parameter are fuzzed once with generated names and once with the
served model's name, so the inference code runs, not only the 404 path. Each response must pass:

- ``not_a_server_error``: no 5xx, ever;
- ``status_code_conformance``, ``content_type_conformance``, ``response_headers_conformance``,
  ``response_schema_conformance``: the response is one the schema documents, in the documented shape;
- ``negative_data_rejection``: a request that violates the schema is refused with a 4xx.

``positive_data_acceptance`` is not used: the schema cannot express every rule the server enforces (a text may not
be empty or only whitespace, at most MAX_CLIENT_BATCH inputs, no NUL, no text over max_length with
truncate=false), so schema-valid requests are legitimately refused with 422/413; test_bad_input checks those.

The server has an API key so that the admin endpoint is exercised (every generated request carries the key; the
401 paths are test_security's). Generation is derandomized (same cases every run, so CI is stable); set
BERTSERVE_FUZZ_EXAMPLES to fuzz harder locally, e.g. 500.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections import Counter
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("BERTSERVE_FUZZ_EXAMPLES", "25"))
CHECK_NAMES = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)


def _resolve(doc: Any, ref: str) -> bool:
    if not ref.startswith("#/"):
        return False
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _refs(node: Any, where: str = "#") -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                found.append((where, value))
            else:
                found += _refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _refs(value, f"{where}/{i}")
    return found


def test_openapi_schema_references_resolve(shared_server: Any) -> None:
    """Every $ref in /openapi.json must resolve against the document, or schema-driven clients (code generators,
    schemathesis) cannot build the request body: a dangling ref silently drops the body from the fuzzing."""
    doc = shared_server.client.get("/openapi.json").json()
    dangling = [f"{where}: {ref}" for where, ref in _refs(doc) if not _resolve(doc, ref)]
    assert not dangling, "unresolvable $ref in /openapi.json:\n" + "\n".join(dangling[:20])
    schema = schemathesis.openapi.from_dict(doc)
    for result in schema.get_all_operations():
        op = result.ok()
        declared = doc["paths"][op.path][op.method.lower()].get("requestBody")
        if declared:
            assert len(op.body) > 0, f"{op.label}: declared request body unusable by schemathesis"


def own_deadline(body: Any) -> float | None:
    """The timeout_s a request set for itself (native body or v2 parameters), if any."""
    if not isinstance(body, dict):
        return None
    value = body.get(
        "timeout_s",
        (body.get("parameters") or {}).get("timeout_s") if isinstance(body.get("parameters"), dict) else None,
    )
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def hoist_nested_defs(doc: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` where pydantic ``$defs`` embedded in request bodies move to components/schemas (the fix
    the schema itself needs, see the test above), so the fuzzing below still reaches those bodies."""
    doc = copy.deepcopy(doc)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for item in doc["paths"].values():
        for operation in item.values():
            for media in (operation.get("requestBody") or {}).get("content", {}).values():
                components.update(media.get("schema", {}).pop("$defs", {}))
    return json.loads(json.dumps(doc).replace('"#/$defs/', '"#/components/schemas/'))


def test_fuzz_whole_api_from_openapi_schema(start_server: Any) -> None:
    import requests
    import schemathesis.checks
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    server = start_server(api_key=KEY, warmup_runs=0)
    session = requests.Session()
    headers = {"Authorization": f"Bearer {KEY}"}
    statuses: Counter[tuple[str, int]] = Counter()
    failures: dict[tuple[str, str], str] = {}

    def fuzz_test(strategy: Any, label: str, mode: str) -> Any:
        @given(case=strategy)
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            response = case.call(base_url=server.url, session=session, headers=headers, timeout=30)
            status = response.status_code
            if status == 504 and own_deadline(case.body) is not None and own_deadline(case.body) < 1.0:
                status = -504  # the client's own deadline was shorter than a batch: 504 is the documented answer
            statuses[(label, status)] += 1
            try:
                case.validate_response(response, checks=checks, headers=headers)
            except BaseException as exc:  # a FailureGroup holding every check that failed
                for failure in getattr(exc, "exceptions", [exc]):
                    if status == -504 and getattr(failure, "title", "") == "Server error":
                        continue
                    key = (label, getattr(failure, "title", type(failure).__name__))
                    failures.setdefault(key, f"[{mode}] {failure}\n    {case.as_curl_command(headers=headers)}")

        return fuzz

    model = server.client.get("/v1/models").json()
    doc = hoist_nested_defs(server.client.get("/openapi.json").json())
    schema = schemathesis.openapi.from_dict(doc)
    checks = [getattr(schemathesis.checks, name) for name in CHECK_NAMES]
    started = time.monotonic()
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]

    for op in operations:
        params = {p.name for p in op.path_parameters}
        variants: list[dict[str, str] | None] = [None]
        if params:  # also the real model, so inference itself is fuzzed, not only "unknown model"
            variants.append(
                {k: v for k, v in {"name": model["name"], "version": model["version"]}.items() if k in params}
            )
        for fixed in variants:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz = fuzz_test(op.as_strategy(generation_mode=mode, path_parameters=fixed), op.label, mode.value)
                try:
                    fuzz()
                except Unsatisfiable:  # nothing to negate (no parameters, no body): positive cases only
                    assert mode == GenerationMode.NEGATIVE, f"{op.label}: no positive case could be generated"

    seconds = time.monotonic() - started
    total = sum(statuses.values())
    server_errors = {k: v for k, v in statuses.items() if k[1] >= 500}
    by_status = Counter(status for (_, status), n in statuses.items() for _ in range(n))
    print(
        f"\nfuzz: {len(operations)} operations, {total} requests in {seconds:.1f} s, statuses "
        f"{dict(sorted(by_status.items()))} (-504: 504 for a request's own timeout_s < 1 s), "
        f"5xx: {sum(server_errors.values())}"
    )
    assert server.proc.poll() is None, "the server died under fuzzing"
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert not server_errors, f"5xx under fuzzing: {server_errors}"
    assert total >= len(operations) * 2
    # coverage: predictions were served, and v2 bodies got past routing into the tensor checks
    assert statuses[("POST /v1/predict", 200)] > 0, "no fuzzed predict request was served"
    assert statuses[("POST /v2/models/{name}/infer", 400)] + statuses[("POST /v2/models/{name}/infer", 422)] > 0
    report = "\n\n".join(f"{label}: {title}\n{detail}" for (label, title), detail in sorted(failures.items()))
    assert not failures, f"{len(failures)} distinct schema/check failures:\n\n{report}"
