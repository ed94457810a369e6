"""The RL stream: replicas, shared friction schedules, episodes, probe window, checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from contlearn.envs import make_stream
from contlearn.envs.rl_stream import MujocoRLStream, RLStreamSpec
from contlearn.errors import ConfigError
from contlearn.running.config import resolve

pytestmark = pytest.mark.mujoco


def stream(seeds: list[int], **options) -> MujocoRLStream:
    cfg = resolve({"stream": "slippery-ant", **options})
    return make_stream("slippery-ant", cfg.stream_spec, seeds)


def actions(s: MujocoRLStream, n: int, seed: int = 0) -> torch.Tensor:
    """Fixed actions ``(n, R, E, A)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, s.num_replicas, s.num_envs, s.info.num_outputs, generator=g) * 2 - 1


def play(s: MujocoRLStream, acts: torch.Tensor) -> tuple[list, list]:
    feedback, episodes = [], []
    for a in acts:
        fb, ended = s.advance(a)
        feedback.append(fb)
        episodes.extend(ended)
    return feedback, episodes


def test_info_and_shapes() -> None:
    s = stream([0, 1], num_envs=2)
    assert s.info.kind == "rl" and s.info.metric == "episode_return"
    assert s.info.input_shape == (105,) and s.info.num_outputs == 8
    assert s.obs.shape == (2, 2, 105) and s.obs.dtype == torch.float32
    fb, _ = s.advance(torch.zeros(2, 2, 8))
    assert fb.reward.shape == fb.terminated.shape == fb.truncated.shape == (2, 2)
    assert fb.next_obs.shape == (2, 2, 105) and s.step == 2  # (environment steps: 2 copies)
    assert resolve({"stream": "slippery-ant"}).agent == "ppo"


def test_replica_in_batch_equals_seed_alone() -> None:
    batched = stream([3, 7], num_envs=2, max_episode_steps=60)
    alone = stream([7], num_envs=2, max_episode_steps=60)
    acts = actions(batched, 200)
    fb2, ep2 = play(batched, acts)
    fb1, ep1 = play(alone, acts[:, 1:])
    for a, b in zip(fb2, fb1, strict=True):
        assert all(torch.equal(x[1], y[0]) for x, y in zip(a, b, strict=True))
    assert [e._replace(replica=0) for e in ep2 if e.replica == 1] == ep1 and ep1


def test_copies_of_a_replica_share_the_friction_schedule() -> None:
    # (every 120 environment steps of a seed: 40 of each of its 3 copies)
    s = stream([0, 1], num_envs=3, change_every=120, change_immediately=True)
    first = s.friction.copy()
    play(s, actions(s, 100))
    assert np.all(s.friction == s.friction[:, :1])  # one world per replica
    assert s.friction[0, 0] != s.friction[1, 0]  # replicas draw their own frictions
    assert np.all(s.friction != first) and s.task.tolist() == [2, 2]
    assert not torch.equal(s.obs[0, 0], s.obs[0, 1])  # copies start from their own states


def test_episodes_end_with_final_obs_and_restart() -> None:
    s = stream([0], max_episode_steps=30)
    fb, episodes = play(s, torch.zeros(65, 1, 1, 8))
    assert [(e.length, e.task) for e in episodes] == [(30, 0), (30, 0)]
    assert bool(fb[29].truncated[0, 0]) and not torch.equal(fb[29].next_obs, s.obs)
    assert episodes[0].ret == pytest.approx(sum(float(f.reward[0, 0]) for f in fb[:30]))
    assert 0.02 <= episodes[0].friction <= 2.0


def test_probe_batch_is_the_recent_observations_acted_on() -> None:
    s = stream([0, 1], num_envs=2, probe_window=10)  # (10 environment steps: 5 loop steps)
    seen = []
    for a in actions(s, 7):
        seen.append(s.obs.clone())
        s.advance(a)
    window = s.probe_batch()
    assert window.shape == (2, 10, 105)
    expected = torch.stack(seen[-5:], 1).reshape(2, 10, 105)  # (R, steps·E, obs_dim)
    assert torch.equal(window, expected)


def test_every_rl_count_is_environment_steps() -> None:
    """steps, change_every and the probe window count a seed's environment steps over all
    of its copies (as stable-baselines3 and cleanrl count them)."""
    s = stream([0], num_envs=4, change_every=40, change_immediately=True)
    play(s, actions(s, 10))  # 10 loop steps: 40 environment steps, 10 of each copy
    assert s.step == 40 and s.task.tolist() == [1]  # (the world changed after 40 of them)
    with pytest.raises(ConfigError, match="multiple of num_envs=4"):
        stream([0], num_envs=4, change_every=30)
    with pytest.raises(ConfigError, match="steps=30 must be a multiple of num_envs=4"):
        resolve({"stream": "slippery-ant", "num_envs": 4, "change_every": 40, "steps": 30})
    old = s.state_dict()
    del old["step_unit"]  # (a checkpoint of a run made before: loop steps)
    with pytest.raises(ValueError, match="counts loop steps"):
        stream([0], num_envs=4, change_every=40).load_state_dict(old)


def test_state_round_trip_continues_identically() -> None:
    s = stream([4], num_envs=2, change_every=60, max_episode_steps=50)
    acts = actions(s, 120)
    play(s, acts[:45])
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    rest = play(s, acts[45:])
    buffer.seek(0)
    s2 = stream([4], num_envs=2, change_every=60, max_episode_steps=50)
    s2.load_state_dict(torch.load(buffer, weights_only=True))
    rest2 = play(s2, acts[45:])
    assert rest[1] == rest2[1] and rest[1]
    for a, b in zip(rest[0], rest2[0], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_async_copies_step_like_sync_ones() -> None:
    sync = stream([2], num_envs=2, max_episode_steps=10)
    asyn = stream([2], num_envs=2, max_episode_steps=10, vector="async")
    try:
        acts = actions(sync, 30)
        (fb_sync, ep_sync), (fb_async, ep_async) = play(sync, acts), play(asyn, acts)
        assert ep_sync == ep_async and len(ep_sync) >= 4
        for a, b in zip(fb_sync, fb_async, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        state = asyn.state_dict()
        assert len(state["copies"]) == 2
    finally:
        asyn.close()


def test_stationary_env_without_schedule() -> None:
    s = MujocoRLStream(RLStreamSpec(env_id="InvertedPendulum-v5"), [0])
    _, episodes = play(s, torch.zeros(50, 1, 1, 1) + 3.0)  # clipped to the action bound
    assert episodes and np.isnan(episodes[0].friction) and episodes[0].task == 0


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="friction_range_low"):
        resolve({"stream": "slippery-ant", "friction_range_low": 3.0})
    with pytest.raises(ConfigError, match="vector"):
        resolve({"stream": "slippery-ant", "vector": "threads"})
    with pytest.raises(ConfigError, match="cannot make env"):
        MujocoRLStream(RLStreamSpec(env_id="NoSuchEnv-v0"), [0])


def test_a_run_records_environment_steps_and_older_runs_load_in_them(tmp_path) -> None:
    import json

    import contlearn

    config = {"num_envs": 2, "change_every": 100, "max_episode_steps": 20, "hidden": "4"}
    config.update({"rollout": 32, "minibatch_size": 16, "epochs": 1, "probes": "none"})
    run = contlearn.run("slippery-ant", steps=80, config=config, out=tmp_path / "r")
    df = contlearn.load_runs(run.path)
    ends = df[df.metric == "episode_length"]
    assert df.step.max() == 80 and (ends.step % 2 == 0).all()  # (a loop step: 2 of them)
    assert ends.step.min() == 40  # (each copy's first 20-step episode ends at loop step 20)
    meta = json.loads((run.path / "meta.json").read_text())
    assert meta["step_unit"] == "env"
    del meta["step_unit"]  # (a run made before: its rows count loop steps)
    (run.path / "meta.json").write_text(json.dumps(meta))
    old = contlearn.load_runs(run.path)
    assert old.step.max() == 160  # (converted: the stored steps times the copies)


def test_the_stream_steps_as_a_naive_loop_over_its_env_copies() -> None:
    """Feedback, observations and the probe window against the env copies stepped by hand
    (seeded as the stream seeds them, reset where an episode ends, numbers cast to float32)."""
    from contlearn.envs.rl_stream import make_copy
    from contlearn.seeding import child_seed

    options = {"num_envs": 2, "vector": "sync", "max_episode_steps": 15, "change_every": 20}
    s = stream([5], change_immediately=True, probe_window=6, **options)
    words = child_seed(5, "stream").generate_state(3, np.uint32)
    kwargs = s._env_kwargs(int(words[0]))
    envs = [make_copy("contlearn/SlipperyAnt-v0", kwargs, 15) for _ in range(2)]
    obs = np.stack([env.reset(seed=int(w))[0] for env, w in zip(envs, words[1:], strict=True)])
    seen, ends = [], 0
    try:
        for a in actions(s, 40, seed=2) * 1.5:  # (some beyond the bounds: clipped)
            seen.append(torch.from_numpy(obs.astype(np.float32)))
            assert torch.equal(s.obs[0], seen[-1])
            fb, _ = s.advance(a)
            clipped = np.clip(a[0].double().numpy(), -1.0, 1.0)
            rows = [env.step(clipped[e]) for e, env in enumerate(envs)]
            final = np.stack([r[0] for r in rows])
            for e, (_, _, term, trunc, _) in enumerate(rows):
                if term or trunc:
                    ends += 1
                    final[e] = rows[e][0]
            nxt = np.stack(
                [envs[e].reset()[0] if r[2] or r[3] else r[0] for e, r in enumerate(rows)]
            )
            reward = np.array([r[1] for r in rows], np.float32)
            assert torch.equal(fb.reward[0], torch.from_numpy(reward))
            assert torch.equal(fb.terminated[0], torch.tensor([bool(r[2]) for r in rows]))
            assert torch.equal(fb.truncated[0], torch.tensor([bool(r[3]) for r in rows]))
            assert torch.equal(fb.next_obs[0], torch.from_numpy(final.astype(np.float32)))
            obs = nxt
        assert ends > 0  # episodes ended (the time limit), so resets were compared too
        want = torch.stack(seen[-3:]).reshape(1, 6, -1)  # the last 6 env steps, oldest first
        assert torch.equal(s.probe_batch(), want)
    finally:
        s.close()


def test_non_finite_actions_are_zeroed_and_bounded_and_the_callers_tensor_is_kept() -> None:
    """A diverged replica's NaN / ±inf actions reach MuJoCo as nan_to_num's finite values,
    clipped to the bounds, like any other action; the agent's tensor is not written."""
    a, b = stream([3]), stream([3])
    act = torch.tensor([[[float("nan"), float("inf"), -float("inf"), 0.5, 2.0, -3.0, 0.0, 0.1]]])
    kept = act.clone()
    fb_a, _ = a.advance(act)
    assert torch.equal(act.isnan(), kept.isnan()) and torch.equal(
        act.nan_to_num(), kept.nan_to_num()
    )
    # nan → 0, ±inf → ±(largest double) → the bounds
    fb_b, _ = b.advance(torch.tensor([[[0.0, 1.0, -1.0, 0.5, 1.0, -1.0, 0.0, 0.1]]]))
    assert torch.equal(fb_a.next_obs, fb_b.next_obs) and torch.equal(fb_a.reward, fb_b.reward)
