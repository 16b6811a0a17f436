"""The Serve application: the ingress deployment (requests to answers, feedback to the logs) in front of the
model deployment, or scoring in the same replica.

    serve run serving/config.yaml                  # the Serve config (replicas, GPUs, autoscaling, batching)
    python -m jobs.serve --model runs/qs/finetune  # embedded local Ray, same app

Endpoints: ``POST /recommend``, ``POST /query``, ``POST /feedback``, ``POST /items``, ``GET /healthz``
(bodies: :mod:`serving.schemas`). Bad input gets a 4xx whose message says what to send instead
(:mod:`serving.http`). The ingress reads the live state every replica shares through :mod:`serving.live`
and logs answers and feedback through :mod:`serving.answers`; scoring is :mod:`serving.scorer`'s.

No ``from __future__ import annotations`` here: FastAPI must see the request models as real classes in
the ingress methods' signatures (string annotations make it read them as query parameters).
"""

import asyncio
import inspect
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.answers import AnswerLog, answer_row
from serving.catalog import ServingCatalog
from serving.http import ApiError, api, json_response
from serving.live import LiveView
from serving.schemas import (
    FeedbackRequest,
    NewItemRequest,
    QueryRequest,
    RecommendRequest,
    RecommendResponse,
)
from serving.scorer import DEFAULT_BATCH, PolicyScorer, ScorerInputError
from serving.settings import RETRIEVAL_ARGS, STATE_ACTOR, AppArgs
from serving.state import live_state, shutdown_state

log = logging.getLogger("ray.serve")


def _scoring_fields(req: RecommendRequest | QueryRequest, history: list[int], version: int) -> dict[str, Any]:
    """What the scorer needs of a /recommend or /query request."""
    return {
        "history": history,
        "k": req.k,
        "exclude_seen": req.exclude_seen,
        "strategy": req.exploration,
        "epsilon": req.epsilon,
        "temperature": req.temperature,
        "ucb_alpha": req.ucb_alpha,
        "exposure": req.exposure,
        "seed": req.seed,
        # a new user's greedy list is explored, unless the request asked for an exploration mode itself
        "explore_cold": "exploration" not in req.model_fields_set,
        "catalog_version": version,
    }


class _InReplica:
    """A :class:`PolicyScorer` living in this replica, called like a deployment handle
    (``scorer.method.remote(...)`` returns an awaitable), so the ingress code is the same either way."""

    def __init__(self, scorer: PolicyScorer):
        self.scorer = scorer

    def __getattr__(self, name: str):
        method = getattr(self.scorer, name)

        async def call(*args, **kwargs):
            out = method(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out

        handle_method = type("_Method", (), {"remote": staticmethod(call)})
        setattr(self, name, handle_method)  # built once per method, not on every request
        return handle_method


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
@serve.ingress(api)
class RecIngress:
    """HTTP in, validation, live state and feedback logging. Scoring is the model deployment's
    (``scorer``: a handle, topology "split") or happens in this replica (``scorer=None`` and ``model``:
    topology "single", one hop less per request; ``user_config`` then tunes this deployment's batching
    and model path)."""

    def __init__(
        self,
        scorer: DeploymentHandle | None,
        dataset: str,
        feedback_dir: str,
        state_name: str = STATE_ACTOR,
        flush_rows: int = 256,
        flush_seconds: float = 5.0,
        model: str | None = None,
    ):
        if scorer is None:
            if model is None:
                raise ValueError("RecIngress needs a scorer handle or a model path to score in-replica")
            self._local = PolicyScorer(model, dataset, state_name)
            scorer = _InReplica(self._local)
        else:
            self._local = None
        self.scorer = scorer
        self.catalog = ServingCatalog.from_dataset(dataset)
        self.state = live_state(state_name)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.live = LiveView(self.state, self.catalog, self.replica)
        self.answers = AnswerLog(feedback_dir, self.state, flush_rows=flush_rows, flush_seconds=flush_seconds)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config`` of the single-deployment topology: batching and model path of the in-replica
        scorer (the split topology sets it on the PolicyScorer deployment instead)."""
        if self._local is None:
            raise ValueError("user_config belongs to the PolicyScorer deployment in the split topology")
        self._local.reconfigure(config)

    def __del__(self) -> None:
        self.live.stop()
        self.answers.close()

    async def _context(self, req: RecommendRequest | QueryRequest) -> tuple[list[int], list[str], int, int]:
        """(history as item indices, its last 200 item ids for the impression log, catalogue version, how many
        of the history's items are live: the session's and the request's own)."""
        session, version = await self.live.session(req.user)
        if req.history is not None:
            ids = list(req.history) + session
            logged: list[int] = []
        elif req.user is not None:
            found = self.catalog.user_histories.get(req.user)
            if found is None and not session:
                raise ApiError(
                    404,
                    f"unknown user {req.user!r}: send a history (item ids, oldest first; [] for a new user) "
                    "with or instead of the user id",
                )
            ids = session
            logged = found.tolist() if found is not None else []
        else:
            raise ApiError(
                422, "send a known `user` id, a `history` of item ids, or both ([] for a new user)"
            )
        known, unknown = self.catalog.indices(ids)
        if unknown:
            raise ApiError(
                422,
                f"unknown item ids in history: {unknown[:10]}; use ids of the catalogue or POST /items first",
            )
        if req.k > self.catalog.n_items:
            raise ApiError(
                422, f"k={req.k} exceeds the catalogue ({self.catalog.n_items} items); send k <= that"
            )
        history = logged + known
        recent = [self.catalog.item_ids[i] for i in logged[-200:]] + ids if logged else ids
        return history, recent[-200:], version, len(known)

    async def _answer(
        self, req, result: dict[str, Any], history_ids: list[str], history_items: int, session_items: int
    ) -> RecommendResponse:
        request_id = uuid.uuid4().hex
        shown = [self.catalog.item_ids[i] for i in result["items"]]
        # buffered, not awaited: the answer does not wait for the shared store; /feedback covers the race
        # where feedback reaches another replica before this impression reaches the store (see
        # _resolve_feedback)
        self.answers.record(
            request_id,
            {
                "user_id": req.user,
                "history": history_ids[-200:],
                "shown": shown,
                "propensities": result["propensities"],
                "model_version": result["model_version"],
                "strategy": result["strategy"],
                "time": time.time(),
            },
        )
        items = []
        widened = result.get("exposure") or [False] * len(shown)
        for j, (idx, iid) in enumerate(zip(result["items"], shown, strict=True)):
            because = None
            if result.get("because") is not None:
                because = [
                    {
                        "item_id": self.catalog.item_ids[h],
                        "text": self.catalog.texts[h],
                        "score_drop": round(d, 4),
                    }
                    for h, d in result["because"][j]
                ]
            items.append(
                {
                    "item_id": iid,
                    "text": self.catalog.texts[idx],
                    "score": result["scores"][j],
                    "propensity": result["propensities"][j],
                    "exposure": widened[j],
                    "bonus": result["bonus"][j] if "bonus" in result else None,
                    "because": because,
                }
            )
        return RecommendResponse(
            request_id=request_id,
            model_version=result["model_version"],
            user=req.user,
            strategy=result["strategy"],
            cold_start=result["cold_start"],
            history_items=history_items,
            session_items=session_items,
            exposure_epoch=result.get("exposure_epoch"),
            seed=result.get("seed"),
            items=items,
            served_by={"ingress": self.replica, "scorer": result["replica"]},
        )

    # -- endpoints -----------------------------------------------------------------------------------------
    # The answers are built as RecommendResponse (validated there) and sent as its JSON: returned as the
    # model, FastAPI would dump, validate and serialise it again on every request.
    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest) -> Response:
        history, ids, version, live = await self._context(req)
        payload = {**_scoring_fields(req, history, version), "explain": req.explain}
        result = await self._call(self.scorer.recommend.remote(payload))
        return json_response(await self._answer(req, result, ids, len(history), live))

    @api.post("/query", response_model=RecommendResponse)
    async def query(self, req: QueryRequest) -> Response:
        if req.user is None and req.history is None:
            req = req.model_copy(update={"history": []})
        history, ids, version, live = await self._context(req)
        payload = {
            **_scoring_fields(req, history, version),
            "text": req.text,
            "query_weight": req.query_weight if history else 1.0,
            "explore_cold": False,
        }
        result = await self._call(self.scorer.query.remote(payload))
        return json_response(await self._answer(req, result, ids, len(history), live))

    async def _resolve_feedback(self, req: FeedbackRequest) -> dict[str, Any]:
        """Match feedback to its impression: this replica's own (no lookup), else the shared store's.
        Impressions reach the store in batches, without waiting, so an unknown request id is retried for
        up to ~0.3 s before it is called unknown."""
        local = self.answers.recent.get(req.request_id)
        for delay in (0.0, 0.02, 0.05, 0.1, 0.15):
            if delay:
                await asyncio.sleep(delay)
            out = await self.state.feedback.remote(req.request_id, req.item_id, req.reward, local)
            if out["status"] != "unknown_request":
                break
        return out

    @api.post("/feedback")
    async def feedback(self, req: FeedbackRequest) -> dict[str, Any]:
        out = await self._resolve_feedback(req)
        if out["status"] == "unknown_request":
            raise ApiError(
                404,
                f"unknown or expired request_id {req.request_id!r}; send one returned by /recommend or "
                "/query",
            )
        if out["status"] == "not_shown":
            raise ApiError(
                422, f"item {req.item_id!r} was not shown in that answer; send one of {out['shown']}"
            )
        await self.live.publish(out["seq"])  # every replica's next answer for this user sees the click
        imp = out["impression"]
        position = imp["shown"].index(req.item_id)
        self.answers.feedback.append(
            {
                **answer_row(req.request_id, imp, int(time.time() * 1000)),
                "item_id": req.item_id,
                "item_text": self.catalog.texts[self.catalog.item_index[req.item_id]]
                if req.item_id in self.catalog.item_index
                else "",
                "position": position,
                "propensity": imp["propensities"][position],
                "reward": req.reward,
            }
        )
        return {
            "logged": True,
            "position": position,
            "live_history_extended": bool(req.reward > 0 and imp["user_id"]),
        }

    @api.post("/items", status_code=201)
    async def add_item(self, req: NewItemRequest) -> dict[str, Any]:
        await self.live.refresh()
        self.live.start_polling()
        if req.item_id in self.catalog.item_index:
            raise ApiError(409, f"item id {req.item_id!r} exists; choose a new id")
        embedding = await self._call(self.scorer.embed_text.remote(req.text))
        try:
            version, seq = await self.state.add_item.remote(req.item_id, req.text, np.asarray(embedding))
        except Exception as e:  # the id was taken by a concurrent request
            raise ApiError(409, f"item id {req.item_id!r} exists; choose a new id") from e
        await self.live.sync(version)
        await self.live.publish(seq)  # every replica's catalogue has it before the answer
        return {"item_id": req.item_id, "catalog_version": version, "items": self.catalog.n_items}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        version = await self.live.refresh()
        info = await self._call(self.scorer.health.remote(version))
        return {
            "status": "ok",
            "ingress": self.replica,
            **info,
            "catalog_items": self.catalog.n_items,
            "live_state": {
                "mirror_trusted": self.live.mirror.trusted(),
                "applied_change": self.live.mirror.seq,
            },
            "loop": await self.live.state.loop_status.remote(),
        }

    async def _call(self, response):
        try:
            return await response
        except ScorerInputError as e:
            raise ApiError(422, str(e).splitlines()[-1]) from e
        except Exception as e:  # a replica restarting, ...: retryable, never a 500
            log.exception("scorer call failed")
            raise ApiError(503, f"scorer unavailable ({type(e).__name__}); retry shortly") from e


def build_app(args: dict[str, Any] | AppArgs):
    """Application builder (``import_path: serving.app:build_app`` in a Serve config).

    Options a Serve config sets per deployment (``deployments:``) override these arguments.
    """
    a = args if isinstance(args, AppArgs) else AppArgs(**args)
    model = str(Path(a.model).resolve())
    dataset = str(Path(a.dataset).resolve())
    logging = {"logging_config": {"enable_access_log": a.access_log}}
    scorer_opts: dict[str, Any] = {
        **logging,
        "ray_actor_options": {"num_cpus": a.scorer_cpus, "num_gpus": a.scorer_gpus},
        "user_config": {"model_path": model, **{name: getattr(a, name) for name in USER_CONFIG_ARGS}},
    }
    if a.autoscaling:
        scorer_opts["autoscaling_config"] = a.autoscaling
    else:
        scorer_opts["num_replicas"] = a.scorer_replicas
    feedback_dir = str(Path(a.feedback_dir).resolve())
    # the deployments' version is what their replicas are built from, the model aside: a new model (in
    # user_config; the init argument only seeds replicas started later) or new batching or exposure settings
    # reconfigure the running replicas in place (same replicas, same ports: nothing for a client to follow),
    # any other change replaces them. A Serve config deploy versions the app itself (its code and args).
    version = {"version": deployment_version(a), "_internal": True}
    if a.topology == "single":
        return RecIngress.options(name="RecService", max_ongoing_requests=64, **scorer_opts, **version).bind(
            None, dataset, feedback_dir, a.state_name, a.flush_rows, a.flush_seconds, model
        )
    scorer = PolicyScorer_deployment.options(**scorer_opts, **version).bind(model, dataset, a.state_name)
    return RecIngress.options(num_replicas=a.ingress_replicas, **logging, **version).bind(
        scorer, dataset, feedback_dir, a.state_name, a.flush_rows, a.flush_seconds
    )


USER_CONFIG_ARGS = (
    "max_batch_size",
    "batch_wait_timeout_s",
    "exposure_slots",
    "exposure_pool",
    "exposure_window",
    "exposure_refresh",
    *RETRIEVAL_ARGS,
)
"""App arguments that reach running replicas through ``user_config`` (``reconfigure``), under their own
names; the model goes there too, as ``model_path``."""


def deployment_version(a: AppArgs) -> str:
    """The version Serve compares to decide between reconfiguring a deployment's replicas and replacing
    them: a hash of the app's code (``serving/*.py``) and of every argument but the model and
    :data:`USER_CONFIG_ARGS`."""
    import hashlib
    import json

    built_from = {k: v for k, v in a.model_dump().items() if k != "model" and k not in USER_CONFIG_ARGS}
    digest = hashlib.sha256(json.dumps(built_from, sort_keys=True, default=str).encode())
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


PolicyScorer_deployment = serve.deployment(
    PolicyScorer,
    name="PolicyScorer",
    ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    max_ongoing_requests=64,
    user_config=dict(DEFAULT_BATCH),
)

__all__ = ["AppArgs", "RecIngress", "api", "build_app", "shutdown_state"]
