"""GET /openapi.json describes the whole served surface, and describes it validly."""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from api import schemas

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
TOP_LEVEL = {"/healthz", "/readyz", "/openapi.json", "/invocations", "/ping", "/health", "/version", "/v2"}
#: The error body each family of routes answers with: MLflow's scoring routes, the Open Inference Protocol, the rest.
ERROR_SCHEMAS = {"mlflow": "MlflowError", "oip": "OipError", "predq": "Error"}


def family(path: str) -> str:
    if path in {"/invocations", "/ping", "/health", "/version"}:
        return "mlflow"
    return "oip" if path == "/v2" or path.startswith("/v2/") else "predq"


@pytest.fixture(scope="module")
def document(app) -> dict:
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200, response.data[:500]
    assert response.mimetype == "application/json"
    return response.json


def served_operations(app) -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every Flask route under /v1 and /v2, plus the health, spec and MLflow routes."""
    out = set()
    for rule in app.url_map.iter_rules():
        if not (rule.rule.startswith(("/v1/", "/v2/")) or rule.rule == "/v1" or rule.rule in TOP_LEVEL):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            out.add((path, method.lower()))
    return out


def documented_operations(document: dict) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item if method in HTTP_METHODS}


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_document_is_openapi_3_1(document):
    """The document declares OpenAPI 3.1 and has a title, a version and paths."""
    assert re.fullmatch(r"3\.1\.\d+", document["openapi"])
    assert document["info"]["title"] and document["info"]["version"]
    assert document["paths"]


def test_every_served_route_is_documented(app, document):
    """Every route under /v1, and /healthz, /readyz and /openapi.json, is in the document with its methods."""
    served = served_operations(app)
    assert {("/healthz", "get"), ("/readyz", "get"), ("/openapi.json", "get"), ("/v1/jobs", "post"),
            ("/invocations", "post"), ("/v2/models/{name}/infer", "post")} <= served
    missing = sorted(served - documented_operations(document))
    assert missing == [], f"served but not documented: {missing}"


def test_every_documented_operation_is_served(app, document):
    """Every operation the document lists is one the app serves: no route is described that does not exist."""
    documented = {(p, m) for p, m in documented_operations(document)
                  if p.startswith(("/v1", "/v2/")) or p in TOP_LEVEL}
    extra = sorted(documented - served_operations(app))
    assert extra == [], f"documented but not served: {extra}"


def test_every_ref_resolves(document):
    """Every $ref in the document points at a schema in components.schemas."""
    components = document.get("components", {}).get("schemas", {})
    found = set(refs(document))
    assert found, "the document has no $ref at all"
    for ref in found:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in components, f"unresolved {ref}"


def test_path_parameters_are_declared(document):
    """Each {name} in a path is declared as a required path parameter of every operation on it."""
    for path, item in document["paths"].items():
        names = set(re.findall(r"{([^}]+)}", path))
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            params = op.get("parameters", []) + item.get("parameters", [])
            declared = {p["name"] for p in params if p.get("in") == "path"}
            assert declared == names, (path, method, declared)
            assert all(p.get("required") is True for p in params if p.get("in") == "path"), (path, method)


def test_error_responses_use_the_error_schema(document):
    """Every documented 4xx/5xx response is its protocol's JSON error body: predq's, MLflow's or the OIP's."""
    assert all("414" in op["responses"] for item in document["paths"].values() for op in item.values())
    components = document["components"]["schemas"]
    assert components["Error"]["properties"]["error"]
    assert set(components["MlflowError"]["properties"]) == {"error_code", "message"}
    assert components["OipError"]["properties"]["error"]["type"] == "string"
    for path, item in document["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            for status, response in op["responses"].items():
                if status[0] in "45":
                    schema = response["content"]["application/json"]["schema"]
                    # gunicorn answers 414 before any route, with predq's body
                    expected = "Error" if status == "414" else ERROR_SCHEMAS[family(path)]
                    assert schema == {"$ref": f"#/components/schemas/{expected}"}, (path, method, status)


def test_job_request_schema_matches_the_validator(document):
    """The documented JobRequest has exactly the fields POST /v1/jobs validates with."""
    job_request = document["components"]["schemas"]["JobRequest"]
    assert set(job_request["properties"]) == set(schemas.JobRequest.model_fields)
    assert set(job_request.get("required", [])) == {n for n, f in schemas.JobRequest.model_fields.items()
                                                     if f.is_required()}
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/JobRequest"}
    form = body["multipart/form-data"]["schema"]
    assert "file" in form["properties"] and "file" in form.get("required", [])
    options = set(schemas.JobRequest.model_fields) - {"rows", "source"}
    assert options <= set(form["properties"]), options - set(form["properties"])


def test_document_passes_openapi_spec_validator(document):
    """openapi-spec-validator finds the document valid OpenAPI 3.1."""
    import openapi_spec_validator
    from openapi_spec_validator.versions import OPENAPIV31, get_spec_version

    assert get_spec_version(document) == OPENAPIV31
    openapi_spec_validator.validate(document)
