"""The closed loop: the ledger takes every acknowledged feedback event once, in order; a warm start carries
weights over by item id; the gate refuses a worse candidate and accepts a better one; one full round on a
real Serve app over HTTP, and a restart that resumes from the ledger."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from rec_rllib.loop.gate import GateConfig, decide
from rec_rllib.loop.ledger import Ledger, new_parts, read_parts
from tests.conftest import REPO, free_port, stop_group


def _row(i: int, t: int) -> dict:
    return {
        "request_id": f"r{i}",
        "timestamp_ms": t,
        "user_id": f"u{i % 3}",
        "history": ["1", "2"],
        "shown": [str(10 + i)],
        "shown_propensities": [1.0],
        "item_id": str(10 + i),
        "item_text": "x",
        "position": 0,
        "propensity": 1.0,
        "reward": 1.0,
        "model_version": "v1",
        "strategy": "greedy",
    }


def test_the_ledger_takes_every_acknowledged_event_once_in_order(tmp_path):
    """Rounds take the parts written since the last one (a killed writer's journal recovered into a part),
    each event once, ordered by time; a round that did not finish leaves the ledger unchanged, so the next
    start takes the same events again."""
    from serving.feedback import FeedbackLog

    fb = tmp_path / "fb"
    writer = FeedbackLog(fb, max_rows=3, max_seconds=60)
    for i in range(7):  # parts of 3, 3, and 1 buffered event
        writer.append(_row(i, 1_000 + 10 * (6 - i)))  # later rows carry earlier times: order is by time
    # a writer killed after acknowledging two events (journaled, never flushed)
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys, json\n"
            "from serving.feedback import FeedbackLog\n"
            f"w = FeedbackLog({str(fb)!r}, max_rows=100, max_seconds=60)\n"
            f"for row in json.loads(sys.argv[1]): w.append(row)\n"
            "os._exit(0)\n",
            json.dumps([_row(100, 5_000), _row(101, 5_001)]),
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        check=True,
    )
    assert killed.returncode == 0
    ledger = Ledger.load_or_start(tmp_path / "loop", "model")
    first = read_parts(new_parts(fb, ledger.taken))
    assert list(first["request_id"]) == [f"r{i}" for i in (5, 4, 3, 2, 1, 0)] + ["r100", "r101"]
    assert first["timestamp_ms"].is_monotonic_increasing
    # the round did not finish: nothing recorded, the same events come again
    assert list(read_parts(new_parts(fb, ledger.taken))["request_id"]) == list(first["request_id"])
    ledger.taken += sorted(set(first["_part"]))
    ledger.rounds = 1
    ledger.save(tmp_path / "loop")
    writer.close()  # the buffered seventh event lands in a new part
    for i in range(7, 9):
        writer = FeedbackLog(fb, max_rows=1, max_seconds=60)
        writer.append(_row(i, 9_000 + i))
    resumed = Ledger.load_or_start(tmp_path / "loop", "other")
    assert (resumed.rounds, resumed.served_model) == (1, "model")
    second = read_parts(new_parts(fb, resumed.taken))
    assert list(second["request_id"]) == ["r6", "r7", "r8"]
    every = pd.concat([first, second])["request_id"]
    assert sorted(every) == sorted([f"r{i}" for i in range(9)] + ["r100", "r101"])  # each once


def test_a_corrupt_ledger_is_refused_with_its_path(tmp_path):
    (tmp_path / "loop_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="loop_state.json: not a loop ledger"):
        Ledger.load_or_start(tmp_path, "m")


def test_a_warm_start_carries_weights_over_by_item_id(tmp_path):
    """A catalogue that gained an item and changed its order (ids sort lexically once one is not a number):
    each known item's id embedding and bias follow its id, the new item keeps its fresh row, every other
    weight is copied."""
    import torch

    from rec_rllib.models.run import save_run, warm_start
    from rec_rllib.models.seqrec import OFFSET, ModelConfig, TextSeqRec

    cfg = ModelConfig(text_model=None, hidden_size=8, num_layers=1, num_heads=2, max_len=5)
    old_ids = ["2", "10", "33"]
    old = TextSeqRec(cfg, len(old_ids))
    with torch.no_grad():
        for p in old.parameters():
            p.normal_()
    save_run(tmp_path / "run", old, {"item_ids": old_ids})
    new_ids = ["10", "2", "33", "new"]
    new = TextSeqRec(cfg, len(new_ids))
    fresh_row = new.id_embedding.weight[OFFSET + 3].detach().clone()
    carried = warm_start(new, tmp_path / "run", new_ids)
    assert carried == {"carried_items": 3, "new_items": 1}
    for j, iid in enumerate(new_ids[:3]):
        i = old_ids.index(iid)
        assert torch.equal(new.id_embedding.weight[OFFSET + j], old.id_embedding.weight[OFFSET + i])
        assert new.bias[j] == old.bias[i]
    assert torch.equal(new.id_embedding.weight[OFFSET + 3], fresh_row)
    assert torch.equal(new.id_embedding.weight[:OFFSET], old.id_embedding.weight[:OFFSET])
    for (name, a), (_, b) in zip(new.named_parameters(), old.named_parameters(), strict=True):
        if name not in ("id_embedding.weight", "bias"):
            assert torch.equal(a, b), name
    wider = TextSeqRec(ModelConfig(text_model=None, hidden_size=16, num_layers=1, num_heads=2, max_len=5), 4)
    with pytest.raises(ValueError, match="cannot warm-start from a model of another shape"):
        warm_start(wider, tmp_path / "run", new_ids)


def test_simulated_users_click_their_future_and_move_on_without_a_click(ml100k):
    """A simulated user arrives with the first half of their log, clicks the highest-placed item of their
    future, and after a visit without a click consumes their next logged item (their history moves on);
    nothing is clicked or consumed twice, and a user whose future is spent is done."""
    from rec_rllib.loop.population import population

    user = population(ml100k, ["196"], prefix=0.5)[0]
    arrived, ahead = list(user.history), list(user.ahead)
    assert user.uid == "sim-196" and len(arrived) + len(ahead) <= 39  # user 196 rated 39 films
    assert ahead and not set(arrived) & set(ahead)
    assert user.click(["no-such-item", ahead[3], ahead[1]]) == (1, ahead[3])
    assert user.click([ahead[3]]) is None  # clicked already: no click, so they consume their next item
    assert user.history == [*arrived, ahead[0]] and ahead[0] not in user.future
    user.click([])
    user.click([])  # ahead[1], then ahead[3] is skipped (clicked), then ahead[2]
    assert user.history == [*arrived, ahead[0], ahead[1], ahead[2]]
    while not user.done:
        user.click([])
    assert sorted(user.history[len(arrived) :] + user.clicked) == sorted(ahead)
    assert population(ml100k, 5, seed=1)[0].uid == population(ml100k, 5, seed=1)[0].uid


def test_the_gate_needs_enough_events_and_an_interval_above_the_margin():
    rng = np.random.default_rng(0)
    served = rng.random(400)
    cfg = GateConfig(min_events=30)
    assert decide(served, served + 0.05, cfg).roll
    worse = decide(served, served - 0.05, cfg)
    assert not worse.roll and worse.reason.startswith("kept: the candidate is worse")
    noisy = decide(served, served + rng.normal(0, 0.5, 400), cfg)
    assert not noisy.roll and noisy.low < 0 < noisy.high and "not shown better" in noisy.reason
    few = decide(served[:10], served[:10] + 1, cfg)
    assert not few.roll and "fewer than the 30" in few.reason
    assert not decide(served, served + 0.05, GateConfig(margin=0.1)).roll


def _good_and_shuffled(finetuned_run: str):
    """The fine-tuned model and a copy whose item rows are shuffled (as if trained on shuffled items)."""
    import torch

    from rec_rllib.models.run import TransformerRecommender, load_run

    model, meta = load_run(finetuned_run)
    item_ids = [str(i) for i in meta["item_ids"]]
    shuffled_model, _ = load_run(finetuned_run)
    perm = torch.as_tensor(np.random.default_rng(1).permutation(len(item_ids)))
    with torch.no_grad():
        shuffled_model.id_embedding.weight[2:] = shuffled_model.id_embedding.weight[2:][perm]
        shuffled_model.bias.copy_(shuffled_model.bias[perm])
        shuffled_model.text_embeddings.copy_(shuffled_model.text_embeddings[perm])
    return TransformerRecommender(model), TransformerRecommender(shuffled_model), item_ids


def test_the_gate_refuses_a_shuffled_candidate_and_accepts_the_better_model(finetuned_run, ml100k):
    """Constructed logs over real MovieLens-100K histories: each user clicks what the fine-tuned model ranks
    first. A candidate whose item rows are shuffled (trained on shuffled items) is refused against it; in
    the other direction the fine-tuned model, as the candidate, is accepted."""
    from rec_rllib.columns import Col
    from rec_rllib.loop.judge import ranked_clicks

    good, shuffled, item_ids = _good_and_shuffled(finetuned_run)
    cases = ml100k.eval_cases("loo", "test")
    histories = [h[-20:] for h in cases.histories[:200]]
    top = good.recommend(histories, 1).items[:, 0]
    clicks = pd.DataFrame(
        {
            "history": [[item_ids[i] for i in h] for h in histories],
            "item_id": [item_ids[i] for i in top],
        }
    )
    assert (ml100k.items[Col.ITEM_ID].astype(str).tolist()) == item_ids
    cfg = GateConfig()
    g = ranked_clicks(good, item_ids, clicks)[cfg.metric]
    s = ranked_clicks(shuffled, item_ids, clicks)[cfg.metric]
    assert g.mean() == 1.0 and s.mean() < 0.5
    refused = decide(served=g, candidate=s, cfg=cfg)
    assert not refused.roll and refused.reason.startswith("kept: the candidate is worse")
    accepted = decide(served=s, candidate=g, cfg=cfg)
    assert accepted.roll and accepted.reason.startswith("rolled")


def test_the_off_policy_gate_refuses_a_shuffled_candidate_and_accepts_the_better_model(finetuned_run, ml100k):
    """A constructed exploration log over real MovieLens-100K histories: each answer's first pick drawn
    uniformly among the unseen items (its propensity logged), clicked when it is among the fine-tuned
    model's top 20. Under Boltzmann exploration, the paired SNIPS difference refuses the shuffled candidate
    against the fine-tuned model and accepts the fine-tuned model against the shuffled one; a log with too
    few clicks, or none after the cut, keeps the served model."""
    from rec_rllib.eval.ope import BanditFeedback
    from rec_rllib.eval.servelog import Histories, ServeLog, compare_on_serve_log
    from rec_rllib.loop.gate import decide_ope

    good, shuffled, _ = _good_and_shuffled(finetuned_run)
    rng = np.random.default_rng(4)
    base = [h[-20:] for h in ml100k.eval_cases("loo", "test").histories[:400]]
    histories = [base[i % len(base)] for i in range(8000)]
    liked = good.recommend(histories, 20).items
    action, pscore, reward = [], [], []
    for h, top in zip(histories, liked, strict=True):
        unseen = np.setdiff1d(np.arange(ml100k.n_items), h)
        a = int(rng.choice(unseen))
        action.append(a)
        pscore.append(1.0 / len(unseen))
        reward.append(float(a in set(top.tolist())))
    n = len(action)
    fb = BanditFeedback(
        np.array(action), np.zeros(n, dtype=np.int64), np.array(reward), np.array(pscore), ml100k.n_items, 1
    )
    offsets = np.r_[0, np.cumsum([len(h) for h in histories])].astype(np.int64)
    log = ServeLog(fb, Histories(np.concatenate(histories), offsets), [f"r{i}" for i in range(n)])
    clicks = int(fb.reward.sum())
    assert clicks >= 60
    cfg = GateConfig()
    kw = dict(estimators=("snips",), strategy="boltzmann", temperature=0.3, n_boot=cfg.n_boot)
    refused = decide_ope(compare_on_serve_log(log, shuffled, good, **kw)["snips"], clicks, cfg)
    assert not refused.roll and refused.reason.startswith("kept: the candidate is worse"), refused
    assert refused.served > 0.3 > 0.05 > refused.candidate and refused.answers == n
    accepted = decide_ope(compare_on_serve_log(log, good, shuffled, **kw)["snips"], clicks, cfg)
    assert accepted.roll and accepted.reason.startswith("rolled") and accepted.low > 0, accepted
    few = decide_ope(compare_on_serve_log(log, good, shuffled, **kw)["snips"], 10, cfg)
    assert not few.roll and "fewer than the 30" in few.reason
    none = decide_ope(None, clicks, cfg)
    assert not none.roll and "no answer logged after the training cut" in none.reason


def _loop_command(model: str, dataset: str, out) -> list[str]:
    """``python -m jobs.loop`` serving ``model`` over ``dataset`` into ``out``, on a 2-CPU embedded Ray."""
    job = [sys.executable, "-m", "jobs.loop", "--model", model, "--dataset", dataset, "--out", str(out)]
    return [*job, "--num-cpus", "2"]


@pytest.mark.slow
def test_one_round_end_to_end_on_a_real_endpoint_and_a_restart_resumes(finetuned_run, ml_dir, tmp_path):
    """``jobs.loop`` serves the fine-tuned model; a client asks for lists and clicks over HTTP; the round
    trains on every acknowledged click once, is judged, and (the gate told to accept any candidate) rolls the
    candidate into the endpoint with no failed request; /healthz reports the decision; a restart serves the
    rolled model and starts from the ledger; the simulated population visits it."""
    out, port = tmp_path / "loop", free_port()
    cmd = [
        *_loop_command(finetuned_run, ml_dir, out),
        "--port",
        str(port),
        *"--round-events 60 --rounds 1 --finetune-minutes 0.4 --epochs 2 --gate-min-events 5".split(),
        *"--gate-margin -1 --flush-rows 8 --flush-seconds 0.5 --no-access-log".split(),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def launch(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            args,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    proc = launch(cmd)
    lines: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 300
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                try:
                    if c.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(1)
            first_version = c.get("/healthz").json()["model_version"]
            acknowledged, failures = [], []
            users = ["196", "186", "22", "244", "166"]
            for i in range(60):  # exploring traffic: the gate estimates both models off-policy on it
                r = c.post("/recommend", json={"user": users[i % 5], "k": 5, "exploration": "boltzmann"})
                if r.status_code != 200:
                    failures.append(r.text)
                    continue
                answer = r.json()
                item = answer["items"][i % 3]["item_id"]
                click = {"request_id": answer["request_id"], "item_id": item, "reward": 1}
                f = c.post("/feedback", json=click)
                if f.status_code == 200:
                    acknowledged.append((answer["request_id"], item))
            assert len(acknowledged) == 60 and not failures
            while not (out / "rounds.jsonl").exists():  # the round, its roll; answers keep coming meanwhile
                r = c.post("/recommend", json={"user": "196", "k": 5})
                if r.status_code != 200:
                    failures.append(r.text)
                assert proc.poll() is None or (out / "rounds.jsonl").exists(), proc.stdout.read()
                assert time.time() < deadline + 300
                time.sleep(0.2)
            assert not failures, failures[:3]
        lines = proc.stdout.readlines() if proc.wait(timeout=120) is not None else []
    finally:
        if proc.poll() is None:
            stop_group(proc, signal.SIGINT)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    record = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    ledger = json.loads((out / "loop_state.json").read_text())
    assert record["decision"]["roll"] and ledger["served_model"] == record["candidate_model"]
    # judged off-policy on the answers from the first held-out click on (the 18 held-out of the 60, at least)
    assert record["decision"]["metric"].startswith("SNIPS") and record["decision"]["answers"] >= 18
    assert set(record["ope"]) == {"snips", "dr"} and record["ope_since_ms"] is not None
    assert ledger["rounds"] == 1 and ledger["taken"] == record["parts"]
    # every acknowledged click once: the round's events are exactly them; the trained ones are in its dataset
    taken = read_parts([out / "feedback" / name for name in record["parts"]])
    assert sorted(zip(taken["request_id"], taken["item_id"], strict=True)) == sorted(acknowledged)
    assert record["new_events"] == 60 and record["held_out_events"] == 18 and record["trained_events"] == 42
    assert record["now_serving_version"] != first_version
    assert "| 1 | 60 | 18 |" in (out / "rounds.md").read_text()
    # a restart serves the rolled model and resumes from the ledger
    port2 = free_port()
    cmd2 = [*cmd[: cmd.index("--port") + 1], str(port2), *cmd[cmd.index("--port") + 2 :]]
    cmd2[cmd2.index("--model") + 1] = "/nonexistent-the-ledger-decides"
    again = launch(cmd2)
    try:
        deadline = time.time() + 300
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port2}/healthz", timeout=30).json()
                break
            except httpx.HTTPError:
                assert again.poll() is None and time.time() < deadline, again.stdout.read()
                time.sleep(1)
        assert health["model_version"] == record["now_serving_version"]
        assert health["loop"]["round"] == 1 and health["loop"]["decision"] == "rolled"
        # the simulated population against it, over HTTP: logged users arrive with half their history and
        # click by their own future
        pop = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs.population",
                "--target",
                f"loop=http://127.0.0.1:{port2}",
                "--dataset",
                ml_dir,
                *"--users 6 --minutes 0.25 --concurrency 2 --out".split(),
                str(tmp_path / "pop"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert pop.returncode == 0, pop.stdout[-2000:] + pop.stderr[-2000:]
        summary = json.loads((tmp_path / "pop" / "summary.json").read_text())
        assert summary["errors"] == 0 and summary["loop"]["answers"] >= 12 and summary["loop"]["clicks"] > 0
        assert set(summary["loop"]["ctr_by_model_version"]) == {record["now_serving_version"]}
        assert (tmp_path / "pop" / "ctr.png").stat().st_size > 0
    finally:
        stop_group(again, signal.SIGINT)
    assert again.returncode == 0


@pytest.mark.slow
def test_a_loop_killed_mid_round_loses_nothing_and_the_next_start_redoes_the_round(
    finetuned_run, ml_dir, tmp_path
):
    """SIGKILL to the loop and its embedded Ray while a round trains: no ledger and no round record (the
    served model untouched); the next start runs the round again, over exactly the acknowledged clicks: the
    30 the killed round had taken and the 5 only the killed replica's journal held."""
    out, port = tmp_path / "loop", free_port()
    cmd = [
        *_loop_command(finetuned_run, ml_dir, out),
        *"--round-events 30 --rounds 1 --finetune-minutes 0.5 --epochs 3 --gate-min-events 5".split(),
        # parts of 10 clicks, no flush by time: the last clicks of a killed replica stay in its journal
        *"--flush-rows 10 --flush-seconds 600 --no-access-log --port".split(),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def launch(port: int) -> subprocess.Popen:
        return subprocess.Popen(
            [*cmd, str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def up(proc: subprocess.Popen, url: str) -> None:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=30).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline
            time.sleep(1)

    proc = launch(port)
    acknowledged = []
    try:
        url = f"http://127.0.0.1:{port}"
        up(proc, url)
        with httpx.Client(base_url=url, timeout=60) as c:

            def click() -> None:
                answer = c.post("/recommend", json={"user": "196", "k": 5}).json()
                item = answer["items"][0]["item_id"]
                fb = {"request_id": answer["request_id"], "item_id": item, "reward": 1}
                assert c.post("/feedback", json=fb).status_code == 200
                acknowledged.append((answer["request_id"], item))

            for _ in range(30):  # three parts: the round starts
                click()
            deadline = time.time() + 300
            while not (out / "round-001" / "dataset" / "manifest.json").exists():  # it trains now
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.5)
            for _ in range(5):  # journaled, not in a part
                click()
    finally:
        stop_group(proc, signal.SIGKILL)
    assert not (out / "loop_state.json").exists() and not (out / "rounds.jsonl").exists()
    again = launch(free_port())
    try:
        deadline = time.time() + 600
        while not (out / "rounds.jsonl").exists():
            assert time.time() < deadline and again.poll() is None
            time.sleep(1)
    finally:
        stop_group(again, signal.SIGINT)
    record = json.loads((out / "rounds.jsonl").read_text())
    taken = read_parts([out / "feedback" / name for name in record["parts"]])
    assert sorted(zip(taken["request_id"], taken["item_id"], strict=True)) == sorted(acknowledged)
    assert json.loads((out / "loop_state.json").read_text())["rounds"] == 1
