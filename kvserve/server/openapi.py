"""The published OpenAPI document (/openapi.json, /docs) for routes that read their own bodies.

The Anthropic and Bedrock routes parse and validate their bodies themselves, so that every error
takes their API's shape; FastAPI therefore knows nothing of those bodies. `request_body(Model)`
documents one anyway: the route's `openapi_extra` carries a reference to the model's schema, and
`install(app)` adds the schemas (and the models they nest) to the document's components. Users
read these at /docs, and the fuzz tests (tests/server/test_fuzz.py) generate bodies from them.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"
_documented: dict[str, type[BaseModel]] = {}   # model name → model; filled at import, read-only after


def request_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route whose JSON body is `model` (validated by the route itself)."""
    _documented[model.__name__] = model
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}}


def request_body_one_of(*models: type[BaseModel]) -> dict:
    """`openapi_extra` for a route whose JSON body is any one of `models` (told apart by the route)."""
    for model in models:
        _documented[model.__name__] = model
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "oneOf": [{"$ref": REF.format(model=model.__name__)} for model in models]}}}}}


def install(app: FastAPI) -> None:
    """Make app.openapi() include the documented models' schemas (built once, on first call)."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                   description=app.description)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _documented.items():
                schema = model.model_json_schema(ref_template=REF)
                schemas.update(schema.pop("$defs", {}))
                schemas[name] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi
