"""Names of the batch columns, model outputs and episode data the RL module, its connectors and the
evaluation share (in a module of their own, so that none of them imports another for a name)."""

REF_LOGITS = "reference_action_dist_inputs"
"""Model output: the reference (fine-tuned) policy's logits the KL term is taken against."""
UCB_STATS = "ucb_gram_diag"
"""Buffer of the frozen-encoder UCB policy: the synced diagonal LinUCB statistics, [n_items, H]."""
USER_STATE = "user_state"
"""Model output: the encoder's user state of the step ([H] float32)."""
CANDIDATES = "candidates"
"""Model output of a policy over candidates: each step's candidate items [K] (int32); its action is an index
into them."""
BEHAVIOUR_TEMPERATURE = "behaviour_temperature"
"""Model output: the Boltzmann temperature the step's action was drawn at."""
FINAL_USER_STATE = "final_user_state"
"""``custom_data`` key of an episode chunk: the user state of its final observation ([H] float32)."""
BOOTSTRAP_STATE_MISSING = "bootstrap_user_state_missing"
"""Train-batch column: True on the appended bootstrap rows whose user state the learner must encode."""
