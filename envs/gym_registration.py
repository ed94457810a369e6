"""Register contlearn's gymnasium environments (``contlearn/...`` ids).

Entry points are strings, so registering imports neither mujoco nor the env modules; they are
imported when ``gymnasium.make`` first builds one of these ids.
"""

from __future__ import annotations

import gymnasium

#: (id, entry point) of every contlearn gymnasium environment; all use 1000-step episodes.
ENVS: tuple[tuple[str, str], ...] = (
    ("contlearn/SlipperyAnt-v0", "contlearn.envs.slippery_ant:SlipperyAntEnv"),
    ("contlearn/SlipperyHalfCheetah-v0", "contlearn.envs.mujoco_schedule:SlipperyHalfCheetahEnv"),
    ("contlearn/SlipperyHopper-v0", "contlearn.envs.mujoco_schedule:SlipperyHopperEnv"),
    ("contlearn/SlipperyWalker2d-v0", "contlearn.envs.mujoco_schedule:SlipperyWalker2dEnv"),
)


def register_envs() -> None:
    """Register every id in :data:`ENVS` with gymnasium; ids already registered are skipped."""
    for env_id, entry_point in ENVS:
        if env_id not in gymnasium.registry:
            gymnasium.register(id=env_id, entry_point=entry_point, max_episode_steps=1000)
