"""Defaults of the Serve app that several places need: the app's arguments (:class:`serving.app.AppArgs`, the
``args`` of a Serve config), the scorer deployment, and ``jobs.serve``'s flags. Kept free of heavy imports so
that a job's ``--help`` reads them without loading the model code."""

MAX_BATCH_SIZE = 16
"""Requests a scoring replica answers in one forward pass at most (``@serve.batch``)."""
BATCH_WAIT_TIMEOUT_S = 0.0
"""How long a batch waits to fill: 0, a batch forms from what queued while the previous one ran, never by
waiting (a Serve config may set a few milliseconds instead, to fill batches on a GPU)."""
