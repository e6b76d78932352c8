"""Property-based fuzzing of the OpenAPI schema (schemathesis) against a real server: no 5xx.

Every documented operation gets positive and negative examples (schemathesis's
``not_a_server_error`` check), bounded so the run stays short. Requests carry a valid key and
the key owner's client id, so they reach the handlers and the model instead of stopping at
authentication. (schemathesis's pytest plugin does not run under pytest 9 here, so the
operations are parametrized from the app's own schema and driven with hypothesis directly.)
"""

from __future__ import annotations

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from pfi_rag.api import create_app
from pfi_rag.config import Config, ServingConfig

# Per operation and mode (~14 operations, 24 cases). The suite draws the same examples every run
# (derandomized), so CI fails only on a regression. `make fuzz` (FUZZ_EXAMPLES=300 FUZZ_RANDOM=1)
# draws new ones; it found the near-zero temperature/top_p failures (now decoded greedily), a
# malformed multipart body and documents with no token (both now handled).
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 12))
RANDOM = os.environ.get("FUZZ_RANDOM") == "1"

SPEC = create_app(Config()).openapi()  # builds the routes only; loads no model
# Negative examples need something to break: operations without parameters or body get none.
CASES = [
    (method.upper(), path, mode)
    for path, item in SPEC["paths"].items()
    for method, spec in item.items()
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode == GenerationMode.POSITIVE or spec.get("parameters") or spec.get("requestBody")
]


@pytest.fixture(scope="module")
def live(tmp_path_factory, live_service):
    serving = ServingConfig(max_new_tokens=4, max_prompt_tokens=256, requests_per_minute=1_000_000)
    with live_service(tmp_path_factory.mktemp("fuzz"), admin=True, serving=serving) as running:
        schema = schemathesis.openapi.from_url(f"{running.url}/openapi.json")
        yield schema, running.keys


@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_no_input_makes_the_server_fail(live, method, path, mode):
    schema, keys = live
    operation = schema[path][method]
    admin_route = path.startswith("/v1/keys")
    key = keys["admin"] if admin_route else keys["alice"]
    owned = {"client_id": "alice"} if "{client_id}" in path and not admin_route else None
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=owned)

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        derandomize=not RANDOM,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def no_server_error(case):
        if (
            path == "/v1/generate"
            and isinstance(case.body, dict)
            and isinstance(case.body.get("client_id"), str)
        ):
            case.body["client_id"] = "alice"  # the owner's id, so the request reaches the model
        case.call_and_validate(
            headers={"Authorization": f"Bearer {key}"}, checks=[not_a_server_error], timeout=120
        )

    no_server_error()
