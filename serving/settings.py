"""The Serve app's settings: :class:`AppArgs` (the ``args`` of a Serve config, and ``jobs.serve``'s flags,
generated from it by :func:`rec_rllib.config.add_model_flags`) and the defaults the scorer deployment shares
with it. Kept free of heavy imports so that ``python -m jobs.serve --help`` reads them without loading Ray
or the model code."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rec_rllib.exposure import SERVING_EXPOSURE_REFRESH, ExposureConfig
from rec_rllib.retrieval import DEFAULT_PROBE

MAX_BATCH_SIZE = 16
"""Requests a scoring replica answers in one forward pass at most (``@serve.batch``)."""
BATCH_WAIT_TIMEOUT_S = 0.0
"""How long a batch waits to fill: 0, a batch forms from what queued while the previous one ran, never by
waiting (a Serve config may set a few milliseconds instead, to fill batches on a GPU)."""
STATE_ACTOR = "rec_rllib_live_state"
"""Name of the detached actor that holds the live state every replica shares (:mod:`serving.state`)."""


class AppArgs(BaseModel):
    """Arguments of :func:`serving.app.build_app`: the Serve config's ``args`` (an unknown one is an error)
    and ``jobs.serve``'s flags."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="fine-tuned run directory or RLlib checkpoint")
    dataset: str = Field(..., description="prepared dataset directory the model was trained on")
    feedback_dir: str = Field(
        "runs/serve/feedback",
        description="where feedback and answer-log Parquet parts go (`python -m jobs.prepare --dataset "
        "feedback` reads them)",
    )
    state_name: str = Field(STATE_ACTOR, description="name of the live-state actor the replicas share")
    topology: Literal["split", "single"] = Field(
        "single",
        description="single: one deployment answers HTTP and scores in the same replica (one hop less, the "
        "low-latency default; the scorer options apply to it); split: ingress + scorer deployments (scorers "
        "scale, and take GPUs, apart from the HTTP layer)",
    )
    ingress_replicas: int = Field(1, ge=1, description="HTTP replicas of the split topology")
    scorer_replicas: int = Field(1, ge=1, description="scoring replicas (ignored with autoscaling)")
    scorer_gpus: float = Field(0.0, ge=0.0, le=1.0, description="GPU fraction per scoring replica")
    scorer_cpus: float = Field(1.0, ge=0.0, description="CPUs per scoring replica")
    autoscaling: dict[str, Any] | None = Field(
        None,
        description='Serve autoscaling_config of the scoring deployment, e.g. {"min_replicas": 1, '
        '"max_replicas": 4} (default: a fixed replica count)',
    )
    max_batch_size: int = Field(
        MAX_BATCH_SIZE, ge=1, description="requests a scoring replica answers in one forward pass at most"
    )
    batch_wait_timeout_s: float = Field(
        BATCH_WAIT_TIMEOUT_S,
        ge=0.0,
        description="seconds a batch waits to fill (0: a batch forms from what queued while the previous one "
        "ran, never by waiting)",
    )
    flush_rows: int = Field(256, ge=1, description="feedback events per Parquet part file")
    flush_seconds: float = Field(
        5.0, gt=0.0, description="seconds at most before buffered feedback is written (and at shutdown)"
    )
    exposure_slots: int = Field(
        0,
        ge=0,
        description="greedy slates: last positions that may go to items the replica has not shown lately "
        "(rec_rllib.exposure; catalogue coverage at almost no accuracy cost; 0: off)",
    )
    exposure_pool: int = Field(
        ExposureConfig.pool, ge=1, description="exposure slot candidates: the user's next N items"
    )
    exposure_window: int = Field(
        ExposureConfig.window, ge=1, description="slate positions each replica's tracker remembers"
    )
    exposure_refresh: int = Field(
        SERVING_EXPOSURE_REFRESH,
        ge=1,
        description="answers between updates of a replica's exposure prices (the same request gets the same "
        "list in between; 1: after every answer)",
    )
    candidate_search: Literal["auto", "exact", "ivf"] = Field(
        "auto",
        description="how a known user's greedy or Boltzmann list finds its items: exact scores "
        "every item; ivf searches an inverted-file index of the item vectors (rec_rllib.retrieval) for the "
        "candidate_pool best and ranks or draws among those; auto: ivf from 50,000 items on",
    )
    candidate_pool: int = Field(
        512, ge=10, description="with the index: items found per answer (besides the user's history)"
    )
    candidate_probe: int = Field(
        DEFAULT_PROBE, ge=1, description="with the index: clusters each search reads (of about 4·sqrt(items))"
    )
    access_log: bool = Field(
        True, description="Serve's per-request access log line (~2% of a replica's CPU when on)"
    )


RETRIEVAL_ARGS = ("candidate_search", "candidate_pool", "candidate_probe")
"""App arguments that say how a replica's answers find their items (:class:`AppArgs`)."""
