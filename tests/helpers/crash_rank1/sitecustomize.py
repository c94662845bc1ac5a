"""Test-only: on rank 1 alone, evaluation raises ValueError (a crash in one rank of a real 2-rank run)."""
import os

if os.environ.get("RANK") == "1" and os.environ.get("SFT_LAUNCHED") == "1":
    import launcher.evaluate as _evaluate

    def _crash(*args, **kwargs):
        raise ValueError("rank 1 broke during evaluation (test)")

    _evaluate.evaluate = _crash
