"""PPO's step configuration and its ``auto`` speed options (:mod:`contlearn.backends.auto`).

:func:`step_config` is what PPO's backends see of a run (:class:`StepConfig`);
:func:`resolve_auto` turns ``value_worker=auto`` into ``true`` or ``false`` by the rule of
:mod:`contlearn.backends.auto`, from the options alone, so that the run's config (resolved
before the agent exists) and an agent built directly make the same choice.
"""

from __future__ import annotations

from dataclasses import replace

from contlearn.agents.ppo_spec import PPOSpec
from contlearn.backends.auto import auto_flag
from contlearn.backends.base import StepConfig
from contlearn.backends.ppo_worker import VALUE_WORKER
from contlearn.credit import credit_def, credit_options
from contlearn.learners import Learner
from contlearn.spec import parse_int_list


def step_config(
    spec: PPOSpec, learner: Learner, device: str = "cpu", dtype: str = "float32"
) -> StepConfig:
    """The resolved configuration of PPO's minibatch step, as backends see it."""
    return StepConfig(
        network="actor-critic",
        activation=spec.activation,
        depth=len(parse_int_list(spec.hidden, "hidden")),
        task="rl",
        learner=learner.name,
        optimizer=spec.optimizer,
        credit=learner.credit.name,
        credit_learned=credit_def(learner.credit.name).learned,
        credit_options=credit_options(learner.credit),
        batch_size=spec.minibatch_size,
        device=device,
        dtype=dtype,
        options={
            "fast": spec.fast,
            "value_worker": spec.value_worker == "true",
            "max_grad_norm": spec.max_grad_norm,
            "parallel_nets": spec.parallel_nets,
        },
    )


def resolve_auto(
    spec: PPOSpec,
    learner: Learner,
    *,
    threads: int = 0,
    device: str = "cpu",
    cores: int | None = None,
) -> PPOSpec:
    """``spec`` with ``value_worker=auto`` resolved: ``true`` where the value worker computes
    this step (its refusal of ``value_worker=true`` is None), at least 2 cores are usable
    (``cores``, default the process's) and ``threads`` (the run's; 0: auto) is not 1; else
    ``false``. Explicit ``true``/``false`` are returned unchanged."""
    if spec.value_worker != "auto":
        return spec
    wanted = replace(spec, value_worker="true")
    device_type = device.split(":")[0]
    applies = VALUE_WORKER.refusal(step_config(wanted, learner, device_type)) is None
    return replace(spec, value_worker=auto_flag("auto", applies, threads, cores))
