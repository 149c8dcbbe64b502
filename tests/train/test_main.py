"""The README's main command, shortened: ``python -m train`` trains and lowers the eval loss."""

from train.__main__ import main


def test_default_run_lowers_the_eval_loss():
    result = main(["--steps", "60"])
    assert result["final_eval_loss"] < result["initial_eval_loss"] - 1.0, result
