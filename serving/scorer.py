"""The model deployment: loads a fine-tuned run or an RLlib checkpoint once, scores batches of requests.

It runs on CUDA when Ray assigned it a GPU (``ray_actor_options={"num_gpus": 0.25}`` lets four replicas
share one) and on the CPU otherwise, with no code change. Requests are batched with ``@serve.batch``;
batch size and wait come from ``user_config`` (``reconfigure``), as does the model path, so a new model
version rolls out replica by replica without a redeploy.

Per request it returns the top-``k`` slate under the requested exploration (greedy, epsilon-greedy,
Boltzmann, Thompson, UCB; the shared :mod:`rec_rllib.explore` module) with the propensity of each shown item,
and optionally, per item, the history items that contributed most (cosine similarity of the model's item
vectors: "because you watched X").

With ``exposure_slots`` > 0 in ``user_config`` a greedy slate's last position(s) may go to an item this
replica has not shown within its last ``exposure_window`` slate positions, when the user ranks one within the
next ``exposure_pool`` items (:mod:`rec_rllib.exposure`: catalogue coverage at almost no accuracy cost). Such
an item is flagged ``exposure`` in the answer; its propensity is 1 (a deterministic choice given what the
replica has shown). Every replica keeps its own tracker; explored slates count as shown too. An RL policy
trained with an exposure cost (:mod:`rec_rllib.env`) brings its learned exposure weight β: every slate, greedy
or explored, is then drawn from the scores minus β · f(times the replica showed the item within the window),
f log(1 + count) or whether it was shown at all (the policy's shape), as the policy acted in training
(``exposure.penalty`` and ``exposure.shape`` in ``/healthz``).

UCB keeps per-replica diagonal LinUCB statistics of the (user state, item) pairs it showed under ``ucb``
(what was shown, not its reward: the model's score is the mean); a new model version starts them afresh
(its user states live in another space). On ``/query`` the bonus adds to the standardised blend of scores.

Thompson draws one posterior sample of the final layer per request, MC dropout on the user state at the
model's own dropout rate (what RL's env runners do with the frozen encoder; no second encoder pass), and
draws the slate by the Boltzmann rule on the sampled scores; each propensity is the probability given that
sample (an unbiased importance weight: the mask is drawn independently of the slate). The answer's scores
are the model's mean scores.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve

from rec_rllib.explore import ExplorationConfig, LinUCB, epsilon_slate, sample_slate
from rec_rllib.exposure import ExposureConfig, ExposureTracker
from rec_rllib.models.seqrec import TextSeqRec, pad_histories
from rec_rllib.retrieval import ItemIndex, uses_index
from serving.catalog import ServingCatalog
from serving.settings import BATCH_WAIT_TIMEOUT_S, MAX_BATCH_SIZE, RETRIEVAL_ARGS, AppArgs

RETRIEVAL_DEFAULTS = {name: AppArgs.model_fields[name].default for name in RETRIEVAL_ARGS}
"""How a replica's answers find their items until ``user_config`` says otherwise (AppArgs' defaults)."""

log = logging.getLogger("ray.serve")


def _generator(seed: int | None, device: str | torch.device) -> torch.Generator | None:
    """A request's own random stream when it names a seed (None: torch's global one)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(int(seed))


def _dropout(states: torch.Tensor, p: float, generators: list[torch.Generator | None]) -> torch.Tensor:
    """MC dropout of each row ([B, H], training-mode scaling), a seeded row's mask from its own generator."""
    if all(g is None for g in generators):
        return torch.nn.functional.dropout(states, p=p, training=True)
    rows = []
    for row, g in zip(states, generators, strict=True):
        if g is None:
            rows.append(torch.nn.functional.dropout(row, p=p, training=True))
        else:
            keep = torch.rand(row.shape, generator=g, device=row.device) >= p
            rows.append(row * keep / (1 - p) if p < 1 else torch.zeros_like(row))
    return torch.stack(rows)


class ScorerInputError(ValueError):
    """A request the model cannot answer as asked (the ingress turns it into a 4xx)."""


DEFAULT_BATCH = {"max_batch_size": MAX_BATCH_SIZE, "batch_wait_timeout_s": BATCH_WAIT_TIMEOUT_S}
EXPOSURE_KEYS = {
    "exposure_slots": "slots",
    "exposure_pool": "pool",
    "exposure_window": "window",
    "exposure_refresh": "refresh",
}
"""``user_config`` keys of the scorer -> :class:`ExposureConfig` fields."""


def load_serving_model(path: str, device: str) -> tuple[TextSeqRec, str, dict, dict | None]:
    """A fine-tuned run directory or an RLlib checkpoint -> (the TextSeqRec, a version string, the policy's
    exposure term as :class:`ExposureConfig` fields: ``penalty`` β, 0 unless an RL policy learned one, and
    ``shape``; the policy's co-occurrence term, :func:`~rec_rllib.rl.policy.cooccurrence_settings`, or
    None)."""
    from rec_rllib.models.run import is_run_dir, load_run
    from rec_rllib.rl.policy import (
        MODULE_SUBDIR,
        cooccurrence_settings,
        exposure_penalty,
        is_rl_checkpoint,
        load_policy_module,
    )

    p = Path(path)
    penalty, cooccurrence = {"penalty": 0.0, "shape": "log"}, None
    if is_run_dir(p):
        model, _ = load_run(p, device=device)
        weights = p / "model.safetensors"
    elif is_rl_checkpoint(p):
        module = load_policy_module(p)
        model, penalty = module.net.to(device).eval(), exposure_penalty(module)
        cooccurrence = cooccurrence_settings(module)
        weights = next(iter(sorted((p / MODULE_SUBDIR).glob("*.pt*"))), p / MODULE_SUBDIR)
    else:
        raise ValueError(f"{path}: neither a fine-tuned run directory nor an RLlib checkpoint")
    digest = hashlib.sha256()
    if weights.is_file():
        with open(weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    else:
        digest.update(str(p.resolve()).encode())
    version = f"{p.resolve().name if p.name != 'checkpoint' else p.parent.name}-{digest.hexdigest()[:10]}"
    return model, version, penalty, cooccurrence


class PolicyScorer:
    """Serve deployment class (options are applied by :func:`serving.app.build_app`)."""

    def __init__(self, model_path: str, dataset: str, state_actor: str | None = None):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        self.dataset = dataset
        self.catalog = ServingCatalog.from_dataset(dataset)
        self._added: list[dict[str, Any]] = []
        self._refresh_popularity()
        self._cold: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, a new user's pool, scores)
        self.exposure = ExposureTracker(self.catalog.n_items, ExposureConfig(slots=0))
        self._simulators: dict[str, Any] = {}
        # how a known user's list finds its items (AppArgs' candidate_*; user_config may change them)
        self.retrieval = dict(RETRIEVAL_DEFAULTS)
        self.index: ItemIndex | None = None
        self._load(model_path)
        self._encoder = None
        self._state_name = state_actor
        self._state = None
        self.catalog_version = 0
        self.batch = dict(DEFAULT_BATCH)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # used in-process (benchmarks, tests): no Serve replica around it
            self.replica = f"in-process-{os.getpid()}"

    # -- configuration ---------------------------------------------------------------------------------------
    def _load(self, model_path: str) -> None:
        model, version, penalty, cooccurrence = load_serving_model(model_path, self.device)
        if model.n_items < self.catalog.n_items - len(self._added):
            raise ValueError(
                f"{model_path} scores {model.n_items} items; the dataset has {self.catalog.n_items}"
            )
        for a in self._added:  # items added at run time survive a model roll
            model.add_items(torch.as_tensor(a["embedding"])[None].to(self.device))
        self.model, self.model_path, self.model_version = model, model_path, version
        self._set_exposure(replace(self.exposure.cfg, **penalty))  # the policy's own exposure term
        # the policy's co-occurrence term: γ times the item-kNN simulator's probabilities for the live history
        self.cooccurrence = cooccurrence
        if cooccurrence is not None and cooccurrence["scheme"] not in self._simulators:
            from rec_rllib.data.dataset import LogDataset
            from rec_rllib.rl.policy import simulator_of

            # fitted once per replica and split scheme (the dataset does not change; a model roll reuses it)
            self._simulators[cooccurrence["scheme"]] = simulator_of(
                LogDataset.load(self.dataset), cooccurrence["scheme"]
            )
        self.simulator = self._simulators[cooccurrence["scheme"]] if cooccurrence is not None else None
        self.ucb = LinUCB(model.n_items, model.cfg.hidden_size, alpha=1.0)  # the request scales the bonus
        with torch.no_grad():
            self._refresh_items()
            self._build_index()

    def _build_index(self) -> None:
        """The item index of the model's items (None when ``candidate_search`` scores every item). Items
        added at run time are not in it: every pooled answer scores them exactly."""
        self.index = None
        if uses_index(self.retrieval["candidate_search"], self.model.n_items):
            with torch.no_grad():
                self.index = ItemIndex(
                    self.items, self.model.item_offsets(), probe=int(self.retrieval["candidate_probe"])
                )

    def _refresh_items(self) -> None:
        # [n, H] stored column-major (a transposed view of an [H, n] array): the product of a few user states
        # with every item vector, the catalogue-wide part of an answer, then streams the matrix in the order
        # the product reads it (3x faster for one state at 100,000 items than the row-major layout)
        self.items = self.model.item_matrix().detach().T.contiguous().T

    def _refresh_popularity(self) -> None:
        self.popularity = torch.as_tensor(np.log1p(self.catalog.popularity), dtype=torch.float32)

    def reconfigure(self, config: dict[str, Any]) -> None:
        batch = {k: config[k] for k in DEFAULT_BATCH if k in config}
        self.batch.update(batch)
        self._score_batch.set_max_batch_size(int(self.batch["max_batch_size"]))
        self._score_batch.set_batch_wait_timeout_s(float(self.batch["batch_wait_timeout_s"]))
        exposure = {field: config[key] for key, field in EXPOSURE_KEYS.items() if key in config}
        if exposure:
            self._set_exposure(ExposureConfig(**{**asdict(self.exposure.cfg), **exposure}))
        path = config.get("model_path")
        retrieval = {**self.retrieval, **{k: config[k] for k in RETRIEVAL_DEFAULTS if k in config}}
        if path and path != self.model_path:
            self.retrieval = retrieval
            self._load(path)
            log.info("now serving %s (%s)", self.model_version, path)
        elif retrieval != self.retrieval:
            self.retrieval = retrieval
            self._build_index()

    def _set_exposure(self, cfg: ExposureConfig) -> None:
        if cfg != self.exposure.cfg:  # a new tracker: what was shown under other settings is forgotten
            self.exposure = ExposureTracker(self.model.n_items, cfg)

    # -- shared state ---------------------------------------------------------------------------------------
    async def _sync_items(self, version: int) -> None:
        if version <= self.catalog_version or not self._state_name:
            return

        if self._state is None:
            from serving.state import live_state

            self._state = live_state(self._state_name)
        added, current = await self._state.items_since.remote(len(self._added))
        for a in added:
            self._added.append(a)
            self.catalog.add(a["item_id"], a["text"])
            self.model.add_items(torch.as_tensor(a["embedding"])[None].to(self.device))
        if added:
            self.ucb.add_items(len(added))  # items added at run time: never shown
            self._refresh_popularity()
            with torch.no_grad():
                self._refresh_items()
        self.catalog_version = current

    def encoder(self):
        if self._encoder is None:
            from rec_rllib.models.text import TextEncoder

            cfg = self.model.cfg
            if cfg.text_model is None:
                raise ScorerInputError(
                    "this model has no text encoder (id-only); queries and new items need a text model"
                )
            self._encoder = TextEncoder(cfg.text_model, max_length=cfg.text_max_length, device=self.device)
        return self._encoder

    async def embed_text(self, text: str) -> np.ndarray:
        return self.encoder().encode([text])[0].cpu().numpy()

    # -- requests ---------------------------------------------------------------------------------------
    async def recommend(self, request: dict[str, Any]) -> dict[str, Any]:
        await self._sync_items(int(request.get("catalog_version", 0)))
        return await self._score_batch(request)

    async def query(self, request: dict[str, Any]) -> dict[str, Any]:
        """Natural-language query: cosine similarity in the text encoder's space (+ the history's scores)."""
        await self._sync_items(int(request.get("catalog_version", 0)))
        q = self.encoder().encode([request["text"]])[0].to(self.device)
        text = torch.nn.functional.normalize(self.model.item_text_embeddings().detach(), dim=-1)
        request = {**request, "query_scores": (text @ q).float()}
        return await self._score_batch(request)

    async def health(self, catalog_version: int = 0) -> dict[str, Any]:
        """What ``/healthz`` shows of this replica (:meth:`info`), after taking in the items added up to
        ``catalog_version`` (so its item count agrees with the ingress's catalogue)."""
        await self._sync_items(int(catalog_version))
        return self.info()

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "model_version": self.model_version,
            "model_path": self.model_path,
            "device": self.device,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "items": self.model.n_items,
            "batch": self.batch,
            "ucb": {"shown": self.ucb.shown},
            "cooccurrence": self.cooccurrence,  # the policy's learned co-occurrence term (None without one)
            # how a known user's list finds its items: every item scored, or the index's pool
            "retrieval": {
                "search": "exact" if self.index is None else "ivf",
                **(
                    {}
                    if self.index is None
                    else {
                        "pool": int(self.retrieval["candidate_pool"]),
                        "clusters": self.index.lists,
                        "clusters_read": self.index.probe,
                        "indexed_items": self.index.n_items,
                    }
                ),
            },
            "exposure": {
                **asdict(self.exposure.cfg),
                "answers": self.exposure.answers,
                "epoch": self.exposure.epoch,
                "swaps": self.exposure.swaps,
                "exposed_share": round(self.exposure.exposed_share(), 4),
            },
        }

    @serve.batch(
        max_batch_size=DEFAULT_BATCH["max_batch_size"],
        batch_wait_timeout_s=DEFAULT_BATCH["batch_wait_timeout_s"],
    )
    async def _score_batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return self.score_requests(requests)

    def score_requests(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One forward pass for a batch of requests (what ``_score_batch`` runs; callable outside Serve)."""
        with torch.inference_mode():
            tokens, lengths = pad_histories(
                [r["history"] for r in requests], self.model.cfg.max_len, self.device
            )
            state = self.model.user_state(tokens, lengths, self.items)
            # a request with a seed draws from its own generator (its dropout mask, then its slate)
            generators = {i: _generator(r.get("seed"), state.device) for i, r in enumerate(requests)}
            # one posterior sample of the final layer per Thompson request: MC dropout on its user state
            rows = [i for i, r in enumerate(requests) if r.get("strategy") == "thompson"]
            draws: dict[int, torch.Tensor] = {}
            if rows:
                drawn = _dropout(state[rows], self.model.cfg.dropout, [generators[i] for i in rows])
                draws = dict(zip(rows, drawn, strict=True))
            pools = self._pools(state, requests, draws)  # the requests answered from the index's pool
            whole = [i for i in range(len(requests)) if i not in pools]  # the others score every item
            at = {row: j for j, row in enumerate(whole)}
            scores = self.model.scores_from_state(state[whole], self.items).float() if whole else None
            term: torch.Tensor | float = 0.0
            if self.cooccurrence is not None and whole:
                term = self._cooccurrence_term([requests[i]["history"] for i in whole], scores.shape[1])
                scores = scores + term
            sampled: dict[int, torch.Tensor] = {}
            unpooled = [i for i in whole if i in draws]
            if unpooled:  # the samples' scores of every item, in one product
                sample = torch.stack([draws[i] for i in unpooled])
                drawn = self.model.scores_from_state(sample, self.items).float()
                drawn = drawn + (term[[at[i] for i in unpooled]] if isinstance(term, torch.Tensor) else term)
                sampled = dict(zip(unpooled, drawn, strict=True))
            return [
                self._slate(r, pools[i][1], state[i], pools[i][2], ids=pools[i][0], generator=generators[i])
                if i in pools
                else self._slate(r, scores[at[i]], state[i], sampled.get(i), generator=generators[i])
                for i, r in enumerate(requests)
            ]

    def _pooled(self, r: dict[str, Any]) -> bool:
        """Whether an answer ranks or draws among a pool of items: a known user's greedy, Boltzmann,
        Thompson, UCB or epsilon list (its uniform picks still range over the catalogue) among the items the
        index finds, a new user's (but Thompson) among the items every new user's list is drawn from
        (:meth:`_cold_pool`); no query, a policy without a co-occurrence term, no exposure slot (a query's
        list blends in the text; the exposure slot's pool and the co-occurrence term read every item)."""
        strategy = r.get("strategy", "greedy")
        slot = self.exposure.cfg.active and bool(r.get("exposure", True))
        return (
            self.index is not None
            and self.cooccurrence is None
            and (len(r["history"]) > 0 or strategy != "thompson")
            and "query_scores" not in r
            and (strategy != "greedy" or not slot)  # (the exposure slot widens greedy lists only)
        )

    def _pools(
        self,
        state: torch.Tensor,
        requests: list[dict[str, Any]],
        draws: dict[int, torch.Tensor] | None = None,
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """{request: (items [P], their scores [P], their scores under the request's posterior sample [P] or
        None)} for the pooled requests (:meth:`_pooled`): the ``candidate_pool`` + (history length) items with
        the highest scores the index finds, and every item added at run time (not in the index), scored
        exactly. A Thompson request (``draws``: its sampled user state) searches with its sample, the state
        its list is drawn by. What follows (exclusions, exposure prices, the top-k or the draw) then costs
        the pool, not the catalogue. A request whose probed clusters held fewer items than asked (tiny
        clusters) is left out: it scores every item."""
        draws = draws or {}
        pooled = [i for i, r in enumerate(requests) if self._pooled(r)]
        pools = {}
        for i in [i for i in pooled if not requests[i]["history"]]:
            ids, scores = self._cold_pool()
            pools[i] = (ids, scores, None)
        pooled = [i for i in pooled if i not in pools]
        if not pooled:
            return pools
        n, indexed = self.items.shape[0], self.index.n_items
        longest = max(len(requests[i]["history"]) for i in pooled)
        searched = torch.stack([draws.get(i, state[i]) for i in pooled])  # what each list is drawn by
        found_scores, found = self.index.search(
            self.model.score_query(searched), int(self.retrieval["candidate_pool"]) + longest
        )
        added = torch.arange(indexed, n, device=state.device)
        added_scores = (
            self.model.scores_from_state(searched, self.items, added).float()
            if n > indexed
            else torch.zeros(len(pooled), 0, device=state.device)
        )
        for j, i in enumerate(pooled):
            if bool((found[j] == indexed).any()):
                continue
            ids = torch.cat([found[j].to(state.device), added])
            scores = torch.cat([found_scores[j].to(added_scores.dtype), added_scores[j]])
            if i in draws:  # the pool under the sample; the answer's scores are the mean state's
                mean = self.model.scores_from_state(state[i : i + 1], self.items, ids)[0].float()
                pools[i] = (ids, mean, scores)
            else:
                pools[i] = (ids, scores, None)
        return pools

    def _cold_pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(items [P], the model's scores of them [P]): what a new user's list is ranked or drawn among, the
        ``candidate_pool`` items with the highest scores of an empty history plus the popularity prior
        (:meth:`_adjusted`), scored over every item once per model, catalogue and pool size, not per answer:
        every new user's scores are the same."""
        n, size = self.items.shape[0], int(self.retrieval["candidate_pool"])
        key = (self.model_version, n, size)
        if self._cold is None or self._cold[0] != key:
            tokens, lengths = pad_histories([[]], self.model.cfg.max_len, self.device)
            state = self.model.user_state(tokens, lengths, self.items)
            scores = self.model.scores_from_state(state, self.items)[0].float()
            prior = scores + self.popularity[:n].to(scores.device)
            ids = torch.topk(prior, min(size, n)).indices
            self._cold = (key, ids, scores[ids])
        return self._cold[1], self._cold[2]

    def _cooccurrence_term(self, histories: list, n: int) -> torch.Tensor:
        """[B, n] γ · the simulator's probabilities for each live history (items added at run time: 0), the
        feature's items only written (:meth:`~rec_rllib.simulator.ItemKNNSimulator.feature`, as in
        training)."""
        from rec_rllib.rl.policy import cooccurrence_lists

        co = self.cooccurrence
        out = torch.zeros(len(histories), n, dtype=torch.float32)
        lists = cooccurrence_lists(self.simulator, histories, co["window"], top=co.get("items"))
        for row, (items, probs) in enumerate(lists):
            keep = items < n
            out[row, torch.as_tensor(items[keep])] = torch.as_tensor(probs[keep])
        return (co["weight"] * out).to(self.device)

    def _adjusted(
        self, r: dict[str, Any], scores: torch.Tensor, ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The scores a slate is drawn from: a new user's blend with popularity, a query's blend with the
        text; ``ids``: the scores are of those items only (a pool)."""
        if len(r["history"]) == 0:  # no evidence about the user: blend the model's prior with popularity
            prior = self.popularity[: scores.shape[0]] if ids is None else self.popularity[ids.cpu()]
            scores = scores + prior.to(scores.device)
        if "query_scores" in r:
            q = r["query_scores"].to(scores.device)
            weight = float(r.get("query_weight", 1.0))
            z = (scores - scores.mean()) / scores.std().clamp(min=1e-6)
            scores = (1 - weight) * z + weight * (q - q.mean()) / q.std().clamp(min=1e-6)
        return scores

    def _slate(
        self,
        r: dict[str, Any],
        scores: torch.Tensor,
        state: torch.Tensor,
        sampled: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """One answer from ``scores`` of every item, or (``ids``) of those items only (a pool); explored
        lists draw from ``generator`` (None: torch's global one)."""
        n = scores.shape[0]
        history = torch.as_tensor(r["history"], dtype=torch.long, device=scores.device)
        cold = len(r["history"]) == 0
        scores = self._adjusted(r, scores, ids)
        allowed = torch.ones(n, dtype=torch.bool, device=scores.device)
        excluded = 0
        if r.get("exclude_seen", True) and len(history) and ids is not None:
            allowed = ~torch.isin(ids, history)
            excluded = int((~allowed).sum())
        elif r.get("exclude_seen", True) and len(history):
            allowed[history] = False
            excluded = int(torch.unique(history).numel())  # history items are catalogue items (checked)
        k = min(int(r["k"]), n - excluded)
        strategy = r.get("strategy", "greedy")
        if strategy == "greedy" and cold and r.get("explore_cold", True):
            strategy = "boltzmann"  # a new user gets an explored list
        widened = bonus = shown_scores = None
        tracked = self.exposure.cfg.active  # the replica records what it shows
        if tracked:
            self.exposure.grow(self.model.n_items)  # items added at run time start unexposed
        exposed = tracked and bool(r.get("exposure", True))  # this answer is shaped by what was shown
        epoch = self.exposure.epoch  # the prices this answer sees (recording it may start the next epoch)
        # the policy's exposure term (β · f(times shown), priced as of the tracker's epoch), for every
        # strategy
        shift: torch.Tensor | float = 0.0
        priced = exposed and bool(self.exposure.cfg.penalty)
        if priced:  # every item's price, or the pool's
            prices = (
                self.exposure.penalties(self.model.n_items)
                if ids is None
                else self.exposure.penalties_at(ids.cpu().numpy())
            )
            shift = torch.as_tensor(prices, dtype=scores.dtype, device=scores.device)
        ranked_by = scores - shift  # what a greedy list is sorted by, and an explored one drawn from
        if strategy in ("greedy", "ucb"):
            masked = ranked_by.masked_fill(~allowed, -torch.inf)
        if strategy == "greedy" and exposed:
            row, widened = self.exposure.slate(masked.cpu().numpy(), k, penalised=True)
            items = torch.as_tensor(row, device=scores.device)
            props = torch.ones(k, dtype=torch.float64)
        elif strategy == "greedy":
            top = torch.topk(masked, k)
            items, props = top.indices, torch.ones(k, dtype=torch.float64)
        elif strategy == "ucb":
            of = None if ids is None else ids[None]  # a pool: the bonus of its items only
            bonus = (
                float(r.get("ucb_alpha", ExplorationConfig.ucb_alpha)) * self.ucb.bonus(state[None], of)[0]
            )
            bonus = bonus.to(masked.device)
            ranked_by = ranked_by + bonus
            items = torch.topk(masked + bonus, k).indices
            props = torch.ones(k, dtype=torch.float64)
            self.ucb.update(state[None], (items if ids is None else ids[items])[None])
        elif strategy == "epsilon" and ids is not None:
            items, props, shown_scores = self._epsilon_over_catalogue(
                r, state, ranked_by, allowed, ids, k, generator, priced=priced
            )
        elif strategy == "epsilon":
            items, props = epsilon_slate(
                (scores - shift)[None], k, float(r.get("epsilon", 0.1)), allowed[None], generator
            )
            items, props = items[0], props[0]
        else:  # boltzmann; thompson: the same rule on a posterior sample of the scores
            t = float(r.get("temperature", 1.0))
            drawn_from = (scores if sampled is None else self._adjusted(r, sampled, ids)) - shift
            logits = drawn_from.float().masked_fill(~allowed, -torch.inf) / t
            items, props = sample_slate(logits[None], k, generator, normalise=True)
            items, props = items[0], props[0]
        if shown_scores is None:  # items are positions in scores: their item indices, their scores
            local, items = items, (items if ids is None else ids[items])
            shown_scores = ranked_by[local]
        if widened is None and tracked:
            self.exposure.record(items.cpu().numpy())
        out: dict[str, Any] = {
            "items": items.cpu().tolist(),
            "scores": shown_scores.cpu().tolist(),
            "propensities": props.cpu().tolist(),
            "strategy": strategy,
            "cold_start": cold,
            "model_version": self.model_version,
            "replica": self.replica,
            "exposure_epoch": epoch if exposed else None,
            "seed": r.get("seed"),
        }
        if widened is not None:
            out["exposure"] = widened.tolist()
        if bonus is not None:
            out["bonus"] = bonus[local].cpu().tolist()
        if r.get("explain") and len(history):
            out["because"] = self._because(history, items)
        return out

    def _epsilon_over_catalogue(
        self,
        r: dict[str, Any],
        state: torch.Tensor,
        ranked_by: torch.Tensor,
        allowed: torch.Tensor,
        ids: torch.Tensor,
        k: int,
        generator: torch.Generator | None,
        *,
        priced: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A pooled epsilon-greedy list: each position is the pool's best remaining item with probability
        1 - epsilon, else an item drawn uniformly among every remaining item of the catalogue (the history
        excluded), found by rejection instead of by scoring the catalogue; the propensities are
        :func:`~rec_rllib.explore.epsilon_slate`'s. Returns (item indices [k], propensities [k], their
        scores [k]: the pool's, or for an item drawn outside it, the model's less its exposure price when the
        answer is ``priced``)."""
        epsilon = float(r.get("epsilon", 0.1))
        n = self.items.shape[0]
        seen = set(r["history"]) if r.get("exclude_seen", True) else set()  # catalogue items (checked)
        order = torch.argsort(ranked_by.masked_fill(~allowed, -torch.inf), descending=True, stable=True)
        ranked = ids[order[: int(allowed.sum())]].tolist()  # the pool's allowed items, best first
        pool_scores = dict(zip(ids.tolist(), ranked_by.tolist(), strict=True))
        chosen: list[int] = []
        props: list[float] = []
        for j in range(k):
            best = next(item for item in ranked if item not in chosen)
            item = best
            if float(torch.rand((), generator=generator)) < epsilon:
                while True:  # uniform over the remaining catalogue
                    item = int(torch.randint(n, (), generator=generator))
                    if item not in seen and item not in chosen:
                        break
            remaining = n - len(seen) - j
            props.append(epsilon / remaining + (1 - epsilon) * (item == best))
            chosen.append(item)
        items = torch.as_tensor(chosen, device=ranked_by.device)
        outside = [i for i in chosen if i not in pool_scores]
        if outside:
            idx = torch.as_tensor(outside, device=ranked_by.device)
            scores = self._adjusted(
                r, self.model.scores_from_state(state[None], self.items, idx)[0].float(), idx
            )
            if priced:
                scores = scores - torch.as_tensor(
                    self.exposure.penalties_at(np.asarray(outside)), dtype=scores.dtype
                ).to(scores.device)
            pool_scores.update(zip(outside, scores.tolist(), strict=True))
        shown = torch.tensor([pool_scores[i] for i in chosen], dtype=ranked_by.dtype)
        return items, torch.tensor(props, dtype=torch.float64), shown

    def _relevance(self, histories: list[list[int]], idx: torch.Tensor) -> torch.Tensor:
        """[B, m] the policy's scores of items ``idx`` for each history (the model, plus the co-occurrence
        term when the policy has one): what the history decides, before exposure and exploration."""
        tokens, lengths = pad_histories(histories, self.model.cfg.max_len, self.device)
        state = self.model.user_state(tokens, lengths, self.items)
        scores = self.model.scores_from_state(state, self.items, idx).float()
        if self.cooccurrence is not None:
            scores = scores + self._cooccurrence_term(histories, self.model.n_items)[:, idx]
        return scores

    def _because(
        self, history: torch.Tensor, items: torch.Tensor, top: int = 2
    ) -> list[list[tuple[int, float]]]:
        """Per shown item, the history items it owes most to: for each item the model reads (the last
        ``max_len``), how much the shown item's score falls when the history is read without it (one batched
        pass over the leave-one-out histories); the ``top`` largest positive drops, largest first."""
        h = history[-self.model.cfg.max_len :].tolist()
        variants = [h] + [h[:j] + h[j + 1 :] for j in range(len(h))]
        scores = self._relevance(variants, items)  # [1 + len(h), k]
        drop = (scores[0][None] - scores[1:]).T  # [k, len(h)]
        best = torch.topk(drop, min(top, drop.shape[1]), dim=1)
        return [
            [(h[j], float(d)) for j, d in zip(idx.tolist(), val.tolist(), strict=True) if d > 0]
            for idx, val in zip(best.indices, best.values, strict=True)
        ]
