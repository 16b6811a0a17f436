"""The RLlib algorithm of a training run, as one builder chain (:func:`build_algo_config`): APPO (the default:
asynchronous actor-learner with V-trace), PPO or DQN training :class:`~rec_rllib.rl.module.RecPolicyModule`
on env runners that replay disjoint user shards (:class:`~rec_rllib.env.LogReplayEnv`). Resources come from
the config: env runners' CPUs and custom resources (e.g. ``{"env_runner": 1}`` to pin them to a node group),
learners' count, GPUs (fractions allowed) and custom resources."""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from rec_rllib.env import LogReplayEnv
from rec_rllib.replay import train_item_counts
from rec_rllib.rl.config import RLTrainConfig

SAMPLER_WAIT_S = 0.05
"""APPO's driver waits up to this long for env-runner samples per training step (RLlib's default: 0)."""

REPLAY_HITS, REPLAY_STEPS, REPLAY_ON_DISPLAY = "replay_hits", "replay_steps", "replay_on_display"


def count_replay_hits(*, metrics_logger=None, samples, **kwargs) -> None:
    """``on_sample_end``: the steps sampled and how many recommended one of the user's next logged items (the
    env's ``hit`` info), summed per iteration. The hit rate is their ratio: the mean return per step is not
    one once a novelty reward or an exposure cost is added, or the hit is weighted by the rating. With an
    exposure cost also how many recommended an item already on display (the ``on_display`` info)."""
    if metrics_logger is None:
        return
    hits = steps = shown = 0
    for episode in samples:
        infos = episode.get_infos()[1:]  # the first belongs to the chunk's first observation (a reset, or the
        # previous chunk's last step)
        hits += sum(bool(i.get("hit")) for i in infos)
        shown += sum(bool(i.get("on_display")) for i in infos)
        steps += len(infos)
    metrics_logger.log_value(REPLAY_HITS, hits, reduce="sum")
    metrics_logger.log_value(REPLAY_STEPS, steps, reduce="sum")
    metrics_logger.log_value(REPLAY_ON_DISPLAY, shown, reduce="sum")


def build_algo_config(cfg: RLTrainConfig, model_config: dict[str, Any]):
    """The RLlib AlgorithmConfig, as one builder chain."""
    from ray.rllib.algorithms.appo import APPOConfig
    from ray.rllib.algorithms.dqn import DQNConfig
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from rec_rllib.rl.connectors import (
        DropActionDistInputs,
        FillBootstrapUserState,
        RecordUCBStatistics,
        ship_final_user_states,
    )
    from rec_rllib.rl.learners import (
        NEXT_ITEM_CE_COEFF,
        REF_KL_COEFF,
        RecAPPOLearner,
        RecDQNLearner,
        RecPPOLearner,
    )
    from rec_rllib.rl.module import PolicyModelConfig, RecPolicyModule

    base, learner_class = {
        "appo": (APPOConfig(), RecAPPOLearner),
        "ppo": (PPOConfig(), RecPPOLearner),
        "dqn": (DQNConfig(), RecDQNLearner),  # the module supplies Q-values and a target net
    }[cfg.algorithm]
    ref_kl = 0.0 if cfg.algorithm == "dqn" else cfg.ref_kl_coeff
    settings = PolicyModelConfig.of(model_config)
    settings = replace(
        settings,
        exploration=asdict(cfg.exploration),
        ref_kl_coeff=ref_kl,
        train_encoder=cfg.train_encoder,
        train_state_head=cfg.train_state_head,
        train_item_terms=cfg.train_item_terms,
        # PPO (no off-policy correction) optimises the behaviour distribution itself
        train_behaviour_policy=cfg.algorithm == "ppo",
        # the policy head's popularity feature, from the split the env replays
        item_counts=None if cfg.train_encoder else train_item_counts(cfg.env.dataset, cfg.env.scheme),
        # the env prices exposure: the module learns a weight on the exposure counts it observes
        exposure_window=cfg.env.exposure_window if cfg.env.exposure_cost > 0 else 0,
        exposure_shape=cfg.env.exposure_shape,
        # the env's observation carries the item-kNN simulator's probabilities: the module learns a weight
        # on them
        cooccurrence=cfg.env.cooccurrence,
        cooccurrence_window=cfg.env.cooccurrence_window,
        feature_items=cfg.env.feature_items,  # what scoring keeps of the feature, as the env does
        cooccurrence_scheme=cfg.env.scheme,
        cooccurrence_gamma=cfg.cooccurrence_gamma,  # None: learned
        candidate_items=0 if cfg.algorithm == "dqn" else cfg.candidate_items,
        candidate_search=cfg.candidate_search,
        candidate_probe=cfg.candidate_probe,
    )
    model_config = settings.to_rllib()
    config = (
        # normalize_actions off: a policy over candidates hands the env the item its action stands for
        # (ACTIONS_FOR_ENV), which RLlib's action normalisation (a no-op for a discrete space) would overwrite
        base.environment(
            LogReplayEnv, env_config=asdict(cfg.env), disable_env_checking=True, normalize_actions=False
        )
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            num_envs_per_env_runner=cfg.num_envs_per_env_runner,
            num_cpus_per_env_runner=cfg.num_cpus_per_env_runner,
            custom_resources_per_env_runner=dict(cfg.env_runner_resources),
            rollout_fragment_length=cfg.rollout_fragment_length,
        )
        .learners(
            num_learners=cfg.num_learners,
            num_gpus_per_learner=cfg.num_gpus_per_learner,
            custom_resources_per_learner=dict(cfg.learner_resources),
        )
        .rl_module(rl_module_spec=RLModuleSpec(module_class=RecPolicyModule, model_config=model_config))
        .training(lr=cfg.learning_rate, gamma=cfg.gamma, train_batch_size_per_learner=cfg.train_batch_size)
        .fault_tolerance(restart_failed_env_runners=True)
        .reporting(min_time_s_per_iteration=0, metrics_num_episodes_for_smoothing=100)
        .debugging(seed=cfg.seed)
        .callbacks(on_sample_end=count_replay_hits)
    )
    if cfg.algorithm == "dqn":
        return config.training(
            learner_class=learner_class,
            learner_config_dict={NEXT_ITEM_CE_COEFF: cfg.next_item_ce_coeff},
            replay_buffer_config={"type": "EpisodeReplayBuffer", "capacity": 50_000},
            double_q=True,
            dueling=False,
            num_atoms=1,
            n_step=1,
            td_error_loss_fn="huber",
            target_network_update_freq=max(1, 4 * cfg.train_batch_size),
            num_steps_sampled_before_learning_starts=cfg.train_batch_size,
        )
    config = config.training(
        entropy_coeff=cfg.entropy_coeff,
        learner_class=learner_class,
        learner_config_dict={REF_KL_COEFF: cfg.ref_kl_coeff},
    )
    if cfg.algorithm == "ppo":
        # synchronous PPO needs train batch = runners x envs x fragment: RLlib derives the fragment ("auto"),
        # so the defaults (2 x 32 envs) work with any train batch size
        config = config.training(minibatch_size=min(128, cfg.train_batch_size), num_epochs=2).env_runners(
            rollout_fragment_length="auto"
        )
    else:
        # the catalogue-wide behaviour-distribution inputs stay in the runners (APPO reads the
        # log-probability)
        config = config.env_runners(module_to_env_connector=lambda *_args: DropActionDistInputs())
        if not cfg.train_encoder:
            # env runners encode each chunk's final observation, so the learner never runs the encoder;
            # UCB: the learner keeps the statistics of every runner's actions (synced to them, checkpointed)
            def learner_pieces(*_spaces) -> list:
                pieces = [FillBootstrapUserState()]
                if cfg.exploration.strategy == "ucb":
                    pieces.append(RecordUCBStatistics(num_learners=cfg.num_learners))
                return pieces

            config = config.callbacks(on_sample_end=[count_replay_hits, ship_final_user_states]).training(
                learner_connector=learner_pieces
            )
        # APPO samples asynchronously: an iteration lasts until at least one train batch was learned on
        # (otherwise `train()` returns at once while the runners are still producing their first episodes).
        config = (
            config.reporting(
                min_sample_timesteps_per_iteration=cfg.train_batch_size,
                min_train_timesteps_per_iteration=cfg.train_batch_size,
            )
            .training(
                # RLlib's default (0 s) makes the driver poll its env runners in a busy loop: thousands of
                # training steps per iteration that take a whole core from the runners on a small machine.
                # Blocking up to this long for sample results frees it (measured: runners scale again).
                timeout_s_sampler_manager=SAMPLER_WAIT_S,
                use_circular_buffer=False,
            )
            .env_runners(max_requests_in_flight_per_env_runner=2)
        )
    return config
