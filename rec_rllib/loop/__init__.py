"""The closed loop: the served model learns from its own feedback in rounds, and a candidate replaces it only
when it is better on what the served model could not have trained on.

* :mod:`rec_rllib.loop.ledger`: which feedback part files a round has taken (once each, in order), persisted
  with the served model and every round's decision, so a killed loop resumes without losing or repeating an
  event.
* :mod:`rec_rllib.loop.judge`: both models scored on the newest held-out feedback (ranking metrics per
  event) and on the Serve log (off-policy estimates), in one catalogue.
* :mod:`rec_rllib.loop.gate`: the rule that rolls a candidate (the lower end of its paired improvement's
  interval above the margin) or keeps the served model, with the reason.
* :mod:`rec_rllib.loop.rounds`: one round: the next dataset, the warm-started candidate, the judgement, the
  decision. Rolling it into Serve is the job's (``jobs.loop``).
"""
