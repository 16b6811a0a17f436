"""The Serve app over a generated catalogue of 100,000 items, over real HTTP on 127.0.0.1: recommendations
with propensities, a natural-language query, feedback that moves the next answer, an item added from text."""

from __future__ import annotations

import json

import httpx
import pytest
import ray

from tests.conftest import free_port

N_ITEMS = 100_000


@pytest.fixture(scope="module")
def large_catalogue(tmp_path_factory) -> dict:
    """A generated log (1,500 users) over 100,000 items with item text, prepared as a custom dataset, and a
    small model fine-tuned on it for a few seconds (the sampled softmax: what a catalogue this size gets)."""
    from rec_rllib.columns import Col
    from rec_rllib.data import ColumnMapping, load_custom
    from rec_rllib.data.synthetic import generate
    from rec_rllib.finetune import FinetuneConfig, finetune
    from rec_rllib.models.seqrec import ModelConfig

    root = tmp_path_factory.mktemp("catalogue-100k")
    log = generate(n_users=1_500, n_items=N_ITEMS, seed=3)
    inter, items = log.write(root / "raw")
    ds = load_custom(inter, ColumnMapping(reward="rating", item_text="text"), items=items, name="gen-100k")
    assert ds.n_items == N_ITEMS
    data_dir = ds.save(str(root / "data"))
    model = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=30, dropout=0.1)
    result = finetune(
        ds,
        model,
        FinetuneConfig(epochs=1, batch_size=128, lr=3e-3, warmup_steps=10, max_minutes=0.5, progress=False),
        root / "run",
    )
    assert result.stopped_by in ("epochs", "budget")
    assert json.loads((root / "run" / "config.json").read_text())["loss"] == "sampled"  # this size's default
    busiest = int(ds.interactions[Col.USER_IDX].value_counts().index[0])
    user = str(ds.users.set_index(Col.USER_IDX).loc[busiest, Col.USER_ID])
    return {"run": str(root / "run"), "data": data_dir, "user": user}


@pytest.fixture(scope="module")
def client(large_catalogue, tmp_path_factory):
    from jobs.serve import start, stop

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        url = start(
            {
                "model": large_catalogue["run"],
                "dataset": large_catalogue["data"],
                "feedback_dir": str(tmp_path_factory.mktemp("feedback")),
            },
            free_port(),
        )
        with httpx.Client(base_url=url, timeout=120) as c:
            yield c
    finally:
        try:
            stop()
        finally:
            ray.shutdown()


@pytest.mark.slow
def test_a_catalogue_of_100_000_items_is_served_over_http(client, large_catalogue):
    health = client.get("/healthz").json()
    assert health["items"] == N_ITEMS, health
    # a known user's lists come from the item index's pool (auto: from 50,000 items on)
    assert health["retrieval"] == {
        "search": "ivf",
        "pool": 512,
        "clusters": 1265,
        "clusters_read": 32,
        "indexed_items": N_ITEMS,
    }, health
    user = large_catalogue["user"]
    greedy = client.post("/recommend", json={"user": user, "k": 10}).json()
    assert len(greedy["items"]) == 10 and all(it["propensity"] == 1.0 for it in greedy["items"])
    scores = [it["score"] for it in greedy["items"]]
    assert scores == sorted(scores, reverse=True)
    again = client.post("/recommend", json={"user": user, "k": 10}).json()
    assert [it["item_id"] for it in again["items"]] == [it["item_id"] for it in greedy["items"]]

    explored = client.post(
        "/recommend", json={"user": user, "k": 10, "exploration": "boltzmann", "temperature": 1.0}
    ).json()
    props = [it["propensity"] for it in explored["items"]]
    assert len(set(it["item_id"] for it in explored["items"])) == 10 and all(0 < p <= 1 for p in props)

    query = client.post("/query", json={"text": "The quiet harbour", "k": 5})
    assert query.status_code == 200, query.text
    assert len(query.json()["items"]) == 5

    # a click extends the user's live history: the next answer is computed from it
    clicked = greedy["items"][0]["item_id"]
    fb = client.post(
        "/feedback", json={"request_id": greedy["request_id"], "item_id": clicked, "reward": 1.0}
    )
    assert fb.status_code == 200, fb.text
    after = client.post("/recommend", json={"user": user, "k": 10}).json()
    assert after["session_items"] == 1 and clicked not in [it["item_id"] for it in after["items"]]

    # an item added from its text joins the catalogue of every replica
    added = client.post("/items", json={"item_id": "new-1", "text": "The quiet harbour 7 | sea boats rain"})
    assert added.status_code in (200, 201), added.text
    assert client.get("/healthz").json()["items"] == N_ITEMS + 1
    after = client.post("/recommend", json={"user": user, "k": 10}).json()  # the added item is scored too
    assert len(after["items"]) == 10
