"""The baseline a user might write instead of Ray Serve: one FastAPI process under uvicorn, no Ray.

It does the same work per ``/recommend`` as the Serve app (user history lookup, scoring with the same
:class:`~serving.scorer.PolicyScorer` code, exploration with propensities, impression kept for feedback and
written to an impression log like the Serve app's),
in one process, one request per forward pass (``@serve.batch`` needs a Serve replica). Used by
``bench/serve_latency.py`` (``BENCH_MODEL``, ``BENCH_DATASET``).
"""

import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from rec_rllib.data.feedback import IMPRESSION_SCHEMA, IMPRESSIONS
from serving.catalog import ServingCatalog
from serving.feedback import FeedbackLog
from serving.schemas import RecommendRequest
from serving.scorer import PolicyScorer


class LocalRecommender:
    """PolicyScorer + catalogue + an in-memory impression store, in one process."""

    def __init__(self, model: str, dataset: str):
        self.scorer = PolicyScorer(model, dataset)
        self.catalog = ServingCatalog.from_dataset(dataset)
        self.impressions: dict[str, dict[str, Any]] = {}
        log_dir = Path(os.environ.get("BENCH_FEEDBACK_DIR") or tempfile.mkdtemp(prefix="plain-fastapi-"))
        self.impression_log = FeedbackLog(
            log_dir / IMPRESSIONS, max_rows=1024, schema=IMPRESSION_SCHEMA, journal=False
        )

    async def recommend(self, body: dict[str, Any]) -> dict[str, Any]:
        req = RecommendRequest(**body)
        history = list(self.catalog.user_histories.get(req.user, [])) if req.user else []
        result = self.scorer.score_requests(
            [
                {
                    "history": history,
                    "k": req.k,
                    "exclude_seen": req.exclude_seen,
                    "strategy": req.exploration,
                    "epsilon": req.epsilon,
                    "temperature": req.temperature,
                    "explain": req.explain,
                }
            ]
        )[0]
        request_id = uuid.uuid4().hex
        shown = [self.catalog.item_ids[i] for i in result["items"]]
        self.impressions[request_id] = {
            "shown": shown,
            "propensities": result["propensities"],
            "t": time.time(),
        }
        self.impression_log.append(
            {
                "request_id": request_id,
                "timestamp_ms": int(time.time() * 1000),
                "user_id": req.user,
                "history": [self.catalog.item_ids[i] for i in history[-200:]],
                "shown": shown,
                "shown_propensities": result["propensities"],
                "model_version": result["model_version"],
                "strategy": result["strategy"],
            }
        )
        if self.impression_log.due():
            self.impression_log.flush()
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
