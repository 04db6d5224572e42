"""GET /v1/models (issue 29): OpenAI's model list, which clients read to find the name the server
requires in a request's "model" field (it was a 404)."""
from __future__ import annotations

from serve_stub import StubPair
from starlette.testclient import TestClient

from surgery.serve.app import create_app
from surgery.serve.batcher import BatchOptions


def test_models_lists_the_served_model_under_the_name_requests_carry():
    stub = StubPair()
    with TestClient(create_app(stub, BatchOptions(max_wait_s=0))) as client:
        response = client.get("/v1/models")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and len(body["data"]) == 1
        entry = body["data"][0]
        assert entry["id"] == stub.name and entry["object"] == "model" and isinstance(entry["created"], int)
        assert entry["owned_by"] == "clipsurgery"
        assert client.post("/v1/models").status_code == 405
