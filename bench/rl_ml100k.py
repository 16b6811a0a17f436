"""Benchmark: RL training of the fine-tuned transformer on MovieLens-100K — throughput, then quality.

    python bench/rl_ml100k.py --finetuned runs/bench-finetune/main          # both parts
    python bench/rl_ml100k.py --finetuned runs/ft --skip-quality            # throughput only
    python bench/rl_ml100k.py --finetuned runs/ft --skip-throughput --iterations 40

Throughput (APPO, the transformer policy, ``--num-envs-per-env-runner`` vectorised envs per runner, window
50):
env steps/s sampled with 1 and 2 env runners, learner samples/s, seconds per iteration, CPU milliseconds per
env step of the driver (algorithm + learner) and of the env runners, peak memory of the driver (learner) and
of an env runner, RLlib's own per-stage timers, and a cProfile of one ``sample()``
call inside an env runner: what dominates the time. The policy head on the frozen encoder (the default)
and, with ``--train-encoder-too``, end-to-end training.

Quality: for each exploration strategy (Boltzmann, epsilon-greedy, Thompson/MC dropout, UCB) and each novelty
bonus λ (``--novelty-bonus``: the env's reward scale for long-tail hits), APPO trains the policy from the
fine-tuned weights (KL penalty toward them), and the greedy policy is evaluated by the shared evaluation
(leave-one-out test users, full ranking, seen items excluded) beside the fine-tuned model: HR/NDCG@10,
coverage@10, novelty@10, the paired NDCG difference against the fine-tuned model (95% paired-bootstrap
interval, t-test p) — on the test users and on
the validation users — and every policy again with the exposure slot (``rec_rllib.exposure``: the last of
the 10 positions goes to an item not shown yet when the user ranks one within the next 40). Prints a table
per split and writes an accuracy-coverage plot per split. ``--reuse`` evaluates the checkpoints a previous
run left in ``--out`` instead of training again.
``--exposure-cost λ`` trains with the env's exposure cost (:mod:`rec_rllib.env`): such a policy is evaluated
with its learned exposure weight β on a tracker of what it answered, and twice more, to tell apart what β and
what the rest of the head do: without its exposure term, and as the fine-tuned model with β as a fixed
penalty. ``--exposure-shape indicator`` prices (and penalises) whether an item was recommended at all within
the runner's ``--exposure-window`` recommendations instead of log(1 + count); evaluation keeps a window of
10,000 slate positions either way.
Everything runs on an embedded local Ray with ``--num-cpus`` CPUs.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import time
from dataclasses import replace
from pathlib import Path

import ray

from rec_rllib.config import add_flags, apply_flags
from rec_rllib.data.catalog import load_or_prepare, prepared_dir
from rec_rllib.eval import evaluate_ranking
from rec_rllib.eval.plots import pyplot
from rec_rllib.eval.ranking import paired_comparison
from rec_rllib.exposure import ExposureAwareRecommender, ExposureConfig
from rec_rllib.models import load_recommender
from rec_rllib.retrieval import uses_index
from rec_rllib.rl.algo import build_algo_config
from rec_rllib.rl.config import RLTrainConfig
from rec_rllib.rl.module import model_config_from_run
from rec_rllib.rl.obs import candidate_count
from rec_rllib.rl.policy import (
    CooccurrenceRecommender,
    cooccurrence_weight,
    is_rl_checkpoint,
    load_policy_module,
    simulator_of,
)
from rec_rllib.rl.train import train

TIMERS = ("sample", "rlmodule_inference_timer", "env_step_timer", "env_reset_timer", "time_between_sampling")


def _runner_profile(runner) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    episodes = runner.sample(num_timesteps=400, random_actions=False)
    seconds = time.perf_counter() - t0
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(18)
    steps = sum(len(e) for e in episodes)
    return {
        "steps": steps,
        "seconds": seconds,
        "profile": s.getvalue(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _catalogue(cfg: RLTrainConfig) -> int:
    return int(json.loads((Path(cfg.env.dataset) / "manifest.json").read_text())["counts"]["items"])


def throughput(base: RLTrainConfig, runners: int, iterations: int) -> dict:
    cfg = replace(base, num_env_runners=runners, num_cpus_per_env_runner=0.5)
    algo = build_algo_config(cfg, model_config_from_run(cfg.finetuned)).build_algo()
    try:
        for _ in range(2):  # warm-up: actors started, first weights synced
            algo.train()
        steps = trained = 0.0
        timers = {k: 0.0 for k in TIMERS}
        # CPU time per env step of the driver (algorithm + learner) and of the env runners: what the 2-vs-1
        # scaling on a small machine depends on (the machine's speed drifts between runs; this ratio less)
        pids = algo.env_runner_group.foreach_env_runner(lambda _r: os.getpid(), local_env_runner=False)
        cpu0 = [_cpu_seconds(p) for p in (os.getpid(), *pids)]
        t0 = time.perf_counter()
        for _ in range(iterations):
            r = algo.train()
            er = r["env_runners"]
            steps += float(er.get("num_env_steps_sampled", 0))
            trained += float(r["learners"]["default_policy"].get("num_module_steps_trained", 0))
            for k in TIMERS:
                timers[k] += float(er.get(k, 0.0))
        wall = time.perf_counter() - t0
        cpu = [_cpu_seconds(p) - c for p, c in zip((os.getpid(), *pids), cpu0, strict=True)]
        prof = algo.env_runner_group.foreach_env_runner(_runner_profile, local_env_runner=False)[0]
    finally:
        algo.stop()
    return {
        "mode": ("end to end" if base.train_encoder else "policy head")
        + (f", exposure cost {base.env.exposure_cost:g}" if base.env.exposure_cost else "")
        + (f", {k} candidates" if (k := candidate_count(base.candidate_items, _catalogue(base))) else "")
        + (
            f" from the index ({base.candidate_probe} clusters read)"
            if k and uses_index(base.candidate_search, _catalogue(base))
            else ""
        ),
        "env_runners": runners,
        "env_steps_per_s": steps / wall,
        "learner_samples_per_s": trained / wall,
        "seconds_per_iteration": wall / iterations,
        "driver_cpu_ms_per_step": 1e3 * cpu[0] / steps,
        "runners_cpu_ms_per_step": 1e3 * sum(cpu[1:]) / steps,
        "timers_mean_s": {k: v / iterations for k, v in timers.items()},
        "runner_sample_steps_per_s": prof["steps"] / prof["seconds"],
        "runner_peak_rss_mb": prof["peak_rss_mb"],
        "profile": prof["profile"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--finetuned", default="runs/bench-finetune/main", help="fine-tuned run directory")
    p.add_argument(
        "--dataset", default="ml-100k", help="built-in name or prepared directory (the run's catalogue)"
    )
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--iterations", type=int, default=30, help="APPO iterations per strategy (quality)")
    p.add_argument("--throughput-iterations", type=int, default=10)
    p.add_argument("--strategies", nargs="+", default=["boltzmann", "epsilon", "thompson", "ucb"])
    p.add_argument(
        "--algorithms",
        nargs="+",
        default=["appo"],
        choices=["appo", "ppo", "dqn"],
        help="quality: algorithms to train (dqn explores epsilon-greedily only)",
    )
    p.add_argument("--novelty-bonus", nargs="+", type=float, default=[0.0, 2.0], help="λ values (quality)")
    p.add_argument(
        "--exposure-cost",
        nargs="+",
        type=float,
        default=[0.0],
        help="λ values of the env's exposure cost (quality; 0 = off): the policy learns a weight "
        "on the runner's exposure counts",
    )
    p.add_argument("--train-encoder-too", action="store_true", help="also measure end-to-end throughput")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument(
        "--splits",
        nargs="+",
        default=["test", "valid"],
        choices=["test", "valid"],
        help="quality: leave-one-out users evaluated (valid chose the fine-tuned model's epochs)",
    )
    p.add_argument(
        "--exposure-slots", type=int, default=1, help="quality: also with the exposure slot (0: off)"
    )
    p.add_argument("--exposure-pool", type=int, default=ExposureConfig.pool)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="quality: evaluate a run's existing checkpoint in --out instead of training it again",
    )
    p.add_argument("--out", default="runs/bench-rl")
    # every single-valued RL setting as jobs.train names it (the swept ones above are lists here)
    sweeps = ("finetuned", "iterations", "num_env_runners", "algorithm", "seed", "exploration.strategy")
    sweeps += ("env.novelty_bonus", "env.exposure_cost")
    add_flags(p.add_argument_group("RL settings (jobs.train's)"), RLTrainConfig, skip=sweeps)
    p.add_argument("--seed", type=int, default=0, help="seeds the env runners and learners")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_or_prepare(args.dataset)
    settings = apply_flags(
        args,
        RLTrainConfig,
        {
            "finetuned": args.finetuned,
            "seed": args.seed,
            "exploration": {"epsilon": 0.2, "epsilon_final": 0.05},  # the quality runs' epsilon schedule
            "env": {"dataset": str(Path(prepared_dir(args.dataset)).resolve())},
        },
    )
    # per run: with an exposure cost (swept) the exposure weight may be all that is left to train
    item_terms = settings.pop("train_item_terms", True)
    base = RLTrainConfig.from_dict(settings)
    env = base.env
    report: dict = {}
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR")
    try:
        if not args.skip_throughput:
            modes = [base] + ([replace(base, train_encoder=True)] if args.train_encoder_too else [])
            # a non-zero --exposure-cost: also with the exposure counts in every observation
            modes += [replace(base, env=replace(env, exposure_cost=c)) for c in args.exposure_cost[:1] if c]
            rows = [throughput(m, n, args.throughput_iterations) for m in modes for n in (1, 2)]
            print(
                f"\n## Throughput (APPO, transformer policy, {base.num_envs_per_env_runner} envs per "
                "runner)\n"
            )
            print(
                "| training | env runners | env steps/s | learner samples/s | s/iteration | "
                "CPU ms per env step: driver / runners | runner peak RSS MB |"
            )
            print("|---|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                print(
                    f"| {r['mode']} | {r['env_runners']} | {r['env_steps_per_s']:.0f} | "
                    f"{r['learner_samples_per_s']:.0f} | {r['seconds_per_iteration']:.2f} | "
                    f"{r['driver_cpu_ms_per_step']:.3f} / {r['runners_cpu_ms_per_step']:.3f} | "
                    f"{r['runner_peak_rss_mb']:.0f} |"
                )
            for one, two in zip(rows[::2], rows[1::2], strict=True):
                ratio = two["env_steps_per_s"] / one["env_steps_per_s"]
                print(f"\n{one['mode']}: scaling 2 vs 1 runner {ratio:.2f}x")
            print("RLlib timers per iteration (mean s, 2 runners):", json.dumps(rows[1]["timers_mean_s"]))
            print(f"\none env runner's sample() alone: {rows[0]['runner_sample_steps_per_s']:.0f} steps/s")
            print("cProfile of sample() in an env runner (cumulative):\n" + rows[0]["profile"])
            report["throughput"] = [{k: v for k, v in r.items() if k != "profile"} for r in rows]

        if not args.skip_quality:
            policies = {"fine-tuned": load_recommender(args.finetuned, ds)}
            minutes: dict[str, float] = {}
            # DQN explores epsilon-greedily only; PPO refuses epsilon-greedy and UCB (no gradient through
            # them)
            allowed = {"dqn": {"epsilon"}, "ppo": {"boltzmann", "thompson"}}
            runs = [(a, st) for a in args.algorithms for st in args.strategies if st in allowed.get(a, {st})]
            e2e_name, e2e_dir = (", end to end", "-e2e") if base.train_encoder else ("", "")
            if not base.train_state_head:
                e2e_name, e2e_dir = ", state head frozen", "-fz"
            if not item_terms:
                e2e_name, e2e_dir = e2e_name + ", item terms frozen", e2e_dir + "-fi"
            if env.cooccurrence:
                e2e_name, e2e_dir = e2e_name + ", co-occurrence", e2e_dir + "-co"
                if base.cooccurrence_gamma is not None:  # fixed (or chosen on the validation users)
                    g = base.cooccurrence_gamma
                    e2e_name += f" (γ {g})" if g != "validation" else " (γ from validation)"
                    e2e_dir += f"-g{g}" if g != "validation" else "-gv"
            grid = [(a, st, b, c) for a, st in runs for b in args.novelty_bonus for c in args.exposure_cost]
            for algorithm, strategy, bonus, cost in grid:
                cost_name, cost_dir = (f", exposure cost {cost:g}", f"-x{cost:g}") if cost else ("", "")
                if cost and env.exposure_shape != "log":
                    cost_name, cost_dir = (
                        cost_name + f" ({env.exposure_shape})",
                        cost_dir + env.exposure_shape[0],
                    )
                name = f"{algorithm.upper()} + {strategy}, λ={bonus:g}" + cost_name + e2e_name
                run_dir = out / f"{algorithm}-{strategy}-b{bonus:g}{cost_dir}{e2e_dir}"
                if args.reuse and is_rl_checkpoint(run_dir / "checkpoint"):
                    print(f"{name}: reusing {run_dir / 'checkpoint'}", flush=True)
                else:
                    expl = replace(base.exploration, strategy=strategy)
                    cfg = replace(
                        base,
                        algorithm=algorithm,
                        iterations=args.iterations,
                        exploration=expl,
                        checkpoint_every=10_000,
                        env=replace(env, novelty_bonus=bonus, exposure_cost=cost),
                        train_item_terms=item_terms,
                    )
                    t0 = time.perf_counter()
                    train(cfg, run_dir, progress=lambda *_: None)
                    minutes[name] = (time.perf_counter() - t0) / 60
                    print(f"{name}: {minutes[name]:.1f} min", flush=True)
                policies[name] = load_recommender(str(run_dir / "checkpoint"), ds)
                if env.cooccurrence:  # what the γ does on the fine-tuned scores, alone
                    gamma = cooccurrence_weight(load_policy_module(run_dir / "checkpoint"))
                    how = "learned" if base.cooccurrence_gamma is None else "fixed"
                    print(f"{name}: {how} co-occurrence weight γ = {gamma:.4f}", flush=True)
                    policies[f"fine-tuned + its γ ({gamma:.2f}) fixed"] = CooccurrenceRecommender(
                        policies["fine-tuned"], simulator_of(ds), gamma, env.cooccurrence_window
                    )
                if isinstance(policies[name], ExposureAwareRecommender):  # trained with an exposure cost
                    # what the learned exposure weight does and what the rest of the head does, apart
                    beta = policies[name].cfg.penalty
                    print(f"{name}: learned exposure weight β = {beta:.4f}", flush=True)
                    policies[name + " without its exposure term"] = policies[name].base
                    fixed = ExposureConfig(slots=0, penalty=beta, shape=policies[name].cfg.shape)
                    policies[f"fine-tuned + its β ({beta:.2f}) as a fixed penalty"] = (
                        ExposureAwareRecommender(policies["fine-tuned"], fixed)
                    )
            exposure = ExposureConfig(slots=args.exposure_slots, pool=args.exposure_pool)
            report["quality"] = {}
            for split in args.splits:
                table = quality(policies, ds, split, exposure)
                for name, m in table.items():
                    m["train_minutes"] = minutes.get(name.removesuffix(EXPOSED))
                _print_quality(table, split)
                _plot(table, out / f"accuracy_coverage_{split}.png", split)
                report["quality"][split] = table
    finally:
        ray.shutdown()
    report["driver_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"driver (learner) peak RSS {report['driver_peak_rss_mb']:.0f} MB")
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"wrote {out / 'bench.json'}")


EXPOSED = " + exposure slot"


def quality(policies: dict, ds, split: str, exposure: ExposureConfig) -> dict[str, dict]:
    """Every policy greedy, then each again with the exposure slot (a fresh tracker, users in case order);
    metrics plus the paired NDCG@10 difference against the fine-tuned model (95% paired-bootstrap interval,
    t-test p) on ``split``."""
    results = {}
    for name, rec in policies.items():
        results[name] = evaluate_ranking(rec, ds, split=split)
        if exposure.enabled:
            results[name + EXPOSED] = evaluate_ranking(
                ExposureAwareRecommender(rec, exposure), ds, split=split
            )
    ft = results["fine-tuned"]
    table = {}
    for name, r in results.items():
        paired = (
            paired_comparison(ft, r, "NDCG@10")
            if name != "fine-tuned"
            else {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0}
        )
        table[name] = {
            **r.metrics,
            "ndcg_diff_vs_ft": paired["diff"],
            "ndcg_ci_vs_ft": [paired["low"], paired["high"]],
            "ndcg_p_vs_ft": paired["p_value"],
        }
    return table


def _print_quality(table: dict, split: str) -> None:
    ft = table["fine-tuned"]
    keys = ("HR@10", "NDCG@10", "coverage@10", "novelty@10")
    print(f"\n## Quality ({split} users, leave-one-out, full ranking, greedy policy)\n")
    print("| policy | " + " | ".join(keys) + " | NDCG vs FT [95% interval] (paired p) | coverage vs FT |")
    print("|---|" + "---:|" * (len(keys) + 2))
    for name, m in table.items():
        cells = " | ".join(f"{m[k]:.4f}" for k in keys)
        d_ndcg = m["NDCG@10"] / ft["NDCG@10"] - 1
        d_cov = m["coverage@10"] / ft["coverage@10"] - 1
        lo, hi = (x / ft["NDCG@10"] for x in m["ndcg_ci_vs_ft"])
        print(
            f"| {name} | {cells} | {d_ndcg:+.1%} [{lo:+.1%}, {hi:+.1%}] ({m['ndcg_p_vs_ft']:.2f}) | "
            f"{d_cov:+.1%} |"
        )


def _plot(table: dict, path: Path, split: str) -> None:
    """NDCG@10 against coverage@10: one colour per exploration strategy, one marker per novelty reward λ;
    a policy with the exposure slot is its hollow twin, joined to it by an arrow."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours: dict[str, str] = {}
    markers = ["o", "s", "^", "D", "v"]
    lambdas: list[str] = []
    for name, m in table.items():
        base = name.removesuffix(EXPOSED)
        hollow = base != name
        if base == "fine-tuned":
            colour, marker, size = "black", "*", 140
        else:
            strategy, _, lam = base.partition(", ")
            colour = colours.setdefault(strategy, f"C{len(colours)}")
            if lam not in lambdas:
                lambdas.append(lam)
            marker, size = markers[lambdas.index(lam) % len(markers)], 55
        style = {"facecolors": "none", "edgecolors": colour} if hollow else {"color": colour}
        ax.scatter(m["coverage@10"], m["NDCG@10"], s=size, marker=marker, label=name, **style)
        if hollow and base in table:
            b = table[base]
            ax.annotate(
                "",
                (m["coverage@10"], m["NDCG@10"]),
                (b["coverage@10"], b["NDCG@10"]),
                arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.5},
            )
    ax.set_xlabel(f"catalogue coverage@10 ({split} users)")
    ax.set_ylabel(f"NDCG@10 (leave-one-out {split})")
    ax.grid(alpha=0.3)
    ax.set_title(
        "accuracy vs coverage: strategy (colour), novelty reward λ (marker), exposure slot (hollow)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
