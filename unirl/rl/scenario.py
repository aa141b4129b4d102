"""The scenario interface of the GRPO engine: one module per scenario, four named steps, one shared loop.

Every scenario of DESIGN.md section 2 (``understand``, ``t2i``, ``t2i_cot``, ``edit``, ``prompt_refine``,
``reflect``) is a module ``unirl.rl.scenarios.<name>`` that defines a class implementing :class:`Scenario` and
exposes it as the module attribute ``SCENARIO``; :func:`get_scenario` imports the module lazily and builds
``SCENARIO(cfg)`` with the run's :class:`~unirl.rl.trainer.RLConfig`. The loop (:func:`unirl.rl.trainer.train_rl`)
calls, per training step::

    rollout = scenario.rollout(model, ref_model, prompts, G, generator)   # no_grad: P prompts x G samples
    rewards, parts = scenario.score(rollout)                               # (B,) total, {reward: [B floats]}
    adv = scenario.advantages(rewards, G)                                  # (B,) group-normalised
    for u in range(inner_updates):
        loss, stats = scenario.loss(model, ref_model, rollout, adv, u)     # with grad; engine.backward/step

Batch layout: ``B = P * G`` samples grouped consecutively (sample ``i`` belongs to prompt ``i // G``, the order
``repeat_interleave`` gives), so ``group_advantages`` normalises each prompt's group. ``generator`` is a CPU
``torch.Generator`` seeded by the loop from (seed, step, rank): a run and its resume draw the same noise.

``loss`` stats: scalars (floats) the loop logs as ``loss/<key>``. The monitors the loop expects where they apply:
``kl`` (mean KL term), ``clip_fraction``, ``ratio_max_dev`` and, on update 0, ``logprob_gap`` (mean |rollout
log-prob - recomputed log-prob|; 0 up to float error when rollout and loss use identical inputs).

Shared defaults: :class:`ScenarioBase` (every scenario) and :class:`DMScenarioBase` (the scenarios whose DM samples
with the SDE: one :class:`~unirl.rl.dm_policy.DMSampling` for rollout, loss and evaluation, the Flow-GRPO loss,
batched ODE evaluation images); the joint LM + DM scenarios build on the latter (:mod:`unirl.rl.joint`).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from unirl.rewards.registry import combine
from unirl.rl.dm_policy import DMRollout, DMSampling, dm_loss, ode_images
from unirl.rl.grpo import group_advantages

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from unirl.models.unified import UnifiedModel
    from unirl.rl.trainer import RLConfig

__all__ = [
    "DM_GROUPS",
    "LM_GROUPS",
    "DMScenarioBase",
    "SCENARIOS",
    "Rollout",
    "Scenario",
    "ScenarioBase",
    "get_scenario",
    "param_groups",
]

SCENARIOS: tuple[str, ...] = ("understand", "t2i", "t2i_cot", "edit", "prompt_refine", "reflect")
# Components of UnifiedModel.parameter_groups() per expert: each expert gets its own learning rate.
LM_GROUPS: tuple[str, ...] = ("lm", "vision")
DM_GROUPS: tuple[str, ...] = ("dit", "connector", "t2i_queries", "i2i_queries", "ref")


@dataclass
class Rollout:
    """One rollout batch: ``P`` prompts x ``G`` samples, ``B = P * G`` grouped consecutively (repeat_interleave).

    ``lm`` holds the LM trajectory (the LM scenarios' record, e.g. ``unirl.rl.lm_policy.LMRollout``), ``dm`` the
    DM trajectory (:class:`unirl.rl.dm_policy.DMRollout`); either is None when that expert samples nothing.
    ``images``/``texts`` are the ``B`` final samples; ``extras`` holds anything else a scenario needs in ``loss``.
    """

    prompts: list[dict]  # the P shard metas
    group_size: int
    lm: Any | None = None
    dm: Any | None = None
    images: list | None = None  # B PIL images
    texts: list[str] | None = None  # B texts
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.prompts) * self.group_size

    def sample_metas(self) -> list[dict]:
        """The ``B`` per-sample metas: each prompt's meta repeated ``G`` times (the batch order)."""
        return [m for m in self.prompts for _ in range(self.group_size)]


@runtime_checkable
class Scenario(Protocol):
    """What :func:`unirl.rl.trainer.train_rl` needs from a scenario: the four named steps + evaluation."""

    name: str
    data_task: str  # shard task directory the prompts come from (data/shards/<data_task>/{train,test}-*.tar)
    train_mode: str | list[str]  # UnifiedModel.set_trainable mode, or a list of parameter_groups() components

    def rollout(
        self, model: UnifiedModel, ref_model: UnifiedModel, prompts: list[dict], group_size: int,
        generator: torch.Generator,
    ) -> Rollout: ...

    def score(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, list[float]]]: ...

    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor: ...

    def loss(
        self, model: UnifiedModel, ref_model: UnifiedModel, rollout: Rollout, advantages: torch.Tensor,
        update_index: int,
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: UnifiedModel, prompts: list[dict], seed: int) -> dict[str, float]: ...

    def preview(
        self, model: UnifiedModel, prompts: list[dict], seed: int
    ) -> tuple[list[Image.Image], list[str]]: ...


class ScenarioBase:
    """Defaults shared by the scenarios: config access, reward combination, group advantages, no preview.

    Subclasses set ``name``, ``train_mode`` (and ``data_task`` when it differs from ``name``) and implement
    ``rollout``, ``loss``, ``evaluate`` and, for the score, either ``score`` or ``reward_inputs``.
    """

    name: str = ""
    data_task: str = ""
    train_mode: str | list[str] = "none"
    eval_uses_seed: bool = True  # False: ``evaluate`` is deterministic (greedy text), one repeat is enough

    def __init__(self, cfg: RLConfig) -> None:
        self.cfg = cfg
        if not self.data_task:
            self.data_task = self.name

    # --- score ---
    def reward_inputs(self, rollout: Rollout) -> tuple[Sequence[Any], list[str], list[dict]]:
        """``(samples, prompts, metadata)`` handed to the reward functions (one entry per sample)."""
        raise NotImplementedError(f"scenario {self.name!r} must implement reward_inputs or score")

    def score(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, list[float]]]:
        """``cfg.rewards``-weighted sum of the registered rewards on :meth:`reward_inputs`: (B,) + parts."""
        samples, prompts, metadata = self.reward_inputs(rollout)
        total, parts = combine(self.cfg.rewards, samples, prompts, metadata)
        return torch.tensor(total, dtype=torch.float32), parts  # (B,)

    # --- advantages ---
    def advantages(self, rewards: torch.Tensor, group_size: int) -> torch.Tensor:
        """Group-normalised advantages ``clip((R - mean_g) / (std_g + 1e-4), -5, 5)`` (B,)."""
        return group_advantages(rewards, group_size)

    # --- before/after pictures ---
    def preview(self, model: UnifiedModel, prompts: list[dict], seed: int) -> tuple[list[Image.Image], list[str]]:
        """Images (and captions) for the before/after grid; scenarios without images return empty lists."""
        return [], []

    # --- trainable parameters ---
    def param_groups(self, model: UnifiedModel) -> list[dict]:
        """Freeze all but ``train_mode``; return the engine's per-expert groups (see :func:`param_groups`)."""
        return param_groups(model, self.train_mode, self.cfg.lr_lm, self.cfg.lr_dm)

    # --- evaluation ---
    def eval_batches(self, items: Sequence[Any]) -> Iterator[tuple[int, Sequence[Any]]]:
        """``(i, items[i : i + eval_batch_size])`` over ``items``: the evaluation batches (at least 1 item each)."""
        bs = max(1, self.cfg.eval_batch_size)
        for i in range(0, len(items), bs):
            yield i, items[i : i + bs]


class DMScenarioBase(ScenarioBase):
    """Defaults of the scenarios whose DM samples with the Flow-GRPO SDE (``t2i``, ``edit`` and the joint ones).

    One :class:`DMSampling` from the config serves rollout, loss and evaluation (:meth:`sampling`); the DM loss
    (:meth:`dm_part`) replays the trajectories :meth:`dm_trajectories` names, and ``loss`` is that loss alone (the
    joint scenarios add the LM's: :class:`unirl.rl.joint.JointScenarioBase`); :meth:`ode_images` draws evaluation
    images with the Euler ODE in batches of ``eval_batch_size``.
    """

    def sampling(self, model: UnifiedModel) -> DMSampling:
        return DMSampling.from_config(self.cfg, model)

    # --- loss ---
    def dm_trajectories(self, rollout: Rollout,
                        advantages: torch.Tensor) -> tuple[list[DMRollout], list[torch.Tensor]]:
        """The stored DM trajectories the loss replays, each with its samples' advantages: the rollout's ``dm``."""
        return [rollout.dm], [advantages]

    def dm_part(self, model: UnifiedModel, ref_model: UnifiedModel, rollout: Rollout, advantages: torch.Tensor,
                update_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L_DM: Flow-GRPO on the stored transitions of :meth:`dm_trajectories`, replayed in ONE batched DiT pass
        (:func:`unirl.rl.dm_policy.dm_loss`, clip ``rl.clip_eps_dm``, KL weight ``rl.beta_dm``)."""
        rollouts, advs = self.dm_trajectories(rollout, advantages)
        return dm_loss(model, ref_model, rollouts, advs, self.cfg.clip_eps_dm, self.cfg.beta_dm, update_index,
                       self.cfg.replay_chunk)

    def loss(self, model: UnifiedModel, ref_model: UnifiedModel, rollout: Rollout, advantages: torch.Tensor,
             update_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        return self.dm_part(model, ref_model, rollout, advantages, update_index)

    # --- evaluation ---
    def ode_images(self, model: UnifiedModel, texts: Sequence[str], seeds: Sequence[int],
                   sources: Sequence[Any] | None = None,
                   prefix_ids: Sequence[Sequence[int]] | None = None) -> list[Image.Image]:
        """Euler ODE images of ``texts`` (seed ``seeds[i]`` for text i; ``rl.eval_steps`` steps, 0: the rollout's),
        editing ``sources`` when given (:func:`unirl.rl.dm_policy.ode_images`)."""
        return ode_images(model, texts, seeds, self.sampling(model), self.cfg.eval_batch_size, sources=sources,
                          steps=self.cfg.eval_steps or None, prefix_ids=prefix_ids)


def param_groups(model: UnifiedModel, train_mode: str | list[str], lr_lm: float, lr_dm: float) -> list[dict]:
    """Set ``requires_grad`` on exactly ``train_mode``'s parameters; groups ``lm`` (lr_lm) and ``dm`` (lr_dm).

    ``train_mode`` is a ``UnifiedModel.set_trainable`` mode or a list of ``parameter_groups()`` components.
    Groups with no trainable parameter are left out (the engine rejects empty groups).
    """
    from unirl.models.unified import TRAIN_MODES

    if isinstance(train_mode, str) and train_mode not in TRAIN_MODES:
        raise ValueError(f"unknown train_mode {train_mode!r}; known: {sorted(TRAIN_MODES)}")
    components = TRAIN_MODES[train_mode] if isinstance(train_mode, str) else tuple(train_mode)
    named = model.parameter_groups()
    unknown = sorted(set(components) - set(named))
    if unknown:
        raise ValueError(f"train_mode lists unknown component(s) {unknown}; known: {sorted(named)}")
    for p in model.parameters():
        p.requires_grad_(False)
    groups = []
    for gname, comps, lr in (("lm", LM_GROUPS, lr_lm), ("dm", DM_GROUPS, lr_dm)):
        params = [p for c in comps if c in components for _, p in named[c]]
        for p in params:
            p.requires_grad_(True)
        if params:
            groups.append({"params": params, "lr": float(lr), "name": gname})
    if not groups:
        raise ValueError(f"train_mode {train_mode!r} trains nothing")
    return groups


def get_scenario(name: str, cfg: RLConfig) -> Scenario:
    """Import ``unirl.rl.scenarios.<name>`` and build its ``SCENARIO`` class with ``cfg``."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; known: {list(SCENARIOS)}")
    try:
        module = importlib.import_module(f"unirl.rl.scenarios.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"unirl.rl.scenarios.{name}":
            msg = f"scenario {name!r} is not implemented yet (no module unirl/rl/scenarios/{name}.py)"
            raise ValueError(msg) from e
        raise
    cls = getattr(module, "SCENARIO", None)
    if cls is None:
        raise AttributeError(f"unirl/rl/scenarios/{name}.py must define SCENARIO = <its scenario class>")
    return cls(cfg)
