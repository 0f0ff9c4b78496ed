"""``/v1/schemas``: the extraction schemas this service can enqueue to."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Security

from medq.api.auth import client_of
from medq.api.deps import ApiState, api_state
from medq.api.errors import APIError
from medq.api.models import ERRORS, OWNED, SchemaDetail, SchemaSummary
from medq.core.errors import UnknownSchema

router = APIRouter(tags=["schemas"])


@router.get("/v1/schemas", response_model=list[SchemaSummary], responses={401: ERRORS[401]})
def list_schemas(client: str = Security(client_of), state: ApiState = Depends(api_state)) -> list[dict[str, Any]]:
    """The extraction schemas loaded from configs/schemas and MEDQ_SCHEMAS_DIRS."""
    return [{"name": s.name, "version": s.version, "description": s.description, "fields": list(s.field_names)}
            for s in state.producer.schema_loader.all()]


@router.get("/v1/schemas/{name}", response_model=SchemaDetail, responses={401: ERRORS[401], 404: OWNED[404]})
def get_schema(name: str, client: str = Security(client_of), state: ApiState = Depends(api_state)) -> dict[str, Any]:
    """A schema as the JSON Schema the model is asked to follow."""
    try:
        s = state.producer.schema_loader.get(name)
    except UnknownSchema as exc:
        raise APIError(404, exc.message) from None
    return {"name": s.name, "version": s.version, "description": s.description,
            "instructions": s.instructions, "json_schema": s.json_schema}
