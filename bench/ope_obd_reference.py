"""Our off-policy estimators against the reference library's, on the very resamples behind its figures.

The reference library (obp 0.5.7, examples/obd) publishes, for campaign all, BTS (by its production prior)
estimated from the uniform-random logs, the mean relative error over 30 bootstrap resamples: DM 0.156876,
IPW 0.311082, SNIPW 0.311795, DR 0.292464, SNDR 0.302407, Switch-DR 0.258410, DR-os 0.159520. Our
protocol (``rec_rllib.eval.obd``) draws the same resamples and BTS distribution, so IPS/SNIPS reproduce
their figures exactly. This script adds an independent re-implementation of the reference's DM/DR reward
model -- logistic regression per position on the user features (one-hot, first level dropped) and the
item features (three label-encoded categories and item_feature_0), C = 100, 3-fold cross-fitting with the
same KFold shuffle -- which reproduces the published DM and DR to five digits, and then compares every
estimator with the reference's DM/DR *paired*, resample by resample, on the published 30 and on
``--resamples`` in all (resample b is always ``RandomState(b)``, so the first 30 are the published ones)::

    python bench/ope_obd_reference.py --resamples 300

obp is never imported: its sdist's CSV files are read as data (fetched by ``rec_rllib.data.fetch``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

PUBLISHED = {
    "dm": 0.156876,
    "ips": 0.311082,
    "snips": 0.311795,
    "dr": 0.292464,
    "sndr": 0.302407,
    "switch-dr": 0.258410,
    "dr-os": 0.159520,
}


def reference_inputs(campaign: str) -> dict:
    """The random log in the reference's order and features, its BTS log's click rate, item features."""
    from rec_rllib.data import fetch

    root = fetch.obd_dir()
    data = pd.read_csv(root / "random" / campaign / f"{campaign}.csv", index_col=0).sort_values("timestamp")
    item = pd.read_csv(root / "random" / campaign / "item_context.csv", index_col=0)
    cats = item.drop(columns=["item_id", "item_feature_0"]).apply(lambda c: pd.factorize(c, sort=True)[0])
    users = data.loc[:, data.columns.str.contains("user_feature")]
    return {
        "action": data["item_id"].to_numpy(),
        "position": pd.Series(data["position"]).rank(method="dense").to_numpy().astype(int) - 1,
        "reward": data["click"].to_numpy().astype(float),
        "pscore": data["propensity_score"].to_numpy(),
        "context": pd.get_dummies(users, drop_first=True).to_numpy(dtype=float),
        "action_context": np.c_[cats.to_numpy(dtype=float), item["item_feature_0"].to_numpy()],
        "truth": float(pd.read_csv(root / "bts" / campaign / f"{campaign}.csv", index_col=0)["click"].mean()),
    }


def _logistic(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """L2 logistic regression as the reference's solver defines it: C * sum(log loss) + |w|^2 / 2, the
    intercept unpenalised; returns [w..., b]."""
    from scipy.optimize import minimize

    d = x.shape[1]

    def f(t: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ t[:d] + t[d]
        g = c * (1.0 / (1.0 + np.exp(-z)) - y)
        loss = c * np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * t[:d] @ t[:d]
        return loss, np.concatenate([x.T @ g + t[:d], [g.sum()]])

    opts = {"maxiter": 10_000, "gtol": 1e-10, "ftol": 1e-14}
    return minimize(f, np.zeros(d + 1), jac=True, method="L-BFGS-B", options=opts).x


def _kfold(n: int, folds: int = 3, seed: int = 12345) -> list[np.ndarray]:
    """Test folds of a shuffled K-fold split, as scikit-learn's KFold(shuffle=True) draws them."""
    idx = np.arange(n)
    np.random.RandomState(seed).shuffle(idx)
    sizes = np.full(folds, n // folds)
    sizes[: n % folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(idx[bounds[i] : bounds[i + 1]]) for i in range(folds)]


def reference_dm_dr(inp: dict, pi: np.ndarray, b: int, c: float = 100.0) -> tuple[float, float]:
    """The reference's DM and DR on bootstrap resample b."""
    n_all = len(inp["action"])
    rows = np.random.RandomState(b).choice(np.arange(n_all), size=n_all, replace=True)
    a, k, r, p, ctx = (inp[key][rows] for key in ("action", "position", "reward", "pscore", "context"))
    feats, n_items, n_pos = inp["action_context"], pi.shape[0], pi.shape[1]
    q = np.zeros((len(a), n_items))  # q_hat at each round's own position
    for test in _kfold(len(a)):
        train = np.setdiff1d(np.arange(len(a)), test)
        for pos in range(n_pos):
            fit_rows, pred_rows = train[k[train] == pos], test[k[test] == pos]
            t = _logistic(np.c_[ctx[fit_rows], feats[a[fit_rows]]], r[fit_rows], c)
            z = (
                (ctx[pred_rows] @ t[: ctx.shape[1]])[:, None]
                + (feats @ t[ctx.shape[1] : -1])[None, :]
                + t[-1]
            )
            q[pred_rows] = 1.0 / (1.0 + np.exp(-z))
    dm = (pi[:, k].T * q).sum(axis=1)
    w = pi[a, k] / p
    return float(dm.mean()), float((dm + w * (r - q[np.arange(len(a)), a])).mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resamples", type=int, default=300, help="bootstrap resamples (the first 30 are obp's)")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default=None, help="write the per-resample errors as JSON here")
    args = p.parse_args(argv)
    if args.resamples < 30:
        p.error("--resamples must be at least 30 (the published figures use resamples 0-29)")

    from rec_rllib.data.catalog import load_or_prepare
    from rec_rllib.eval import obd

    t0 = time.time()
    dataset = load_or_prepare("obd-all", root=args.data_root)
    inp = reference_inputs("all")
    res = obd.validate(dataset, campaign="all", n_boot=args.resamples)
    errors = {f"ours {k}": v for k, v in res.relative_errors().items()}
    bts_log = obd.obd_feedback(dataset, "bts", context=False)
    pi = obd.bts_action_dist("prior", dataset=dataset, campaign="all", bts_log=bts_log)
    ids = dataset.items["item_id"].astype(int).to_numpy()
    pi_by_id = np.zeros_like(pi)
    pi_by_id[ids] = pi
    ref = np.array([reference_dm_dr(inp, pi_by_id, b) for b in range(args.resamples)])
    errors["reference dm"] = np.abs(ref[:, 0] - inp["truth"]) / inp["truth"]
    errors["reference dr"] = np.abs(ref[:, 1] - inp["truth"]) / inp["truth"]
    assert abs(res.truth - inp["truth"]) < 1e-12

    base = errors["reference dm"]
    print(f"campaign all, BTS (prior) from the random logs; truth {res.truth:.5f}; {time.time() - t0:.0f} s")
    print(
        f"{'estimator':<18} {'published':>9} {'first 30':>9} {f'all {args.resamples}':>9}"
        f" {'vs reference DM, paired (mean, SE)':>38}"
    )
    for name, e in errors.items():
        short = name.split(" ", 1)[1]
        pub = (
            f"{PUBLISHED[short]:.6f}"
            if short in PUBLISHED and (name.startswith("reference") or short in ("ips", "snips"))
            else ""
        )
        d = e - base
        print(
            f"{name:<18} {pub:>9} {e[:30].mean():9.6f} {e.mean():9.4f}"
            f"   first 30 {d[:30].mean():+.4f} ± {d[:30].std(ddof=1) / np.sqrt(30):.4f},"
            f" all {d.mean():+.4f} ± {d.std(ddof=1) / np.sqrt(len(d)):.4f}"
        )
    print(
        "published, not re-run (different tau / estimator): switch-dr 0.258410, sndr 0.302407, dr-os 0.159520"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({k: v.tolist() for k, v in errors.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
