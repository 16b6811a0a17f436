"""rec-rllib: learning recommendation policies with reinforcement learning on Ray.

Stages (docs/ has a page for each): prepare (``rec_rllib.data``) -> finetune -> train (RLlib) -> evaluate
(``rec_rllib.eval``) -> serve (``serving``).
"""

__version__ = "0.1.0"
