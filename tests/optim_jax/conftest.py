"""``platform_branch``: run a test on the code GPUs and TPUs run, on this CPU.

Some transformations compute one value two ways, chosen by ``jax.lax.platform_dependent``
when XLA lowers the program: a form that XLA:CPU compiles into fewer passes over memory
(``cpu=``) and the plain form everywhere else (``default=``), with the same numbers (Lion's
direction, LAMB's trust ratio, Adafactor's reductions, the flat layout's chunk norms,
``stored_after``). A CPU run lowers only the first, so the suite would never execute what a
GPU or TPU user gets. A test that uses this fixture runs twice: as it is (``cpu``) and with
``jax.lax.platform_dependent`` taking its ``default`` branch (``elsewhere``).
"""

import jax
import pytest

_PLATFORM_DEPENDENT = jax.lax.platform_dependent


def default_branch(*args, default, **per_platform):
    """``jax.lax.platform_dependent`` as lowered for a platform with no branch of its own."""
    del per_platform
    return default(*args)


@pytest.fixture(params=["cpu", "elsewhere"])
def platform_branch(request, monkeypatch):
    if request.param == "elsewhere":
        # Our modules look the function up when they trace; JAX's own code imports it
        # directly and is not affected. Programs traced before would be reused from the
        # caches of jit, so the caches are emptied on the way in and out.
        monkeypatch.setattr(jax.lax, "platform_dependent", default_branch)
        jax.clear_caches()
        yield request.param
        monkeypatch.undo()
        jax.clear_caches()
    else:
        assert jax.lax.platform_dependent is _PLATFORM_DEPENDENT
        yield request.param
