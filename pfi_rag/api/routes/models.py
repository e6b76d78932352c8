"""OpenAI's model listing: ``GET /v1/models`` (tools list the models before they chat).

One model: the generator this server runs. Which adapter answers is decided by the API key,
not by the ``model`` field of a chat request (any value is accepted there).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from pfi_rag.api.deps import KeyClient, ServicesDep
from pfi_rag.api.errors import ApiError
from pfi_rag.api.routes.chat import OPENAI_ERRORS
from pfi_rag.api.schemas import ModelList, ModelPublic

router = APIRouter(prefix="/v1/models", tags=["chat"], responses={**OPENAI_ERRORS, 404: OPENAI_ERRORS[400]})


def _model(services) -> ModelPublic:
    return ModelPublic(id=services.cfg.models.generator, created=services.started_at, owned_by="pfi-rag")


@router.get("")
def list_models(client_id: KeyClient, services: ServicesDep) -> ModelList:
    """The model this server answers with (OpenAI's model list)."""
    return ModelList(data=[_model(services)])


@router.get("/{model_id}")
def get_model(
    model_id: Annotated[str, Path(min_length=1, max_length=256)], client_id: KeyClient, services: ServicesDep
) -> ModelPublic:
    """One model by id (OpenAI's model retrieval)."""
    model = _model(services)
    if model_id != model.id:
        raise ApiError(404, "model_not_found", f"model: {model_id!r} does not exist", param="model")
    return model
