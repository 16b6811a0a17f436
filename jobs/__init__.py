"""Entry points, one per stage: ``python -m jobs.<stage> --help``. Thin: argument parsing, Ray start,
progress."""
