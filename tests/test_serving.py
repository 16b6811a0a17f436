"""The Serve app over real HTTP on 127.0.0.1: every endpoint, bad input, feedback loop, live adaptation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import ray

from rec_rllib.data.feedback import read_impressions
from serving.feedback import read_feedback
from tests.conftest import REPO, free_port


@pytest.fixture(scope="module", params=["split", "single"])
def app(request, finetuned_run, ml_dir, tmp_path_factory):
    """Two ingress and two scorer replicas on an embedded Ray (each a real process), HTTP on loopback;
    then the same tests against the single-deployment topology (two replicas that answer HTTP and score)."""
    from jobs.serve import start, stop

    feedback_dir = tmp_path_factory.mktemp("feedback")
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        url = start(
            {
                "model": finetuned_run,
                "dataset": ml_dir,
                "feedback_dir": str(feedback_dir),
                "topology": request.param,
                "ingress_replicas": 2,
                "scorer_replicas": 2,
                "scorer_cpus": 0.5,
                "flush_rows": 1000,
                "flush_seconds": 600,  # only the shutdown flush writes: proves nothing is lost on stop
            },
            free_port(),
        )
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {
                "client": client,
                "feedback_dir": feedback_dir,
                "dataset": ml_dir,
                "stop": stop,
                "finetuned_run": finetuned_run,
            }
    finally:
        try:
            stop()
        finally:
            ray.shutdown()


def test_recommend_known_user_with_explanations(app):
    c = app["client"]
    r = c.post("/recommend", json={"user": "196", "k": 5, "explain": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["items"]) == 5 and body["request_id"] and body["model_version"]
    assert body["history_items"] > 0 and body["session_items"] == 0 and body["exposure_epoch"] is None
    assert all(it["propensity"] == 1.0 for it in body["items"])  # greedy
    assert all(it["because"] and it["because"][0]["text"] for it in body["items"])
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # the same request against the same state: the same list, the same scores
    again = c.post("/recommend", json={"user": "196", "k": 5, "explain": True}).json()
    assert [(it["item_id"], it["score"]) for it in again["items"]] == [
        (it["item_id"], it["score"]) for it in body["items"]
    ]


def test_explanations_name_the_history_items_each_score_owes_most_to(app):
    """Each "because" item is one whose removal from the history lowers the recommended item's score, by the
    drop it reports; the first one lowers it at least as much as leaving out any other history item (checked
    against the model in this process); the measure differs across recommended items."""
    import numpy as np

    from rec_rllib.columns import Col
    from rec_rllib.data import LogDataset
    from rec_rllib.models import load_recommender

    ds = LogDataset.load(app["dataset"])
    history = ["50", "172", "181", "1", "127", "98", "204", "56"]
    body = app["client"].post("/recommend", json={"history": history, "k": 5, "explain": True}).json()
    model = load_recommender(app["finetuned_run"], ds)
    index = {iid: i for i, iid in enumerate(ds.items[Col.ITEM_ID].astype(str))}
    h = [index[i] for i in history]
    variants = [np.array(h)] + [np.array(h[:j] + h[j + 1 :]) for j in range(len(h))]
    scores = model.score(variants)  # [1 + len(h), n_items]
    firsts = []
    for it in body["items"]:
        i = index[it["item_id"]]
        drops = {history[j]: scores[0, i] - scores[1 + j, i] for j in range(len(h))}
        because = it["because"]
        assert because, it
        for b in because:
            assert b["score_drop"] > 0 and abs(b["score_drop"] - drops[b["item_id"]]) < 1e-3, (b, drops)
        assert [b["score_drop"] for b in because] == sorted((b["score_drop"] for b in because), reverse=True)
        assert drops[because[0]["item_id"]] >= max(drops.values()) - 1e-4
        assert abs(it["score"] - scores[0, i]) < 1e-3  # the score is the model's, for a greedy list
        firsts.append(because[0]["score_drop"])
    assert len({round(f, 4) for f in firsts}) > 1


def test_exploration_reports_propensities(app):
    c = app["client"]
    for mode, extra in (("epsilon", {"epsilon": 0.5}), ("boltzmann", {"temperature": 2.0}), ("thompson", {})):
        body = c.post("/recommend", json={"user": "196", "k": 10, "exploration": mode, **extra}).json()
        props = [it["propensity"] for it in body["items"]]
        assert body["strategy"] == mode and all(0 < p <= 1 for p in props)
        assert any(p < 1 for p in props)
        if mode == "epsilon":  # first position: best item w.p. 1 - eps + eps/n, else eps/n
            assert props[0] > 0.5 or props[0] < 0.01


def test_a_seed_fixes_the_exploration_draw(app):
    """The same explored request with the same seed gets the same list and propensities, whichever replica
    answers; the answer names its seed; another seed draws another list."""
    c = app["client"]
    for mode, extra in (("epsilon", {"epsilon": 0.5}), ("boltzmann", {"temperature": 2.0}), ("thompson", {})):
        body = {"user": "196", "k": 10, "exploration": mode, "exposure": False, **extra}
        answers = [c.post("/recommend", json={**body, "seed": 7}).json() for _ in range(3)]
        assert all(a["seed"] == 7 for a in answers)
        lists = {tuple((it["item_id"], it["propensity"]) for it in a["items"]) for a in answers}
        assert len(lists) == 1, mode
        other = c.post("/recommend", json={**body, "seed": 8}).json()
        assert tuple((it["item_id"], it["propensity"]) for it in other["items"]) not in lists, mode
    assert c.post("/recommend", json={"user": "196", "exploration": "boltzmann"}).json()["seed"] is None


def test_ucb_shows_the_greedy_slate_at_zero_width_and_moves_off_what_a_replica_showed(app):
    c = app["client"]
    greedy = c.post("/recommend", json={"user": "196", "k": 5}).json()
    top = [it["item_id"] for it in greedy["items"]]
    flat = c.post("/recommend", json={"user": "196", "k": 5, "exploration": "ucb", "ucb_alpha": 0}).json()
    assert flat["strategy"] == "ucb" and [it["item_id"] for it in flat["items"]] == top
    assert all(it["propensity"] == 1.0 and it["bonus"] == 0.0 for it in flat["items"])
    slates = []
    for _ in range(4):  # two scorer replicas, each with its own statistics: one of them answers twice
        body = c.post(
            "/recommend", json={"user": "196", "k": 5, "exploration": "ucb", "ucb_alpha": 50}
        ).json()
        assert all(it["propensity"] == 1.0 and 0.0 < it["bonus"] <= 50.0 + 1e-3 for it in body["items"])
        slates.append(tuple(it["item_id"] for it in body["items"]))
    assert len(set(slates)) > 1
    assert any(set(s) - set(top) for s in slates)  # items outside the greedy top 5 got their turn


def test_thompson_draws_by_the_boltzmann_rule_on_one_posterior_sample(finetuned_run, ml_dir):
    """In process (the scorer is a plain class, what each replica holds): a Thompson slate's propensities
    are the Boltzmann rule's on the MC-dropout sample the scorer drew (redrawn here from the same seed),
    not on the mean scores; the answer carries the mean scores; a greedy row of the same batch is
    untouched."""
    import torch

    from rec_rllib.models.seqrec import pad_histories
    from serving.scorer import PolicyScorer

    scorer, t = PolicyScorer(finetuned_run, ml_dir), 0.5
    model, items = scorer.model, scorer.items
    history = list(range(0, 60, 3))
    req = {"history": history, "k": 5, "strategy": "thompson", "temperature": t}
    greedy = scorer.score_requests([{**req, "strategy": "greedy"}])[0]
    with torch.inference_mode():
        tokens, lengths = pad_histories([history], model.cfg.max_len)
        state = model.user_state(tokens, lengths, items)
        mean = model.scores_from_state(state, items)[0].float()
    allowed = torch.ones_like(mean, dtype=torch.bool)
    allowed[history] = False

    def given(scores: torch.Tensor, slate: list[int]) -> list[float]:  # Plackett-Luce, position by position
        p = torch.softmax(scores.masked_fill(~allowed, -torch.inf) / t, dim=0).double()
        above = torch.cumsum(p[slate], 0) - p[slate]
        return (p[slate] / (1 - above)).tolist()

    off_mean = 0
    for seed in range(6):
        torch.manual_seed(seed)
        th, gr = scorer.score_requests([req, {**req, "strategy": "greedy"}])
        assert th["strategy"] == "thompson" and gr["items"] == greedy["items"]
        assert th["scores"] == pytest.approx(mean[th["items"]].tolist(), abs=1e-5)
        torch.manual_seed(seed)  # the scorer's first draw: the dropout mask of the Thompson row
        with torch.inference_mode():
            draw = torch.nn.functional.dropout(state, p=model.cfg.dropout, training=True)
            sample = model.scores_from_state(draw, items)[0].float()
        assert th["propensities"] == pytest.approx(given(sample, th["items"]), rel=1e-4)
        off_mean += th["propensities"] != pytest.approx(given(mean, th["items"]), rel=1e-3)
    assert off_mean == 6  # the sample, not the mean, decided every slate


def test_a_seeded_answer_does_not_depend_on_its_batch(finetuned_run, ml_dir):
    """In process: a seeded explored request draws from its own stream, so it gets the same list alone and
    batched with other requests (seeded or not), whatever torch's global generator holds."""
    import torch

    from serving.scorer import PolicyScorer

    scorer = PolicyScorer(finetuned_run, ml_dir)
    others = [
        {"history": list(range(1, 40, 2)), "k": 10, "strategy": "boltzmann"},
        {"history": [5, 9], "k": 10, "strategy": "thompson", "seed": 3},
    ]
    for strategy in ("boltzmann", "epsilon", "thompson"):
        req = {"history": list(range(0, 60, 3)), "k": 10, "strategy": strategy, "epsilon": 0.5, "seed": 11}
        torch.manual_seed(0)
        alone = scorer.score_requests([req])[0]
        torch.manual_seed(1)
        batched = scorer.score_requests([others[0], req, others[1]])[1]
        assert batched["items"] == alone["items"], strategy
        # (a batch's product may round its scores differently in the last place)
        assert batched["propensities"] == pytest.approx(alone["propensities"], rel=1e-5)
        assert alone["seed"] == 11


def test_answers_from_the_item_index_rank_and_draw_among_the_items_it_finds(finetuned_run, ml_dir):
    """In process, ``candidate_search="ivf"``: reading every cluster, a greedy list is the list of scoring
    every item, scores included; reading few, a greedy list is the pool's best and a Boltzmann list draws
    only among the pool the index found (its propensities the Plackett-Luce rule's over that pool), neither
    showing a history item; a UCB list ranks the pool with its bonus; an epsilon list's uniform picks range
    over the whole catalogue; a Thompson list draws among the pool its posterior sample finds; an item added
    at run time is in every pool; a new user's list is drawn among the best items for an empty history."""
    import torch

    from rec_rllib.models.seqrec import pad_histories
    from serving.scorer import PolicyScorer

    scorer = PolicyScorer(finetuned_run, ml_dir)
    assert scorer.index is None  # 1,682 items: "auto" scores every item
    history = list(range(0, 60, 3))
    req = {"history": history, "k": 10}
    exact = scorer.score_requests([req])[0]
    scorer.reconfigure({"candidate_search": "ivf", "candidate_probe": 10_000})
    assert scorer.index is not None and scorer.index.probe == scorer.index.lists
    every = scorer.score_requests([req])[0]
    assert every["items"] == exact["items"]
    assert every["scores"] == pytest.approx(exact["scores"], abs=1e-4)
    scorer.reconfigure({"candidate_probe": 2, "candidate_pool": 50})
    assert scorer.index.probe == 2
    with torch.inference_mode():
        tokens, lengths = pad_histories([history], scorer.model.cfg.max_len)
        state = scorer.model.user_state(tokens, lengths, scorer.items)
        mean = scorer.model.scores_from_state(state, scorer.items)[0].float()
        found_scores, found = scorer.index.search(scorer.model.score_query(state), 50 + len(history))
    pool = set(found[0].tolist()) - set(history)
    assert len(pool) >= 50
    best = torch.topk(
        mean.masked_fill(torch.isin(torch.arange(len(mean)), torch.tensor(history)), -torch.inf), 50
    )
    assert pool != set(best.indices.tolist())  # two clusters: not every item's 50 best
    greedy = scorer.score_requests([req])[0]
    assert greedy["items"] == sorted(pool, key=lambda i: (-float(mean[i]), i))[:10]
    p = torch.softmax(mean[sorted(pool)], dim=0).double()
    at = {item: j for j, item in enumerate(sorted(pool))}
    for seed in range(4):
        torch.manual_seed(seed)
        drawn = scorer.score_requests([{**req, "strategy": "boltzmann", "temperature": 1.0}])[0]
        assert set(drawn["items"]) <= pool and len(set(drawn["items"])) == 10
        chosen = p[[at[i] for i in drawn["items"]]]
        given = (chosen / (1 - (torch.cumsum(chosen, 0) - chosen))).tolist()
        assert drawn["propensities"] == pytest.approx(given, rel=1e-3)
    # epsilon: the pool's best remaining item, or with probability epsilon any remaining catalogue item
    n, rest = scorer.model.n_items, scorer.model.n_items - len(history)
    greedy_eps = scorer.score_requests([{**req, "strategy": "epsilon", "epsilon": 0.0}])[0]
    assert greedy_eps["items"] == greedy["items"] and greedy_eps["propensities"] == [1.0] * 10
    uniform = scorer.score_requests([{**req, "strategy": "epsilon", "epsilon": 1.0, "k": 30, "seed": 1}])[0]
    assert not set(uniform["items"]) <= pool and not set(uniform["items"]) & set(history)
    assert len(set(uniform["items"])) == 30 and max(uniform["items"]) < n
    assert uniform["propensities"] == pytest.approx([1 / (rest - j) for j in range(30)])
    assert uniform["scores"] == pytest.approx(mean[uniform["items"]].tolist(), abs=1e-4)
    half = scorer.score_requests([{**req, "strategy": "epsilon", "epsilon": 0.5, "seed": 2}])[0]
    best = greedy["items"][0]
    assert half["propensities"][0] == pytest.approx(0.5 / rest + 0.5 * (half["items"][0] == best))
    # UCB: the pool's items with their bonus; the statistics record the items shown, not pool positions
    flat = scorer.score_requests([{**req, "strategy": "ucb", "ucb_alpha": 0.0}])[0]
    assert flat["items"] == greedy["items"]
    before = scorer.ucb.a_diag.clone()
    wide = scorer.score_requests([{**req, "strategy": "ucb", "ucb_alpha": 50.0}])[0]
    assert set(wide["items"]) <= pool and all(0 < b <= 50 + 1e-3 for b in wide["bonus"])
    assert torch.nonzero((scorer.ucb.a_diag != before).any(1)).flatten().tolist() == sorted(wide["items"])
    # Thompson: the pool its posterior sample finds (the seeded mask redrawn here), drawn by the sample's
    # scores, the answer's scores the mean state's
    model, t = scorer.model, 0.5
    scorer.reconfigure({"candidate_probe": 12})  # enough clusters for a pool of 50 + the history
    for seed in range(3):
        thompson = scorer.score_requests([{**req, "strategy": "thompson", "temperature": t, "seed": seed}])[0]
        keep = torch.rand(state.shape[1], generator=torch.Generator().manual_seed(seed)) >= model.cfg.dropout
        sample = state * keep / (1 - model.cfg.dropout)
        with torch.inference_mode():
            _, found_t = scorer.index.search(model.score_query(sample), 50 + len(history))
            sampled = model.scores_from_state(sample, scorer.items)[0].float()
        assert not bool((found_t == scorer.index.n_items).any())  # (else it scores every item)
        pool_t = sorted(set(found_t[0].tolist()) - set(history))
        assert set(thompson["items"]) <= set(pool_t) and len(set(thompson["items"])) == 10
        p_t = torch.softmax(sampled[pool_t] / t, dim=0).double()
        chosen = p_t[[pool_t.index(i) for i in thompson["items"]]]
        given = (chosen / (1 - (torch.cumsum(chosen, 0) - chosen))).tolist()
        assert thompson["propensities"] == pytest.approx(given, rel=1e-3)
        assert thompson["scores"] == pytest.approx(mean[thompson["items"]].tolist(), abs=1e-4)
    # a new user: drawn among the 50 best of every item by the empty history's scores and the popularity
    # prior, formed once
    with torch.inference_mode():
        tokens, lengths = pad_histories([[]], scorer.model.cfg.max_len)
        empty = scorer.model.scores_from_state(
            scorer.model.user_state(tokens, lengths, scorer.items), scorer.items
        )
        prior = empty[0].float() + scorer.popularity
    cold_pool = torch.topk(prior, 50).indices.tolist()
    p_cold = torch.softmax(prior[cold_pool], dim=0).double()
    for seed in range(2):
        cold = scorer.score_requests([{"history": [], "k": 10, "seed": seed}])[0]
        assert cold["cold_start"] and cold["strategy"] == "boltzmann" and set(cold["items"]) <= set(cold_pool)
        chosen = p_cold[[cold_pool.index(i) for i in cold["items"]]]
        given = (chosen / (1 - (torch.cumsum(chosen, 0) - chosen))).tolist()
        assert cold["propensities"] == pytest.approx(given, rel=1e-3)
    new = scorer.model.n_items
    with torch.inference_mode():
        scorer.model.add_items(scorer.model.item_text_embeddings()[:1].clone())  # as POST /items does
        scorer._refresh_items()
        ids, pooled, _ = scorer._pools(state, [req])[0]
    assert ids[-1] == new  # the added item is in every pool, scored as the model scores it
    assert pooled[-1] == pytest.approx(float(scorer.model.scores_from_state(state, scorer.items)[0, new]))


def test_cold_start_user_gets_an_explored_popular_list(app):
    c = app["client"]
    body = c.post("/recommend", json={"user": "brand-new", "history": [], "k": 10}).json()
    assert body["cold_start"] and body["strategy"] == "boltzmann"
    assert all(0 < it["propensity"] < 1 for it in body["items"])
    # a mode the request names is the one used: greedy, the same list every time
    asked = [
        c.post("/recommend", json={"history": [], "k": 10, "exploration": "greedy"}).json() for _ in range(3)
    ]
    assert all(a["cold_start"] and a["strategy"] == "greedy" for a in asked)
    assert all(
        [it["item_id"] for it in a["items"]] == [it["item_id"] for it in asked[0]["items"]] for a in asked
    )


def test_feedback_changes_next_answer_on_another_replica_and_is_logged(app):
    c = app["client"]
    user = "7"  # a logged user: the click extends their logged history
    first = c.post("/recommend", json={"user": user, "k": 10}).json()
    clicked = first["items"][3]["item_id"]
    r = c.post("/feedback", json={"request_id": first["request_id"], "item_id": clicked, "reward": 1.0})
    assert r.status_code == 200 and r.json()["live_history_extended"], r.text
    # the live history now holds the click: by user id alone, on whichever replica answers
    replicas = set()
    for _ in range(30):
        again = c.post("/recommend", json={"user": user, "k": 10}).json()
        replicas.add(again["served_by"]["ingress"])
        assert clicked not in [it["item_id"] for it in again["items"]]  # consumed: excluded
        assert [it["item_id"] for it in again["items"]] != [it["item_id"] for it in first["items"]]
        if len(replicas) == 2:
            break
    assert len(replicas) == 2, "requests never reached the second ingress replica"
    assert first["served_by"]["ingress"] in replicas
    # ...and those answers came from the replicas' mirrors of the live state, not from a store read
    seen = {}
    for _ in range(20):
        h = c.get("/healthz").json()
        seen[h["ingress"]] = h["live_state"]
    assert len(seen) == 2 and all(s["mirror_trusted"] and s["applied_change"] >= 1 for s in seen.values())


def test_items_added_from_text_are_found_by_query(app):
    c = app["client"]
    text = "Quantum Platypus Detectives (2031) | Animation|Mystery"
    before = c.get("/healthz").json()
    assert before["items"] == before["catalog_items"]
    r = c.post("/items", json={"item_id": "qpd-2031", "text": text})
    assert r.status_code == 201, r.text
    for _ in range(4):  # every replica's scorer counts the new item before any request scored with it
        h = c.get("/healthz").json()
        assert h["items"] == h["catalog_items"] == before["catalog_items"] + 1, h
    assert c.post("/items", json={"item_id": "qpd-2031", "text": text}).status_code == 409
    for _ in range(4):  # every replica knows it
        q = c.post("/query", json={"text": "platypus detectives animated mystery", "k": 5}).json()
        assert q["items"][0]["item_id"] == "qpd-2031"
    rec = c.post("/recommend", json={"history": ["qpd-2031"], "k": 3}).json()
    assert len(rec["items"]) == 3


def test_query_matches_text(app):
    c = app["client"]
    q = c.post("/query", json={"text": "Star Wars", "k": 10}).json()
    assert any("Star Wars" in it["text"] for it in q["items"][:3])


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("/recommend", {"user": "no-such-user"}, 404, "unknown user"),
        ("/recommend", {"history": ["50", "nope"]}, 422, "unknown item ids"),
        ("/recommend", {"user": "196", "k": 0}, 422, "k"),
        ("/recommend", {"user": "196", "k": 100000}, 422, "exceeds the catalogue"),
        ("/recommend", {"user": "196", "k": "ten"}, 422, "k"),
        ("/recommend", {"user": "196", "exploration": "ucb2"}, 422, "greedy"),
        ("/recommend", {"user": "196", "colour": "red"}, 422, "colour"),
        ("/recommend", {}, 422, "history"),
        ("/feedback", {"request_id": "abc", "item_id": "50", "reward": 1}, 404, "request_id"),
        ("/feedback", {"request_id": "abc", "item_id": "50"}, 422, "reward"),
        ("/items", {"item_id": "50", "text": "Dup"}, 409, "exists"),
        ("/items", {"item_id": "x", "text": ""}, 422, "text"),
        (
            "/items",
            {"item_id": "x", "text": "   "},
            422,
            "text: Value error, must contain more than whitespace",
        ),
        ("/items", {"item_id": " ", "text": "A film"}, 422, "item_id: Value error, must contain more than"),
        ("/query", {"text": ""}, 422, "text"),
        ("/query", {"text": " \t "}, 422, "text: Value error, must contain more than whitespace"),
    ],
)
def test_bad_input_gets_a_4xx_that_says_what_to_send(app, path, body, status, says):
    r = app["client"].post(path, json=body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_malformed_and_oversized_bodies(app):
    """Every refusal in the app's shape ({"error": ...}), saying what is wrong and what to send."""
    c = app["client"]
    json_type = {"content-type": "application/json"}
    r = c.post("/recommend", content=b'{"user": "196", "k": }', headers=json_type)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(
        "the request body is not valid JSON (Expecting value at character 21)"
    )
    r = c.post("/recommend", content='{"user": "Zoë"}'.encode("latin-1"), headers=json_type)
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"] and "UTF-8 encoded JSON" in r.json()["error"]
    r = c.post("/recomend", json={"user": "196"})
    assert r.status_code == 404 and "POST /recommend" in r.json()["error"]
    r = c.get("/recommend")
    assert r.status_code == 405 and list(r.json()) == ["error"]
    big = {"history": ["50"] * 100_000}
    r = c.post("/recommend", content=json.dumps(big).encode(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert c.get("/healthz").status_code == 200  # nothing crashed


def test_feedback_not_shown_item_is_refused(app):
    c = app["client"]
    rec = c.post("/recommend", json={"user": "196", "k": 3}).json()
    shown = {it["item_id"] for it in rec["items"]}
    other = next(i for i in ("1", "2", "3", "4", "5") if i not in shown)
    r = c.post("/feedback", json={"request_id": rec["request_id"], "item_id": other, "reward": 1})
    assert r.status_code == 422 and "not shown" in r.json()["error"]


def test_the_web_page_in_a_headless_browser(app, tmp_path):
    """The page at / in a real headless Chromium (Debian's, driven by Selenium): the endpoint's model
    version shown, a user's list with explanations, a click that changes the next list, a question in words
    answered, an item added from its text."""
    import shutil

    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    # the list is re-rendered under a waiting check now and then: read it again
    wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))

    def listed() -> list[str]:
        return [li.get_attribute("data-item-id") for li in driver.find_elements(By.CSS_SELECTOR, "#items li")]

    def type_into(element_id: str, text: str) -> None:
        box = driver.find_element(By.ID, element_id)
        box.clear()
        box.send_keys(text)

    try:
        driver.get(str(app["client"].base_url) + "/")
        version = app["client"].get("/healthz").json()["model_version"]
        wait.until(lambda d: d.find_element(By.ID, "model-version").text == version)
        type_into("user", "196")
        driver.find_element(By.ID, "recommend").click()
        wait.until(lambda d: len(listed()) == 10)
        first = listed()
        rows = driver.find_elements(By.CSS_SELECTOR, "#items li")
        assert all("because:" in li.text for li in rows), [li.text for li in rows]
        rows[0].find_element(By.CSS_SELECTOR, "button.click").click()
        wait.until(lambda d: "clicked" in d.find_element(By.ID, "who").text and listed() != first)
        second = listed()
        assert first[0] not in second and len(second) == 10  # the clicked item joined the history
        type_into("query", "an animated film for children")
        driver.find_element(By.ID, "ask").click()
        wait.until(lambda d: len(listed()) == 10 and listed() != second)
        type_into("new-id", "page-item-1")
        type_into("new-text", "Robots of the Red Planet (2031) | Adventure|Sci-Fi")
        driver.find_element(By.ID, "add").click()
        wait.until(lambda d: "added page-item-1" in d.find_element(By.ID, "added").text)
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()


def test_zz_feedback_flushed_on_stop_and_read_by_prepare(app, tmp_path):
    """Runs last in the module: stops the app cleanly, then the feedback is on disk for jobs.prepare."""
    import subprocess
    import sys

    c = app["client"]
    sent = []
    for i in range(5):
        rec = c.post("/recommend", json={"user": "196", "k": 5, "exploration": "boltzmann"}).json()
        item = rec["items"][i % 5]
        c.post("/feedback", json={"request_id": rec["request_id"], "item_id": item["item_id"], "reward": 1.0})
        sent.append((rec["request_id"], item["item_id"], item["propensity"]))
    # Boltzmann answers for 40 users' histories, the first item clicked in every other one: the impression
    # log must let the offline policy reproduce each logged propensity (so off-policy estimates are sound)
    from rec_rllib.data.dataset import LogDataset

    dataset = LogDataset.load(app["dataset"])
    inter = dataset.interactions
    ids = dataset.items["item_id"].astype(str).to_numpy()
    explored, firsts, clicked = {}, {}, set()
    for user in sorted(inter["user_idx"].unique())[:40]:
        hist = ids[inter.loc[inter["user_idx"] == user, "item_idx"].to_numpy()[:30]].tolist()
        rec = c.post(
            "/recommend", json={"history": hist, "k": 3, "exploration": "boltzmann", "temperature": 0.5}
        )
        body = rec.json()
        explored[body["request_id"]] = body["items"][0]["propensity"]
        firsts[body["request_id"]] = body["items"][0]["item_id"]
        if len(explored) % 2:
            clicked.add(body["request_id"])
            c.post(
                "/feedback",
                json={"request_id": body["request_id"], "item_id": firsts[body["request_id"]], "reward": 1.0},
            )
    app["stop"]()  # a clean stop flushes every replica's buffer
    assert not list(
        Path(app["feedback_dir"]).glob(".journal-*")
    )  # closed cleanly: journals folded into parts
    logged = set(read_impressions(app["feedback_dir"]).column("request_id").to_pylist())
    assert set(explored) <= logged  # every answer is in the impression log after a clean stop
    # an item added at run time (test_items_added_...) may come first in a Boltzmann answer: the first-slot
    # log over the dataset's catalogue leaves such answers out, so the check below does too
    catalogue = set(ids)
    explored = {rid: p for rid, p in explored.items() if firsts[rid] in catalogue}
    assert len(explored) >= 35
    _off_policy_on_the_serve_log(app, dataset, explored, len(clicked & set(explored)), tmp_path)
    table = read_feedback(app["feedback_dir"]).to_pylist()
    logged = {(r["request_id"], r["item_id"]): r for r in table}
    for request_id, item_id, propensity in sent:
        row = logged[(request_id, item_id)]
        assert row["propensity"] == pytest.approx(propensity) and row["strategy"] == "boltzmann"
    assert not list(Path(app["feedback_dir"]).glob(".*.tmp"))

    out = tmp_path / "fb-ds"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.prepare",
            "--dataset",
            "feedback",
            "--feedback-dir",
            str(app["feedback_dir"]),
            "--base",
            app["dataset"],
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    # a user the base log does not know (here: each history-only answer's anonymous user) starts with the
    # history the policy saw at their first event
    first_of = {}
    for r in sorted(table, key=lambda r: r["timestamp_ms"]):
        first_of.setdefault(r["user_id"] or "anon-" + r["request_id"], r)
    known_users = set(dataset.users["user_id"].astype(str))
    lead = sum(
        len([i for i in r["history"] if i in catalogue]) for u, r in first_of.items() if u not in known_users
    )
    assert lead > 0
    assert manifest["counts"]["interactions"] == 100_000 + len(table) + lead
    assert manifest["source"]["feedback_rows"] == len(table)
    time.sleep(0)


def _off_policy_on_the_serve_log(app, dataset, explored: dict[str, float], n_clicked: int, tmp_path) -> None:
    """Every answer is in the impression log; for the Boltzmann answers above, the served model evaluated
    offline at the same temperature gives each logged first pick exactly its logged propensity (weights 1),
    so IPS of that policy equals the logged mean reward; jobs.evaluate reports the greedy policy's value."""
    import subprocess
    import sys

    import numpy as np

    from rec_rllib.eval import ope
    from rec_rllib.eval.servelog import first_slot_log
    from rec_rllib.models import load_recommender

    served = first_slot_log(app["feedback_dir"], dataset)
    rows = [i for i, rid in enumerate(served.request_ids) if rid in explored]
    assert len(rows) == len(explored)
    fb = served.feedback.subset(np.asarray(rows))
    assert fb.pscore.tolist() == pytest.approx([explored[served.request_ids[i]] for i in rows])
    assert fb.reward.sum() == n_clicked
    rec = load_recommender(app["finetuned_run"], dataset)
    pi = ope.recommender_action_dist(
        rec, [served.histories[i] for i in rows], k=1, strategy="boltzmann", temperature=0.5
    )
    weights = pi[np.arange(fb.n), fb.action, 0] / fb.pscore
    assert np.allclose(weights, 1.0, atol=2e-3), weights
    assert ope.point_estimate("ips", fb, pi) == pytest.approx(fb.on_policy_value(), rel=2e-3)
    # a log longer than max_rounds: a seeded uniform subset of its answers, the rest counted
    cap = served.feedback.n // 2
    sub = first_slot_log(app["feedback_dir"], dataset, max_rounds=cap)
    assert sub.feedback.n == len(sub.request_ids) == len(sub.histories) == cap
    assert sub.dropped["not_sampled"] == served.feedback.n - cap and "not_sampled" not in served.dropped
    full = {rid: i for i, rid in enumerate(served.request_ids)}
    rows = np.array([full[rid] for rid in sub.request_ids])
    assert np.all(np.diff(rows) > 0)  # a subset, in log order, each answer with its own action and propensity
    assert np.array_equal(sub.feedback.action, served.feedback.action[rows])
    assert np.array_equal(sub.feedback.pscore, served.feedback.pscore[rows])
    assert first_slot_log(app["feedback_dir"], dataset, max_rounds=cap).request_ids == sub.request_ids

    out = tmp_path / "ope-serve"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.evaluate",
            "--dataset",
            app["dataset"],
            "--models",
            app["finetuned_run"],
            "popularity",
            "--ope-serve-log",
            str(app["feedback_dir"]),
            "--out",
            str(out),
            "--split",
            "valid",
            "--ks",
            "10",
            "--ope-max-rounds",
            str(served.feedback.n),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "ope_serve_log.json").read_text())
    # the whole log (a subset of its 40-odd answers could leave a greedy target no match: SNIPS undefined)
    assert res["rounds"] == res["max_rounds"] == served.feedback.n and res["strategy"] == "greedy"
    assert "not_sampled" not in res["dropped"]
    for target in res["results"].values():
        for est in target.get("estimates", {}).values():
            assert np.isfinite(est["value"]) and est["low"] <= est["value"] <= est["high"]
    assert "Off-policy estimates on the Serve log" in (out / "report.md").read_text()


def test_live_state_mirrors_are_current_before_a_writer_returns():
    """The replication protocol of serving.state, on one event loop: a writer's wait_synced returns once
    every polling replica has applied its change; a replica that stopped polling is waited for only until
    its lease runs out, and by then it no longer trusts its mirror."""
    import asyncio

    from serving.state import LEASE_S, LiveState, SessionMirror

    async def scenario() -> None:
        store = LiveState(max_users=2)
        store.log_impressions([("r1", {"user_id": "u1", "shown": ["50", "51"]})])
        live, stalled = SessionMirror(), SessionMirror()

        async def replica(name: str, mirror: SessionMirror, stop: asyncio.Event) -> None:
            while not stop.is_set():
                sent = asyncio.get_running_loop().time()
                answer = await store.poll(name, mirror.seq, timeout_s=0.05)
                mirror.apply(answer, sent)

        stop_live, stop_stalled = asyncio.Event(), asyncio.Event()
        tasks = [
            asyncio.create_task(replica("live", live, stop_live)),
            asyncio.create_task(replica("stalled", stalled, stop_stalled)),
        ]
        await asyncio.sleep(0.1)
        assert live.trusted() and stalled.trusted() and live.session("u1") == []

        out = await store.feedback("r1", "51", 1.0)
        assert await store.wait_synced(out["seq"])  # both replicas acknowledged
        assert live.session("u1") == ["51"] and stalled.session("u1") == ["51"]

        stop_stalled.set()  # this replica stops polling (a stalled or dead process)
        await asyncio.sleep(0.1)
        # feedback via an impression only the answering replica holds (not yet in the store)
        imp = {"user_id": "u1", "shown": ["52"]}
        out = await store.feedback("r2", "52", 1.0, imp)
        t0 = asyncio.get_running_loop().time()
        assert not await store.wait_synced(out["seq"])  # gave up on the stalled replica...
        assert asyncio.get_running_loop().time() - t0 <= LEASE_S + 0.5
        assert live.session("u1") == ["51", "52"]
        assert stalled.session("u1") == ["51"] and not stalled.trusted()  # ...whose mirror is distrusted

        # eviction (max_users=2) reaches the mirrors too; a negative reward changes nothing
        for user in ("u2", "u3"):
            store.log_impressions([(f"r-{user}", {"user_id": user, "shown": ["60"]})])
            out = await store.feedback(f"r-{user}", "60", 1.0)
        assert await store.wait_synced(out["seq"])
        assert live.session("u1") == [] and live.session("u3") == ["60"]
        assert (await store.feedback("r-u3", "60", 0.0))["seq"] is None

        # a replica that joins late (or lags past the change log) starts from a snapshot
        late = SessionMirror()
        late.apply(await store.poll("late", late.seq), asyncio.get_running_loop().time())
        assert late.session("u3") == ["60"] and late.session("u2") == ["60"]
        stop_live.set()
        await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_feedback_journal_survives_a_killed_writer(tmp_path):
    """An acknowledged event is in the writer's journal before append returns; after the writer's process
    is killed (SIGKILL, nothing flushed), the next reader recovers it into a part file, exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    from rec_rllib.data.feedback import SCHEMA

    row = {name: None for name in SCHEMA.names} | {"request_id": "r", "item_id": "50", "reward": 1.0}
    script = textwrap.dedent(f"""
        import sys, time
        from serving.feedback import FeedbackLog
        log = FeedbackLog({str(tmp_path)!r}, max_rows=10_000, max_seconds=3600)
        for i in range(25):
            log.append({{**{row!r}, "request_id": f"r{{i}}"}})
        print("acknowledged", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "acknowledged"
        assert not list(tmp_path.glob("part-*.parquet"))  # nothing flushed yet
        os.kill(proc.pid, signal.SIGKILL)  # the process this test started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    ids = read_feedback(tmp_path).column("request_id").to_pylist()
    assert sorted(ids) == sorted(f"r{i}" for i in range(25))
    assert read_feedback(tmp_path).num_rows == 25  # recovered once, not again
    assert not list(tmp_path.glob(".journal-*")) and not list(tmp_path.glob(".recovering*"))
