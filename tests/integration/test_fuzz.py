"""Fuzzing every operation of the live service's own OpenAPI document with schemathesis.

gunicorn serves the app (one web process, several threads) on a Redis-compatible server of the test session,
with the session's Celery worker consuming. For every operation in `GET /openapi.json`, schemathesis generates
requests from the document, valid ones and invalid ones, a bounded number of each, and every answer must pass:

* not_a_server_error: no 5xx;
* status_code_conformance: the status is one the document lists for the operation;
* content_type_conformance and response_schema_conformance: the body is what the document says it is.

The run is parametrized by how the service authenticates: `open` (no API keys, as the tests' loopback server
serves) and `keys` (an `API_KEYS_FILE` with one admin key, sent as `Authorization: Bearer`), which runs once the
web process has API keys (api/auth.py). A failure names each operation, the request and the broken check.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis import checks as st_checks  # noqa: E402

from api.errors import protocol  # noqa: E402
from tests.support.processes import ApiServer  # noqa: E402

#: Examples per operation and generation mode: 16 operations x 2 modes x 100 take about a minute.
EXAMPLES = 100
#: Fewer for the MLflow and Open Inference Protocol routes (13 operations): their forms share a few parsers, which
#: the unit tests cover shape by shape; 100 each would double the run.
COMPAT_EXAMPLES = 10
CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
          st_checks.response_schema_conformance]
KEY = "pq_fuzz_" + "0" * 40
@pytest.fixture(scope="module", params=["open", "keys"])
def service(request, redis_server, models_dir, worker, tmp_path_factory) -> Iterator[tuple[str, dict]]:
    """(base URL, headers every request carries) of a gunicorn serving the app, with or without API keys."""
    env = {}
    headers = {}
    if request.param == "keys":
        keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
        keys_file.write_text(json.dumps({"keys": [{"name": "fuzz", "sha256": hashlib.sha256(KEY.encode()).hexdigest(),
                                                   "scopes": ["admin"]}]}))
        env["API_KEYS_FILE"] = str(keys_file)
        headers["Authorization"] = f"Bearer {KEY}"
    proc = ApiServer(redis_server.url, models_dir=models_dir, env=env, workers=1, threads=4,
                     log_dir=str(tmp_path_factory.mktemp(f"api-fuzz-{request.param}")))
    proc.start()
    try:
        yield proc.url, headers
    finally:
        proc.stop()


def describe(case, response, error: BaseException) -> str:
    """One line per failing request: the operation, the status, what broke, and the request to reproduce it."""
    status = getattr(response, "status_code", "-")
    body = (getattr(response, "text", "") or "")[:200].replace("\n", " ")
    checks = [e for e in getattr(error, "exceptions", [error])]
    broken = "; ".join(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                       for e in checks)
    return f"{case.operation.label} -> {status}: {broken}\n    {case.as_curl_command()[:300]}\n    body: {body}"


def fuzz_operation(operation, base_url: str, headers: dict, mode: GenerationMode, session: requests.Session,
                   failures: list[str], statuses: Counter) -> int:
    """Run EXAMPLES (COMPAT_EXAMPLES) generated requests of one mode against one operation; returns how many ran."""
    ran = [0]
    examples = EXAMPLES if protocol(operation.path) == "predq" else COMPAT_EXAMPLES

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        ran[0] += 1
        response = None
        try:
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)
        except (Exception, BaseExceptionGroup) as error:  # every broken check is kept; hypothesis does not shrink
            failures.append(describe(case, response, error))

    try:
        run()
    except Unsatisfiable:  # an operation with nothing to send (GET /healthz) has no invalid request
        assert mode == GenerationMode.NEGATIVE and not ran[0]
    return ran[0]


def test_fuzz_every_operation(service):
    """Generated requests, valid and invalid, to every operation: no 5xx, and every answer is as documented."""
    base_url, headers = service
    answered = requests.get(f"{base_url}/v1/models", headers=headers, timeout=30)
    assert answered.status_code == 200, answered.text[:300]
    if headers:  # the run with keys really needs them
        assert requests.get(f"{base_url}/v1/models", timeout=30).status_code == 401
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=dict(headers), timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    failures: list[str] = []
    counts: dict[str, int] = {}
    statuses: Counter = Counter()
    started = time.monotonic()
    with requests.Session() as session:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                counts[f"{operation.label} {mode.value}"] = fuzz_operation(operation, base_url, headers, mode,
                                                                           session, failures, statuses)
    print(f"\nschemathesis: {len(operations)} operations, {sum(counts.values())} requests, "
          f"{len(failures)} failures, {time.monotonic() - started:.0f} s; statuses {sorted(statuses.items())}")
    assert not failures, f"{len(failures)} failing requests:\n" + "\n".join(dict.fromkeys(failures))
