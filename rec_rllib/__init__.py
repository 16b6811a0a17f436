"""rec-rllib: learning recommendation policies with reinforcement learning on Ray.

Stages (see DESIGN in the README): prepare (``rec_rllib.data``) -> finetune -> train (RLlib) -> evaluate
(``rec_rllib.eval``) -> serve (``serving``).
"""

__version__ = "0.1.0"
