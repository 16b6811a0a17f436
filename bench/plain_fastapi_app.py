"""The baseline a user might write instead of Ray Serve: one FastAPI process under uvicorn, no Ray.

It does the same work per ``/recommend`` as the Serve app (user history lookup, scoring with the same
:class:`~serving.scorer.PolicyScorer` code, exploration with propensities, impression kept for feedback),
in one process, one request per forward pass (``@serve.batch`` needs a Serve replica). Used by ``bench/serve_latency.py`` (``BENCH_MODEL``, ``BENCH_DATASET``).
"""

import os
import time
import uuid
from typing import Any

from fastapi import FastAPI

from serving.catalog import ServingCatalog
from serving.schemas import RecommendRequest
from serving.scorer import PolicyScorer


class LocalRecommender:
    """PolicyScorer + catalogue + an in-memory impression store, in one process."""

    def __init__(self, model: str, dataset: str):
        self.scorer = PolicyScorer(model, dataset)
        self.catalog = ServingCatalog.from_dataset(dataset)
        self.impressions: dict[str, dict[str, Any]] = {}

    async def recommend(self, body: dict[str, Any]) -> dict[str, Any]:
        req = RecommendRequest(**body)
        history = list(self.catalog.user_histories.get(req.user, [])) if req.user else []
        result = self.scorer.score_requests([{
            "history": history, "k": req.k, "exclude_seen": req.exclude_seen, "strategy": req.exploration,
            "epsilon": req.epsilon, "temperature": req.temperature, "explain": req.explain,
        }])[0]  # fmt: skip
        request_id = uuid.uuid4().hex
        shown = [self.catalog.item_ids[i] for i in result["items"]]
        self.impressions[request_id] = {
            "shown": shown,
            "propensities": result["propensities"],
            "t": time.time(),
        }
        return {
            "request_id": request_id,
            "model_version": result["model_version"],
            "items": [
                {"item_id": iid, "text": self.catalog.texts[i], "score": s, "propensity": p}
                for iid, i, s, p in zip(
                    shown, result["items"], result["scores"], result["propensities"], strict=True
                )
            ],
        }


app = FastAPI()
_rec: LocalRecommender | None = None


@app.on_event("startup")
async def _load() -> None:
    global _rec
    _rec = LocalRecommender(os.environ["BENCH_MODEL"], os.environ["BENCH_DATASET"])


@app.post("/recommend")
async def recommend(body: dict[str, Any]) -> dict[str, Any]:
    return await _rec.recommend(body)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
