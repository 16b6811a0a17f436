"""RL on Ray (RLlib new API stack): the policy RLModule, learners and the training loop."""
