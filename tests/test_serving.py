"""The Serve app over real HTTP on 127.0.0.1: every endpoint, bad input, feedback loop, live adaptation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import ray

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
            yield {"client": client, "feedback_dir": feedback_dir, "dataset": ml_dir, "stop": stop}
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
    assert all(it["propensity"] == 1.0 for it in body["items"])  # greedy
    assert all(it["because"] and it["because"][0]["text"] for it in body["items"])
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_exploration_reports_propensities(app):
    c = app["client"]
    for mode, extra in (("epsilon", {"epsilon": 0.5}), ("boltzmann", {"temperature": 2.0})):
        body = c.post("/recommend", json={"user": "196", "k": 10, "exploration": mode, **extra}).json()
        props = [it["propensity"] for it in body["items"]]
        assert body["strategy"] == mode and all(0 < p <= 1 for p in props)
        assert any(p < 1 for p in props)
        if mode == "epsilon":  # first position: best item w.p. 1 - eps + eps/n, else eps/n
            assert props[0] > 0.5 or props[0] < 0.01


def test_cold_start_user_gets_an_explored_popular_list(app):
    c = app["client"]
    body = c.post("/recommend", json={"user": "brand-new", "history": [], "k": 10}).json()
    assert body["cold_start"] and body["strategy"] == "boltzmann"
    assert all(0 < it["propensity"] < 1 for it in body["items"])


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


def test_items_added_from_text_are_found_by_query(app):
    c = app["client"]
    text = "Quantum Platypus Detectives (2031) | Animation|Mystery"
    r = c.post("/items", json={"item_id": "qpd-2031", "text": text})
    assert r.status_code == 201, r.text
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
        ("/query", {"text": ""}, 422, "text"),
    ],
)
def test_bad_input_gets_a_4xx_that_says_what_to_send(app, path, body, status, says):
    r = app["client"].post(path, json=body)
    assert r.status_code == status, r.text
    assert says in r.json()["error"]


def test_malformed_and_oversized_bodies(app):
    c = app["client"]
    r = c.post("/recommend", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
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
    app["stop"]()  # a clean stop flushes every replica's buffer
    assert not list(
        Path(app["feedback_dir"]).glob(".journal-*")
    )  # closed cleanly: journals folded into parts
    table = read_feedback(app["feedback_dir"]).to_pylist()
    logged = {(r["request_id"], r["item_id"]): r for r in table}
    for request_id, item_id, propensity in sent:
        row = logged[(request_id, item_id)]
        assert row["propensity"] == pytest.approx(propensity) and row["strategy"] == "boltzmann"
    assert not list(Path(app["feedback_dir"]).glob(".*.tmp"))

    out = tmp_path / "fb-ds"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "--dataset", "feedback", "--feedback-dir",
         str(app["feedback_dir"]), "--base", app["dataset"], "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["interactions"] == 100_000 + len(table)
    assert manifest["source"]["feedback_rows"] == len(table)
    time.sleep(0)


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
