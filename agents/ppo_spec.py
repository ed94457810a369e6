"""The options of the PPO agent (:class:`~contlearn.agents.ppo.PPOAgent`)."""

from __future__ import annotations

from dataclasses import dataclass

from contlearn.agents.networks import ACTIVATIONS, INITS
from contlearn.backends.auto import AUTO_CHOICES
from contlearn.errors import ConfigError
from contlearn.learners.optim import OptimizerOptions
from contlearn.spec import param, parse_int_list


@dataclass(frozen=True)
class PPOSpec(OptimizerOptions):
    """Options of the PPO agent; defaults are Dohare et al.'s Slippery Ant settings (Adam
    β1 = 0.9, β2 = 0.999 for PPO; β1 = β2 = 0.99 with CBP, L2 and proper Adam)."""

    optimizer: str = param(
        "adam", "base optimizer (one, over both networks)", choices=("sgd", "adam")
    )
    lr: float = param(1e-4, "learning rate (step size)", low=0.0, low_open=True)
    hidden: str = param("256,256", "hidden widths of the policy and of the value net")
    activation: str = param("relu", "hidden nonlinearity", choices=tuple(ACTIVATIONS))
    init: str = param("lecun_uniform", "weight init distribution", choices=INITS)
    rollout: int = param(2048, "transitions per replica between updates (all env copies)", low=1)
    epochs: int = param(10, "passes over each rollout", low=1)
    minibatch_size: int = param(128, "transitions per minibatch update (16 per rollout)", low=1)
    gamma: float = param(0.99, "discount γ", low=0.0, high=1.0)
    gae_lambda: float = param(0.95, "GAE λ", low=0.0, high=1.0)
    clip: float = param(0.2, "PPO clip ε of the probability ratio", low=0.0)
    vf_coef: float = param(1.0, "weight of the squared value error in the loss", low=0.0)
    ent_coef: float = param(0.0, "weight of the entropy bonus", low=0.0)
    norm_adv: bool = param(True, "normalise advantages over each rollout, per replica")
    max_grad_norm: float = param(0.0, "clip each replica's gradient norm (0: off)", low=0.0)
    init_log_std: float = param(0.0, "initial log standard deviation of the policy")
    bootstrap_truncated: bool = param(
        False,
        "bootstrap from V(final obs) at time-limit"
        " truncations (paper: no, a truncation ends the return)",
    )
    fast: bool = param(
        True,
        "run the first backend that supports this configuration, e.g. the"
        " hand-written minibatch gradients (false: the autograd reference; same"
        " numbers to float rounding)",
    )
    update_threads: int = param(
        0,
        "torch threads during the update phase only (0: the run's"
        " setting; acting and env stepping keep the run's threads)",
        low=0,
    )
    parallel_nets: bool = param(
        False,
        "run the policy's and the value net's passes of each"
        " minibatch in two threads (fast path; for 2 free cores)",
    )
    value_worker: str = param(
        "auto",
        "run the value net's minibatch updates in a second"
        " process while this one runs the policy's (learners bp, adam,"
        " proper-adam; same numbers); auto: where it applies, 2+ cores"
        " and threads != 1",
        choices=AUTO_CHOICES,
    )

    def __post_init__(self) -> None:
        # a bool (Python callers, TOML's true/false) names the same choice as its string
        if isinstance(self.value_worker, bool):
            object.__setattr__(self, "value_worker", str(self.value_worker).lower())

    def validate(self) -> None:
        """Hidden widths parse; minibatches tile the rollout."""
        parse_int_list(self.hidden, "hidden")
        if self.rollout % self.minibatch_size:
            raise ConfigError(
                f"rollout={self.rollout} is not a multiple of minibatch_size={self.minibatch_size}"
            )
