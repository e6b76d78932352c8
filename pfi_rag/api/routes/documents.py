"""A client's documents and search over them: ``/v1/clients/{client_id}/documents``, ``/search``."""

from __future__ import annotations

import tempfile
from pathlib import Path, PurePath

from fastapi import APIRouter, Request
from pydantic import ValidationError
from python_multipart.exceptions import FormParserError
from starlette.concurrency import run_in_threadpool

from pfi_rag.api.deps import OwnedClient, ServicesDep
from pfi_rag.api.errors import ERROR_RESPONSES, ApiError, not_found
from pfi_rag.api.schemas import (
    Deleted,
    DocumentList,
    DocumentPublic,
    DocumentsCreate,
    DocumentSummary,
    HitPublic,
    IngestPublic,
    SearchCreate,
    SearchPublic,
)
from pfi_rag.data.records import Document
from pfi_rag.retriever import RetrieverError
from pfi_rag.retriever.sources import SUFFIXES, read_file, text_document

router = APIRouter(prefix="/v1/clients/{client_id}", tags=["documents"], responses=ERROR_RESPONSES)

UPLOAD_SCHEMA = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "format": "binary", "description": ".txt, .md (one document) or .jsonl"},
        "doc_id": {"type": "string", "description": "Id of a .txt/.md document (default: the file name)"},
    },
    "required": ["file"],
}
ADD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/DocumentsCreate"}},
            "multipart/form-data": {"schema": UPLOAD_SCHEMA},
        },
    }
}


def public_source(source: str) -> str:
    """Where a document came from, without the server's paths: api, upload:<name> or file:<name>."""
    if source == "api" or source.startswith("upload:"):
        return source
    return "file:" + PurePath(source).name


async def _json_documents(request: Request) -> tuple[list[Document], str]:
    try:
        body = DocumentsCreate.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "validation_error", f"{where}: {first['msg']}") from None
    return [text_document(d.text, d.id, dict(d.metadata)) for d in body.documents], "api"


async def _uploaded_documents(request: Request, max_bytes: int) -> tuple[list[Document], str]:
    try:
        form = await request.form()
    except FormParserError as exc:  # starlette turns its own parse errors into a 400, not these
        raise ApiError(400, "invalid_request", f"body: malformed multipart/form-data ({exc})") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ApiError(
            422, "validation_error", "file: send the document as a multipart file field named 'file'"
        )
    name = Path(upload.filename or "").name
    if Path(name).suffix.lower() not in SUFFIXES:
        raise ApiError(400, "invalid_request", f"file {name!r}: give a .txt, .md or .jsonl file")
    doc_id = form.get("doc_id")
    doc_id = doc_id if isinstance(doc_id, str) and doc_id else name
    data = await upload.read()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("upload" + Path(name).suffix.lower())
        path.write_bytes(data)
        try:
            docs = read_file(path, doc_id, max_bytes)
        except RetrieverError as exc:  # name the upload, not our temporary file
            raise RetrieverError(str(exc).replace(str(path), name)) from None
    return docs, f"upload:{name}"


@router.post("/documents", status_code=201, openapi_extra=ADD_BODY)
async def add_documents(client_id: OwnedClient, services: ServicesDep, request: Request) -> IngestPublic:
    """Add documents (JSON, or one .txt/.md/.jsonl file); a changed document supersedes its old version."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        docs, source = await _json_documents(request)
    elif content_type == "multipart/form-data":
        docs, source = await _uploaded_documents(request, services.cfg.retrieval.max_file_bytes)
    else:
        raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")

    report = await run_in_threadpool(services.stores.add_documents, client_id, docs, source)
    return IngestPublic(**report.as_dict(), doc_ids=report.doc_ids)


@router.get("/documents")
def list_documents(client_id: OwnedClient, services: ServicesDep) -> DocumentList:
    """The current version of every document of the client."""
    if not services.stores.has_index(client_id):
        return DocumentList(documents=[])
    with services.stores.use(client_id) as store:
        docs = store.list_documents()
    return DocumentList(
        documents=[
            DocumentSummary(
                doc_id=d.doc_id,
                version=d.version,
                source=public_source(d.source),
                added_at=d.added_at,
                chars=len(d.text),
                metadata=d.metadata,
            )
            for d in docs
        ]
    )


@router.get("/documents/{doc_id:path}")
def get_document(client_id: OwnedClient, doc_id: str, services: ServicesDep) -> DocumentPublic:
    """One document's current version, with its chunks."""
    if not services.stores.has_index(client_id):
        raise not_found("document")
    with services.stores.use(client_id) as store:
        doc = store.get_document(doc_id)
    if doc is None:
        raise not_found("document")
    return DocumentPublic(
        doc_id=doc.doc_id,
        version=doc.version,
        text=doc.text,
        metadata=doc.metadata,
        source=public_source(doc.source),
        added_at=doc.added_at,
        chunks=doc.chunks,
    )


@router.delete("/documents/{doc_id:path}")
def delete_document(client_id: OwnedClient, doc_id: str, services: ServicesDep) -> Deleted:
    """Remove every version of a document from the client's index and document store."""
    if not services.stores.has_index(client_id):
        raise not_found("document")
    if not services.stores.delete(client_id, doc_id):
        raise not_found("document")
    return Deleted(doc_id=doc_id, deleted=True)


@router.post("/search")
def search(client_id: OwnedClient, body: SearchCreate, services: ServicesDep) -> SearchPublic:
    """The client's passages closest to the query (cosine), best first."""
    if not services.stores.has_index(client_id):
        return SearchPublic(hits=[])
    hits = services.stores.search(client_id, body.query, body.k, body.where)
    return SearchPublic(
        hits=[
            HitPublic(
                doc_id=h.doc_id,
                chunk=h.chunk_id,
                score=h.score,
                text=h.text,
                version=h.version,
                metadata=h.metadata,
            )
            for h in hits
        ]
    )
