"""Tests for cvl.py. Every dataset here is made from real short MuJoCo rollouts in D4RL layout.

Run: python -m pytest -q test_cvl.py
"""
from __future__ import annotations

import csv
import dataclasses
import http.server
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import cvl

HERE = Path(__file__).resolve().parent
ENV_ID = "HalfCheetah-v4"


# ------------------------------------------------------------------------------------------------- fixtures
def rollouts(episodes: int, length: int, seed: int, constant_action: bool = False) -> dict[str, np.ndarray]:
    """Real HalfCheetah-v4 rollouts in D4RL layout (with next_observations).

    constant_action: each episode repeats one random action, so (s, a) tells which episode, hence which future.
    """
    import gymnasium as gym

    with cvl.quiet_env_creation():
        env = gym.make(ENV_ID)
    rng = np.random.default_rng(seed)
    keys = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
    out = {k: [] for k in keys}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed * 1000 + ep)
        episode_action = rng.uniform(-1, 1, env.action_space.shape)
        for t in range(length):
            if constant_action:
                action = episode_action
            else:
                action = np.clip(0.6 * np.sin(0.2 * t + np.arange(6)) + 0.3 * rng.standard_normal(6), -1, 1)
            next_obs, reward, terminated, _, _ = env.step(action.astype(np.float32))
            for k, v in zip(keys, (obs, action, reward, terminated, t == length - 1, next_obs)):
                out[k].append(v)
            obs = next_obs
    env.close()
    return {k: np.asarray(v, dtype=np.float32 if k not in ("terminals", "timeouts") else bool) for k, v in out.items()}


def write_hdf5(path: Path, raw: dict[str, np.ndarray]) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in raw.items():
            f[k] = v
    return path


@pytest.fixture(scope="session")
def raw_small():
    return rollouts(episodes=12, length=60, seed=0)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, raw_small):
    return write_hdf5(tmp_path_factory.mktemp("data") / "halfcheetah_fixture.hdf5", raw_small)


def small_config(dataset: Path, out: Path, **kw) -> cvl.Config:
    """A tiny but complete configuration: fast to compile and run on 2 CPU cores."""
    base = dict(dataset=str(dataset), eval_env=ENV_ID, hidden=(32, 32), batch_size=64, repr_dim=8, steps=200,
                updates_per_call=50, eval_every=100, eval_episodes=2, checkpoint_every=100, out=str(out),
                progress=False)
    return cvl.make_config("cpu", **{**base, **kw})


def read_rows(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("wall_time", "updates_per_sec")} for r in rows]


def run_cli(*args, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(HERE / "cvl.py"), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=HERE)
    if check and proc.returncode != 0:
        raise AssertionError(f"cvl.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


# --------------------------------------------------------------------------------------- data and loading
def test_split_episodes_uses_terminals_timeouts_and_observation_breaks():
    obs = np.arange(10, dtype=np.float32)[:, None].repeat(2, axis=1)
    next_obs = obs + 1
    next_obs[6] = -5  # a break without a flag: next_observations[6] != observations[7]
    raw = dict(observations=obs, next_observations=next_obs, terminals=np.zeros(10, bool), timeouts=np.zeros(10, bool))
    raw["terminals"][2] = True
    raw["timeouts"][4] = True
    assert cvl.split_episodes(raw).tolist() == [2, 2, 2, 4, 4, 6, 6, 9, 9, 9]


def test_loader_reads_hdf5_and_npz_into_episodes(tmp_path, raw_small, dataset):
    raw = cvl.read_dataset_file(dataset)
    assert raw["observations"].shape == (720, 17) and raw["actions"].shape == (720, 6)
    np.savez(tmp_path / "same.npz", **raw_small)
    assert np.array_equal(cvl.read_dataset_file(tmp_path / "same.npz")["rewards"], raw["rewards"])
    data = cvl.make_data(raw)
    ends = np.asarray(data.episode_end)
    assert len(np.unique(ends)) == 12 and set(np.diff(np.unique(ends))) == {60}
    assert len(data.anchors) == 720  # every step's next state is stored: even the last step has a future
    no_next = cvl.make_data({k: v for k, v in raw.items() if k != 'next_observations'})
    assert len(no_next.anchors) == 720 - 12  # without it the last step of each episode has none
    assert (ends[np.asarray(data.anchors)] >= np.asarray(data.anchors)).all()


def test_d4rl_names_urls_and_cache(monkeypatch, tmp_path):
    for env in ("halfcheetah", "hopper", "walker2d"):
        for kind in ("random", "medium", "medium-replay", "medium-expert", "expert"):
            assert f"{env}-{kind}-v2" in cvl.D4RL_NAMES
    monkeypatch.delenv("CVL_D4RL_URL", raising=False)
    assert cvl.d4rl_url("halfcheetah-medium-replay-v2") == (
        "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/halfcheetah_medium_replay-v2.hdf5")
    assert cvl.d4rl_url("hopper-medium-v2", "http://mirror/x/").startswith("http://mirror/x/gym_mujoco_v2/")
    monkeypatch.setenv("CVL_D4RL_URL", "http://env-mirror")
    assert cvl.d4rl_url("hopper-expert-v2") == "http://env-mirror/gym_mujoco_v2/hopper_expert-v2.hdf5"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    assert cvl.d4rl_cache_dir() == tmp_path
    assert cvl.eval_env_spec(cvl.Config(env="walker2d-medium-v2")) == ("Walker2d-v4", 1.629008, 4592.3)


# ------------------------------------------------------------------------------------------------ download
class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves files from `files`, honours Range, and cuts the first transfer of `cut_once` files midway."""

    files: dict[str, bytes] = {}
    cut_once: set[str] = set()
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Range")))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if self.path in self.cut_once:
            self.cut_once.discard(self.path)
            self.wfile.write(body[start: start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the transfer dies midway
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    RangeHandler.files, RangeHandler.cut_once, RangeHandler.requests = {}, set(), []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", RangeHandler
    server.shutdown()


def test_download_cut_midway_leaves_no_file_then_resumes(http_server, tmp_path, dataset):
    base, handler = http_server
    body = dataset.read_bytes()
    handler.files["/d.hdf5"] = body
    handler.cut_once.add("/d.hdf5")
    target = tmp_path / "cache" / "d.hdf5"
    with pytest.raises(cvl.CVLError) as err:
        cvl.download(f"{base}/d.hdf5", target)
    message = str(err.value)
    assert f"{base}/d.hdf5" in message and str(target) in message and "\n" not in message
    assert not target.exists()  # nothing half-written under the dataset's name
    part = target.with_name("d.hdf5.part")
    assert 0 < part.stat().st_size < len(body)
    cvl.download(f"{base}/d.hdf5", target)  # resumes where it stopped
    assert handler.requests[-1][1] == f"bytes={len(body) // 2}-"
    assert target.read_bytes() == body and not part.exists()


def test_download_of_a_non_dataset_is_rejected(http_server, tmp_path):
    base, handler = http_server
    handler.files["/bad.hdf5"] = b"<html>this host is down</html>"
    target = tmp_path / "bad.hdf5"
    with pytest.raises(cvl.CVLError, match="not a valid D4RL dataset"):
        cvl.download(f"{base}/bad.hdf5", target)
    assert not target.exists() and not target.with_name("bad.hdf5.part").exists()
    with pytest.raises(cvl.CVLError, match="404"):
        cvl.download(f"{base}/missing.hdf5", tmp_path / "missing.hdf5")


def test_d4rl_name_downloads_through_mirror_into_d4rl_cache(http_server, tmp_path, dataset, monkeypatch):
    base, handler = http_server
    handler.files["/mirror/gym_mujoco_v2/halfcheetah_medium-v2.hdf5"] = dataset.read_bytes()
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    cfg = cvl.Config(env="halfcheetah-medium-v2", d4rl_url=f"{base}/mirror")
    path = cvl.resolve_dataset(cfg)
    assert path == tmp_path / "d4rl" / "halfcheetah_medium-v2.hdf5" and path.read_bytes() == dataset.read_bytes()
    assert cvl.resolve_dataset(cfg) == path and len(handler.requests) == 1  # cached: no second download
    # the environment variable has the same meaning as the flag
    monkeypatch.setenv("CVL_D4RL_URL", f"{base}/mirror")
    handler.files["/mirror/gym_mujoco_v2/halfcheetah_expert-v2.hdf5"] = dataset.read_bytes()
    assert cvl.resolve_dataset(cvl.Config(env="halfcheetah-expert-v2")).exists()


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.pop("timeouts"), "lacks key(s) timeouts"),
    (lambda r: r.__setitem__("rewards", r["rewards"][:-3]), "key 'rewards' has 717 rows"),
    (lambda r: r.__setitem__("observations", r["observations"][:, :11]), "key 'observations' has shape (720, 11)"),
    (lambda r: r["observations"].__setitem__((123, 4), np.nan), "key 'observations' row 123 is NaN"),
    (lambda r: r["actions"].__setitem__((77, 2), 1.5), "key 'actions' row 77 is outside"),
    (lambda r: (r.pop("next_observations"), r.__setitem__("timeouts", np.ones(720, bool))),
     "no episode has more than one step"),
])
def test_bad_datasets_give_one_clear_line(tmp_path, raw_small, mutate, expected):
    raw = {k: v.copy() for k, v in raw_small.items()}
    mutate(raw)
    path = write_hdf5(tmp_path / "halfcheetah_bad.hdf5", raw)
    cfg = small_config(path, tmp_path)
    with pytest.raises(cvl.CVLError) as err:
        cvl.load_env_data(cfg)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_actions_slightly_out_of_bounds_are_clipped_with_a_warning(tmp_path, raw_small):
    raw = {k: v.copy() for k, v in raw_small.items()}
    raw["actions"][5, 0] = 1.0 + 1e-5
    with pytest.warns(UserWarning, match="clipped"):
        checked = cvl.validate_dataset(raw, "f.hdf5", 17, 6)
    assert checked["actions"].max() <= 1.0


def test_missing_corrupt_and_unknown_inputs_fail_clearly(tmp_path, dataset):
    with pytest.raises(cvl.CVLError, match="does not exist"):
        cvl.read_dataset_file(tmp_path / "nope.hdf5")
    corrupt = tmp_path / "corrupt.hdf5"
    corrupt.write_bytes(dataset.read_bytes()[: 5000])
    with pytest.raises(cvl.CVLError, match="corrupt or partially downloaded"):
        cvl.read_dataset_file(corrupt)
    with pytest.raises(cvl.CVLError, match="did you mean halfcheetah-medium-v2"):
        cvl.d4rl_url("halfcheetah-meduim-v2")
    with pytest.raises(cvl.CVLError, match="cannot infer the evaluation env"):
        cvl.eval_env_spec(cvl.Config(dataset=str(tmp_path / "mystery.hdf5")))
    with pytest.raises(cvl.CVLError, match="does nothing with --q-estimator normalized"):
        cvl.check_config(cvl.Config(density_ratio="corrected"))
    cvl.check_config(cvl.Config(density_ratio="corrected", q_estimator="diag"))
    # a config saved before --goal-reward existed loads with the reward those runs used
    saved = dataclasses.asdict(cvl.Config(q_estimator="diag"))
    del saved["goal_reward"]
    assert cvl.config_from_dict(saved).goal_reward == "goal"
    assert cvl.config_from_dict(dataclasses.asdict(cvl.Config())).goal_reward == "arrival"
    proc = run_cli("--env", "hopper-medum-v2", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("cvl: error: unknown D4RL env 'hopper-medum-v2'")
    assert "hopper-medium-v2" in proc.stderr


# -------------------------------------------------------------------------------------------- goal sampling
def test_future_offset_follows_truncated_geometric():
    gamma, n = 0.9, 200_000
    for horizon in (1, 7, 40):
        k = np.asarray(cvl.sample_future_offset(jax.random.key(horizon), jnp.full((n,), horizon), gamma))
        assert k.min() >= 1 and k.max() <= horizon
        pmf = gamma ** np.arange(horizon) / np.sum(gamma ** np.arange(horizon))
        counts = np.bincount(k, minlength=horizon + 1)[1:]
        chi2 = np.sum((counts - n * pmf) ** 2 / (n * pmf))
        # 99.9% quantile of chi-square with df = horizon - 1 is below 3 * df + 20 for these df
        assert chi2 < 3 * (horizon - 1) + 20, (horizon, chi2)


def row_of(obs: np.ndarray, states: np.ndarray) -> np.ndarray:
    """Index of each state among the rows of obs (states are unique in the rollouts)."""
    return np.array([np.flatnonzero((obs == s).all(1))[0] for s in states])


def test_goals_never_cross_an_episode_end(raw_small):
    data = cvl.make_data(raw_small)
    obs, next_obs = np.asarray(data.observations), np.asarray(data.next_observations)
    for i in range(5):
        b = cvl.sample_batch(data, jax.random.key(i), 512, 0.99, "arrival")
        t, j = row_of(obs, np.asarray(b.observations)), row_of(next_obs, np.asarray(b.goals))
        assert (j >= t).all() and (j <= np.asarray(data.episode_end)[t]).all()  # goal s_{j+1}, j in [t, e]
        assert not np.asarray(b.absorbing).any()  # the fixture's episodes end by time limits only
        assert np.allclose(np.asarray(b.goal_rewards), np.asarray(data.rewards)[j])


def discounted_future_rewards(rewards, t, end, terminal, gamma, known_end=None) -> float:
    """E[r(g)] under the discounted future of row t, by a plain loop over the episode's steps.

    After a termination the agent earns 0 for ever, so the weights (1 - gamma) gamma^k need no renormalising;
    after a time limit only the known steps t..known_end count, renormalised to sum to 1."""
    known_end = end if known_end is None else known_end
    last = end if terminal else known_end
    total, weight = 0.0, 0.0
    for k, row in enumerate(range(t, last + 1)):
        total += (1 - gamma) * gamma ** k * rewards[row]
        weight += (1 - gamma) * gamma ** k
    return total if terminal else total / weight


def hand_made_episodes():
    """Three 6-step episodes with known rewards: a fall, a time limit, a fall; next_observations stored."""
    n = 18
    obs = np.arange(n, dtype=np.float32)[:, None].repeat(2, axis=1)
    rewards = np.linspace(1.0, 3.0, n).astype(np.float32) ** 2
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[[5, 17]], timeouts[11] = True, True
    next_obs = obs + 1.0
    next_obs[[5, 11, 17]] -= 0.5  # s_{e+1} after an episode's last row: not the next episode's first state
    return dict(observations=obs, next_observations=next_obs, actions=np.zeros((n, 1), np.float32),
                rewards=rewards, terminals=terminals, timeouts=timeouts)


@pytest.mark.parametrize("stored_next", [True, False])
def test_goal_reward_averages_the_discounted_return_with_zeros_after_a_fall(stored_next):
    """E[r(g)] = (1 - gamma) sum_k gamma^k r_{t+k} with 0 after a fall (the fall's own reward r_e counts), and the
    renormalised truncated sum after a timeout; so a fall and a timeout at the same row now differ."""
    raw = hand_made_episodes()
    if not stored_next:
        del raw["next_observations"]
    data = cvl.make_data(raw)
    gamma, n = 0.7, 400_000
    rewards = raw["rewards"].astype(np.float64)
    for t in (0, 3, 5, 6, 10, 12, 17):
        terminal, end = bool(raw["terminals"][(t // 6) * 6 + 5]), (t // 6) * 6 + 5
        known_end = end if stored_next else end - 1
        if not terminal and t > known_end:
            assert t not in np.asarray(data.anchors)  # no known future: never drawn
            continue
        exact = discounted_future_rewards(rewards, t, end, terminal, gamma, known_end)
        goals, absorbing, r = cvl.sample_goals(data, jax.random.key(t), jnp.full((n,), t), gamma, "arrival")
        r, absorbing = np.asarray(r, np.float64), np.asarray(absorbing)
        assert abs(r.mean() - exact) < 5 * r.std() / np.sqrt(n) + 1e-6, (t, r.mean(), exact)
        # absorbed exactly when the goal lies past the last known state, with probability gamma^(steps known)
        p_absorbed = gamma ** (known_end - t + 1) if terminal else 0.0
        assert abs(absorbing.mean() - p_absorbed) < 5 * np.sqrt(p_absorbed * (1 - p_absorbed) / n) + 1e-9
        assert (r[absorbing] == 0).all() or (not stored_next and (r[absorbing] == rewards[end]).any())
        real = np.asarray(goals)[~absorbing][:, 0]
        assert (real > t).all() and (real <= end + 1).all()  # goal states s_{t+1} .. s_{e+1} of the episode
    # the same rows ended by a timeout instead of a fall: the future is renormalised, not zero-padded
    cut = {**raw, "terminals": np.zeros(18, bool), "timeouts": raw["terminals"] | raw["timeouts"]}
    data_cut = cvl.make_data(cut)
    for t in (3, 15):
        r_fall = np.asarray(cvl.sample_goals(data, jax.random.key(1), jnp.full((n,), t), gamma, "arrival")[2])
        r_cut = np.asarray(cvl.sample_goals(data_cut, jax.random.key(1), jnp.full((n,), t), gamma, "arrival")[2])
        assert r_cut.mean() > r_fall.mean() + 0.05 * rewards.max(), (t, r_cut.mean(), r_fall.mean())


def test_a_one_step_episode_that_falls_still_has_a_future():
    raw = hand_made_episodes()
    raw["terminals"][0], raw["timeouts"][:] = True, False  # row 0 is an episode of its own, ended by a fall
    data = cvl.make_data(raw)
    assert 0 in np.asarray(data.anchors)
    cvl.validate_dataset({**raw, "terminals": np.ones(18, bool)}, "f", 2, 1)  # every episode one step: still fine
    goals, absorbing, r = cvl.sample_goals(data, jax.random.key(0), jnp.zeros(1000, jnp.int32), 0.9, "arrival")
    r, absorbing = np.asarray(r), np.asarray(absorbing)
    assert np.allclose(r[~absorbing], raw["rewards"][0]) and (r[absorbing] == 0).all()
    assert abs(absorbing.mean() - 0.9) < 0.05


def test_arrival_goal_reward_makes_the_goal_average_the_discounted_return(raw_small):
    """With r(g) = rewards[j] for g = s_{j+1}, E[r(g)] is the normalised discounted return from t; the original
    code's rewards[j + 1] is that shifted by one step."""
    data = cvl.make_data(raw_small)
    gamma, n = 0.9, 200_000
    t = int(np.asarray(data.anchors)[3])
    end = int(np.asarray(data.episode_end)[t])
    horizon = end - t  # the fixture stores next_observations, so the goals are s_{t+1} .. s_{end+1}
    rewards = np.asarray(data.rewards, np.float64)
    for kind, first in (("arrival", t), ("goal", t + 1)):
        padded = np.concatenate([rewards[first:end + 1], [0.0] * (first - t)])  # "goal" has no reward past end
        disc = gamma ** np.arange(horizon + 1)
        exact = np.sum(disc * padded) * (1 - gamma) / (1 - gamma ** (horizon + 1))
        sampled = np.asarray(cvl.sample_goals(data, jax.random.key(0), jnp.full((n,), t), gamma, kind)[2], np.float64)
        se = sampled.std() / np.sqrt(n)
        assert abs(sampled.mean() - exact) < 5 * se + 1e-6, (kind, sampled.mean(), exact, se)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=12), st.data())
def test_property_splitting_and_sampling_on_random_layouts(lengths, draw):
    """Episodes of any lengths (1 step too), ended by terminals, timeouts or unflagged breaks, or one giant one."""
    n = sum(lengths)
    obs = np.arange(n, dtype=np.float32)[:, None].repeat(3, axis=1)
    next_obs = obs + 1
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    ends = np.cumsum(lengths) - 1
    stored_next = draw.draw(st.booleans())  # without next_observations an unflagged break cannot be seen
    for e in ends[:-1]:
        how = draw.draw(st.sampled_from(["terminal", "timeout", "both"] + ["break"] * stored_next))
        terminals[e] |= how in ("terminal", "both")
        timeouts[e] |= how in ("timeout", "both")
        if how == "break":
            next_obs[e] = -1.0
    raw = dict(observations=obs, next_observations=next_obs, actions=np.zeros((n, 1), np.float32),
               rewards=obs[:, 0].copy(), terminals=terminals, timeouts=timeouts)  # r_j = j: names the goal's row
    expected_end = np.repeat(ends, lengths)
    assert cvl.split_episodes(raw).tolist() == expected_end.tolist()
    if not stored_next:
        del raw["next_observations"]
    fell = terminals[expected_end]
    has_future = fell | (expected_end > np.arange(n)) | stored_next
    if not has_future.any():
        with pytest.raises(cvl.CVLError, match="no episode has more than one step"):
            cvl.validate_dataset(raw, "f", 3, 1)
        return
    data = cvl.make_data(raw)
    assert np.asarray(data.anchors).tolist() == np.flatnonzero(has_future).tolist()
    b = cvl.sample_batch(data, jax.random.key(n), 256, 0.9, "arrival")
    t, j = np.asarray(b.observations)[:, 0].astype(int), np.asarray(b.goal_rewards).astype(int)
    absorbing = np.asarray(b.absorbing)
    assert (fell[t] | ~absorbing).all()  # only an episode that fell ends in the absorbing state
    real = ~absorbing | ((not stored_next) & (j == expected_end[t]))  # the fall's own reward, s_{e+1} not stored
    assert (j[real] >= t[real]).all() and (j[real] <= expected_end[t][real]).all()
    assert (j[~real] == 0).all()


# -------------------------------------------------------------------------------------- learning behaviour
def train_chunks(cfg: cvl.Config, raw: dict, chunks: int, n: int, seeds=(0,)):
    """Runs `chunks` jitted calls of n updates; returns the final state and per-chunk mean metrics."""
    data = cvl.make_data(raw)
    nets = cvl.make_networks(cfg, raw["actions"].shape[1])
    mesh = cvl.make_mesh(cfg)
    state = cvl.init_states(cfg, nets, seeds, raw["observations"].shape[1], raw["actions"].shape[1])
    data = cvl.replicate(data, mesh)
    step = cvl.make_train_fn(cfg, nets, mesh)
    history = []
    for _ in range(chunks):
        state, metrics, finite = step(state, data, n)
        assert np.asarray(finite).all()
        history.append({k: np.asarray(v).mean(axis=0) for k, v in metrics.items()})
    return state, history


def test_critic_learns_where_the_future_is_predictable(tmp_path):
    raw = rollouts(episodes=64, length=25, seed=3, constant_action=True)
    cfg = small_config(tmp_path / "x.hdf5", tmp_path, hidden=(64, 64), batch_size=64, gamma=0.9)
    _, history = train_chunks(cfg, raw, chunks=6, n=250)
    chance = 1 / cfg.batch_size
    assert history[0]["critic_loss"] > history[-1]["critic_loss"]
    assert history[-1]["categorical_accuracy"] > 10 * chance, history[-1]
    assert history[-1]["logits_pos"] > history[-1]["logits_neg"] + 2.0


def test_infonce_critic_learns_too(tmp_path):
    raw = rollouts(episodes=64, length=25, seed=3, constant_action=True)
    cfg = small_config(tmp_path / "x.hdf5", tmp_path, hidden=(64, 64), batch_size=64, gamma=0.9,
                       critic_loss="infonce")
    _, history = train_chunks(cfg, raw, chunks=3, n=250)
    assert history[-1]["categorical_accuracy"] > 10 / cfg.batch_size


def test_contrastive_td_critic_learns_where_the_future_is_predictable(tmp_path):
    raw = rollouts(episodes=64, length=25, seed=3, constant_action=True)
    cfg = small_config(tmp_path / "x.hdf5", tmp_path, hidden=(64, 64), batch_size=64, gamma=0.9, critic_loss="td")
    _, history = train_chunks(cfg, raw, chunks=6, n=250)
    assert history[0]["critic_loss"] > history[-1]["critic_loss"]
    assert history[-1]["categorical_accuracy"] > 5 / cfg.batch_size, history[-1]
    assert history[-1]["logits_pos"] > history[-1]["logits_neg"] + 1.0


def test_contrastive_td_loss_matches_a_plain_loop():
    """(1 - gamma) BCE(f(s, a, s'), 1) + mean_{j != i} [gamma w_ij BCE(f_ij, 1) + BCE(f_ij, 0)], with w from the
    target critic at (s', a' ~ pi) and, after a fall, w = 1 / P(absorbing) on absorbing goals only."""
    rng = np.random.default_rng(0)
    b, obs_dim, act_dim = 6, 3, 2
    cfg = cvl.make_config("cpu", hidden=(16,), repr_dim=4, critic_loss="td", gamma=0.8, td_max_weight=3.0)
    nets = cvl.make_networks(cfg, act_dim)
    state = cvl.init_state(jax.random.key(0), cfg, nets, obs_dim, act_dim)
    target = jax.tree.map(lambda x: x * 1.5 + 0.1, state.critic)  # a target different from the critic
    state = state.replace(critic_target=target, critic={**state.critic, "absorbing": jnp.arange(4.0) / 4})
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    batch = cvl.Batch(f32(rng.normal(size=(b, obs_dim))), f32(rng.uniform(-1, 1, (b, act_dim))),
                      f32(rng.normal(size=(b, obs_dim))), jnp.array([0, 1, 0, 0, 1, 0], bool), f32(rng.normal(size=b)),
                      f32(rng.normal(size=(b, obs_dim))), jnp.zeros(b, bool), jnp.array([0, 0, 1, 0, 0, 0], bool))
    key = jax.random.key(5)
    loss, (metrics, _) = cvl.critic_loss_td(state.critic, state, batch, key, cfg, nets, lambda x, *_: x)

    def f(critic, s, a, g, absorbing):
        phi = np.asarray(nets.phi.apply(critic["phi"], np.concatenate([s, a])[None]))[0]
        psi = np.asarray(critic["absorbing"]) if absorbing else np.asarray(nets.psi.apply(critic["psi"], g[None]))[0]
        return float(phi @ psi)

    def bce(x, y):
        return float(np.log1p(np.exp(-x))) if y else float(np.log1p(np.exp(x)))

    mean, std = cvl.actor_dist(nets, state.actor, batch.next_observations, cfg.actor_min_std)
    next_a = np.tanh(np.asarray(mean + std * jax.random.normal(key, mean.shape)))
    s, a, g, nxt = (np.asarray(x) for x in (batch.observations, batch.actions, batch.goals, batch.next_observations))
    absorbing = np.asarray(batch.absorbing)
    total = 0.0
    for i in range(b):
        row = (1 - cfg.gamma) * bce(f(state.critic, s[i], a[i], nxt[i], False), 1)
        for j in range(b):
            if j == i:
                continue
            fij = f(state.critic, s[i], a[i], g[j], absorbing[j])
            if bool(batch.done[i]):
                w = absorbing[j] / absorbing.mean()
            else:
                w = math.exp(f(target, nxt[i], next_a[i], g[j], absorbing[j]))
            row += (cfg.gamma * min(w, cfg.td_max_weight) * bce(fij, 1) + bce(fij, 0)) / (b - 1)
        total += row / b
    assert float(loss) == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("estimator", ["diag", "marginal", "normalized"])
def test_actor_raises_its_q_estimate(tmp_path, raw_small, estimator):
    cfg = small_config(tmp_path / "x.hdf5", tmp_path, bc_coef=0.0, q_estimator=estimator)
    _, history = train_chunks(cfg, raw_small, chunks=8, n=100)
    q = [h["q_mean"][0] for h in history]
    assert q[-1] > q[1] + 0.1 * abs(q[1]), q


@pytest.mark.parametrize("objective, flags", [("awr", dict(awr_beta=2.0)), ("q", dict(bc_coef=0.5))])
def test_actor_moves_towards_what_a_frozen_critic_prefers(objective, flags):
    """A hand-made frozen critic whose Q rises with the first action dimension: each actor objective, trained
    alone, moves the policy's first action up, while behaviour cloning of the same data (centred on 0) does not."""
    rng = np.random.default_rng(0)
    b, obs_dim, act_dim = 256, 3, 2
    s = jnp.asarray(rng.normal(size=(b, obs_dim)), jnp.float32)
    a = jnp.asarray(rng.uniform(-0.9, 0.9, (b, act_dim)), jnp.float32)
    r = jnp.asarray(rng.normal(size=b), jnp.float32)
    batch = cvl.Batch(s, a, s, jnp.zeros(b, bool), r, s, jnp.zeros(b, bool), jnp.zeros(b, bool))
    psi = jnp.stack([r, jnp.zeros(b)], axis=1)  # f(s, a, g_j) = 4 a_0 r_j: goals with high reward favour high a_0
    phi = type("Phi", (), {"apply": staticmethod(lambda _, x: jnp.stack([4 * x[:, obs_dim], x[:, 0] * 0], 1))})()

    def train_actor(**kw):
        cfg = cvl.make_config("cpu", hidden=(32, 32), actor_objective=objective, **kw)
        nets = cvl.make_networks(cfg, act_dim)._replace(phi=phi)
        actor = nets.actor.init(jax.random.key(0), s)
        opt = cvl.make_optimizer(cfg)
        opt_state = opt.init(actor)
        loss = jax.jit(jax.grad(lambda p, k: cvl.ACTOR_OBJECTIVES[objective](p, {"phi": None}, psi, nets, batch, k,
                                                                            0.0, cfg)[0]))
        for i in range(300):
            updates, opt_state = opt.update(loss(actor, jax.random.key(i)), opt_state)
            actor = optax.apply_updates(actor, updates)
        return np.asarray(cvl.eval_action(nets, actor, s))[:, 0].mean()

    bc = dict(awr_beta=0.0) if objective == "awr" else dict(bc_coef=1.0)
    assert abs(train_actor(**bc)) < 0.15
    assert train_actor(**flags) > 0.3


def test_corrected_density_ratio_rescales_q_by_negatives_per_positive(raw_small):
    cfg = cvl.make_config("cpu", hidden=(32, 32), batch_size=64, repr_dim=8, q_estimator="diag")
    nets = cvl.make_networks(cfg, 6)
    state = cvl.init_state(jax.random.key(0), cfg, nets, 17, 6)
    batch = cvl.sample_batch(cvl.make_data(raw_small), jax.random.key(1), 64, 0.99, "arrival")
    psi = nets.psi.apply(state.critic["psi"], batch.goals)
    args = (nets, state.critic, batch.observations, batch.actions, psi, batch.goal_rewards)
    for estimator in ("diag", "marginal"):
        raw = cvl.q_estimate(*args, dataclasses.replace(cfg, q_estimator=estimator))
        corrected = cvl.q_estimate(*args, dataclasses.replace(cfg, q_estimator=estimator, density_ratio="corrected"))
        np.testing.assert_allclose(corrected, 63 * raw, rtol=1e-5)
    infonce = dataclasses.replace(cfg, critic_loss="infonce", density_ratio="corrected")
    np.testing.assert_allclose(cvl.q_estimate(*args, infonce), cvl.q_estimate(*args, cfg), rtol=1e-6)


def test_normalized_q_is_a_weighted_mean_of_future_rewards(raw_small):
    """Self-normalised Q = (1 - gamma) Q: a constant reward c gives c whatever the critic, Q always lies within
    [min r, max r], and adding any function of (s, a) to the logits leaves it unchanged."""
    cfg = cvl.make_config("cpu", hidden=(32, 32), batch_size=64, repr_dim=8, q_estimator="normalized", gamma=0.95)
    nets = cvl.make_networks(cfg, 6)
    batch = cvl.sample_batch(cvl.make_data(raw_small), jax.random.key(1), 64, cfg.gamma, "arrival")
    for seed in range(3):
        critic = cvl.init_state(jax.random.key(seed), cfg, nets, 17, 6).critic
        critic = jax.tree.map(lambda x: 3.0 * x, critic)  # sharper logits than at init
        psi = nets.psi.apply(critic["psi"], batch.goals)
        args = (nets, critic, batch.observations, batch.actions, psi)
        const = cvl.q_estimate(*args, jnp.full(64, 2.5), cfg)
        np.testing.assert_allclose(const, 2.5, rtol=1e-5)
        q = np.asarray(cvl.q_estimate(*args, batch.goal_rewards, cfg))
        r = np.asarray(batch.goal_rewards)
        assert (q >= r.min() - 1e-5).all() and (q <= r.max() + 1e-5).all()
        assert q.std() > 0  # it does depend on (s, a)
        # a per-(s, a) offset in f, i.e. exp(f) scaled by Z(s, a): raw estimators change by Z, this one does not
        psi_plus = jnp.concatenate([psi, jnp.ones((64, 1))], axis=1)
        phi_fn = nets.phi.apply

        def shifted_phi(params, x):
            out = phi_fn(params, x)
            return jnp.concatenate([out, jnp.sin(x[:, :1]) * 4.0], axis=1)  # adds 4 sin(s_0) to every f(s, a, .)

        shifted = nets._replace(phi=type("Shifted", (), {"apply": staticmethod(shifted_phi)})())
        q_shift = cvl.q_estimate(shifted, critic, batch.observations, batch.actions, psi_plus, batch.goal_rewards,
                                 cfg)
        np.testing.assert_allclose(q_shift, q, rtol=1e-4)


def test_batch_estimators_leave_out_each_rows_own_goal():
    """Row i's own goal g_i comes from p(g | s_i, a_i), not p(g): the batch averages use only j != i. Checked against
    a plain loop, and by moving f_ii and r_i, which must change nothing but diag's estimate."""
    rng = np.random.default_rng(0)
    b = 7
    f, r = rng.normal(size=(b, b)), rng.normal(size=b)
    for i in range(b):
        others = [j for j in range(b) if j != i]
        w = np.exp(f[i, others])
        q_norm = float(cvl.q_normalized(jnp.asarray(f), jnp.asarray(r))[i])
        q_marg = float(cvl.q_marginal(jnp.asarray(f), jnp.asarray(r))[i])
        np.testing.assert_allclose(q_norm, np.sum(w * r[others]) / np.sum(w), rtol=1e-5)
        np.testing.assert_allclose(q_marg, np.sum(w * r[others]) / (b - 1), rtol=1e-5)
    f2, r2 = f.copy(), r.copy()
    np.fill_diagonal(f2, 50.0)
    for name in ("normalized", "marginal"):
        est = cvl.Q_ESTIMATORS[name]
        np.testing.assert_allclose(est(jnp.asarray(f2), jnp.asarray(r)), est(jnp.asarray(f), jnp.asarray(r)), rtol=1e-5)
    r2[3] += 10.0  # only the other rows see r_3
    q, q2 = (np.asarray(cvl.q_normalized(jnp.asarray(f), jnp.asarray(x))) for x in (r, r2))
    assert q2[3] == pytest.approx(q[3]) and (q2[np.arange(b) != 3] > q[np.arange(b) != 3]).all()
    np.testing.assert_allclose(cvl.q_diag(jnp.asarray(f), jnp.asarray(r)), np.exp(np.diag(f)) * r, rtol=1e-5)


def test_bc_likelihood_is_a_distribution_with_mass_at_the_edges():
    """exp(-bc_nll) integrates over the interior, plus (1 - BOUND) times its value at each edge, to 1; an edge's
    mass is the Gaussian tail beyond atanh(BOUND), computed here with math.erf."""
    for m, sd in ((0.8, 1.5), (-2.0, 0.7), (0.0, 0.2)):
        mean, std = jnp.array([[m]]), jnp.array([[sd]])
        a = np.linspace(-cvl.BOUND, cvl.BOUND, 400_001)[1:-1]
        interior = np.trapezoid(np.exp(-np.asarray(cvl.bc_nll(mean, std, jnp.asarray(a)[:, None]), np.float64)), a)
        edge = {x: float(np.exp(-cvl.bc_nll(mean, std, jnp.array([[x]]))[0])) * (1 - cvl.BOUND) for x in (1.0, -1.0)}
        c = np.arctanh(cvl.BOUND)
        np.testing.assert_allclose(edge[1.0], 0.5 * math.erfc((c - m) / (sd * math.sqrt(2))), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(edge[-1.0], 0.5 * math.erfc((c + m) / (sd * math.sqrt(2))), rtol=1e-4, atol=1e-9)
        assert abs(interior + edge[1.0] + edge[-1.0] - 1) < 2e-3


def test_behaviour_cloning_of_actions_at_the_bounds_stays_bounded():
    """A quarter of hopper-medium-local's actions are exactly +-1. Cloning data that is always at +1 in one dimension
    saturates the policy there while that dimension's NLL stays above its floor -log(1 / (1 - BOUND)) (a density at
    a pre-tanh value of +-7.25 with a shrinking std would fall without bound and swamp every other term), and the
    other dimension is still learned."""
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(256, 3)), jnp.float32)
    a = jnp.stack([jnp.ones(256), jnp.asarray(np.clip(rng.normal(0.3, 0.1, 256), -1, 1), jnp.float32)], axis=1)
    cfg = cvl.make_config("cpu", hidden=(32, 32))
    nets = cvl.make_networks(cfg, 2)
    actor = nets.actor.init(jax.random.key(0), s)
    opt = cvl.make_optimizer(cfg)
    opt_state = opt.init(actor)
    grad = jax.jit(jax.grad(lambda p: cvl.bc_nll(*cvl.actor_dist(nets, p, s, cfg.actor_min_std), a).mean()))
    for _ in range(1500):
        updates, opt_state = opt.update(grad(actor), opt_state)
        actor = optax.apply_updates(actor, updates)
    mean, std = (np.asarray(x) for x in cvl.actor_dist(nets, actor, s, cfg.actor_min_std))
    assert np.tanh(mean[:, 0]).min() > 0.99 and np.isfinite(std).all()
    nll_saturated = np.asarray(cvl.bc_nll(jnp.asarray(mean[:, :1]), jnp.asarray(std[:, :1]), a[:, :1]))
    assert nll_saturated.min() >= math.log(1 - cvl.BOUND) - 1e-4
    assert abs(np.tanh(mean[:, 1]).mean() - 0.3) < 0.05


def test_tanh_gaussian_log_prob_matches_a_numerical_density():
    mean, std = jnp.array([0.3]), jnp.array([0.5])
    a = jnp.linspace(-0.999, 0.999, 20001)
    u = jnp.arctanh(a)[:, None]
    density = jnp.exp(cvl.tanh_gaussian_log_prob(mean, std, u))
    assert abs(float(jnp.trapezoid(density, a)) - 1.0) < 1e-3  # a density over actions in (-1, 1)


def test_same_seed_same_metrics_bit_for_bit(tmp_path, dataset):
    first = cvl.train(small_config(dataset, tmp_path / "a"))
    second = cvl.train(small_config(dataset, tmp_path / "b"))
    assert without_timing(read_rows(first["run_dir"])) == without_timing(read_rows(second["run_dir"]))
    a = cvl.load_checkpoint(Path(first["run_dir"]))["state"]
    b = cvl.load_checkpoint(Path(second["run_dir"]))["state"]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    third = cvl.train(small_config(dataset, tmp_path / "c", seed=1))
    assert without_timing(read_rows(third["run_dir"])) != without_timing(read_rows(first["run_dir"]))


def test_k_seed_run_equals_single_runs(tmp_path, dataset):
    multi_dir = cvl.train(small_config(dataset, tmp_path / "m", num_seeds=2, steps=100))["run_dir"]
    multi, multi_state = read_rows(multi_dir), cvl.load_checkpoint(Path(multi_dir))["state"]
    for i in range(2):
        single_dir = cvl.train(small_config(dataset, tmp_path / f"s{i}", seed=i, steps=100))["run_dir"]
        single, single_state = read_rows(single_dir), cvl.load_checkpoint(Path(single_dir))["state"]
        for key in ("critic_loss", "actor_loss", "q_mean", "categorical_accuracy", "logsumexp"):
            np.testing.assert_allclose(float(multi[-1][f"{key}_s{i}"]), float(single[-1][key]), rtol=1e-4,
                                       atol=1e-6, err_msg=key)
        for a, b in zip(jax.tree.leaves(multi_state["actor"]), jax.tree.leaves(single_state["actor"])):
            np.testing.assert_allclose(a[i], b[0], rtol=1e-4, atol=1e-6)
        # A 1000-step HalfCheetah rollout amplifies float rounding (1e-8 in the weights), so scores of the two
        # programs are not compared; instead: seed i's K-seed score is exactly a single-seed evaluation of its
        # own weights with seed i's env seeds.
        cfg = small_config(dataset, tmp_path)
        actor_i = jax.tree.map(lambda x, i=i: x[i: i + 1], multi_state["actor"])
        returns = cvl.evaluate(partial(cvl.eval_action, cvl.make_networks(cfg, 6)), actor_i, ENV_ID, [i],
                               cfg.eval_episodes)
        score = cvl.normalized_score(returns.mean(), *cvl.D4RL_ENVS["halfcheetah"][1:])
        assert float(multi[-1][f"score_s{i}"]) == pytest.approx(score, rel=1e-9)
    scores = [float(multi[-1][f"score_s{i}"]) for i in range(2)]
    assert float(multi[-1]["score"]) == pytest.approx(np.mean(scores))
    assert float(multi[-1]["score_std"]) == pytest.approx(np.std(scores))


# ---------------------------------------------------------------------------------------------- end to end
def test_cli_end_to_end_cpu_preset(tmp_path, dataset):
    run_cli("--dataset", dataset, "--preset", "cpu", "--steps", "300", "--out", tmp_path, "--eval-episodes", "3",
            "--no-progress")
    (run_dir,) = list(tmp_path.iterdir())
    assert run_dir.name.startswith("halfcheetah-fixture__s0__")
    rows = read_rows(run_dir)
    assert int(rows[-1]["step"]) == 300 and np.isfinite(float(rows[-1]["score"]))
    for key in ("critic_loss", "actor_loss", "binary_accuracy", "categorical_accuracy", "logits_pos",
                "logits_neg", "logsumexp", "q_mean", "updates_per_sec", "wall_time", "return_mean", "return_std"):
        assert np.isfinite(float(rows[-1][key])), key
    config = json.loads((run_dir / "config.json").read_text())
    assert config["batch_size"] == 256 and config["hidden"] == [256, 256] and config["steps"] == 300
    ckpt = cvl.load_checkpoint(run_dir)
    assert ckpt["step"] == 300 and ckpt["config"].preset == "cpu"
    assert (run_dir / "learning_curve.png").stat().st_size > 10_000


def test_notebook_use_train_returns_metrics_and_ignores_kernel_argv(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-123.json"])
    final = cvl.train(small_config(dataset, tmp_path, steps=100))
    assert final["step"] == 100 and np.isfinite(final["score"]) and "critic_loss" in final


def test_help_lists_every_config_field():
    out = run_cli("--help").stdout
    for f in dataclasses.fields(cvl.Config):
        assert "--" + f.name.replace("_", "-") in out, f.name
    assert "cpu:" in out  # presets are named in --help


def test_presets_are_explicit_and_flags_win():
    cpu = cvl.make_config("cpu", batch_size=128)
    assert cpu.batch_size == 128 and cpu.hidden == (256, 256) and cpu.preset == "cpu"
    paper = cvl.Config()
    assert (paper.batch_size, paper.hidden, paper.repr_dim, paper.lr, paper.gamma, paper.bc_coef, paper.alpha,
            paper.steps) == (1024, (1024, 1024), 16, 3e-4, 0.99, 0.05, 0.0, 1_000_000)
    with pytest.raises(cvl.CVLError, match="unknown preset"):
        cvl.make_config("gpu")


# ------------------------------------------------------------------------------------------ multi-device
TWO_DEVICE_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {here!r})
import cvl, test_cvl
assert jax.device_count() == 2
raw = test_cvl.rollouts(episodes=8, length=40, seed=1)
results = []
for devices in (1, 2):
    cfg = cvl.make_config("cpu", hidden=(32, 32), batch_size=64, repr_dim=8, devices=devices, num_seeds={seeds})
    state, history = test_cvl.train_chunks(cfg, raw, chunks=1, n=5, seeds=range({seeds}))
    results.append((cvl.to_host(state.critic), cvl.to_host(state.actor), history[0]))
(c1, a1, m1), (c2, a2, m2) = results
for x, y in zip(jax.tree.leaves((c1, a1)), jax.tree.leaves((c2, a2))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
for k in m1:
    np.testing.assert_allclose(m1[k], m2[k], rtol=1e-4, atol=1e-5, err_msg=k)
print("EQUAL", sorted(m1))
"""


@pytest.mark.parametrize("seeds", [1, 2])
def test_two_devices_equal_one_device(seeds):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT.format(here=str(HERE), seeds=seeds)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EQUAL" in proc.stdout and "critic_loss" in proc.stdout


DISTRIBUTED_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {here!r})
import cvl, test_cvl
pid = int(sys.argv[1])
cfg = test_cvl.small_config({dataset!r}, {out!r}, distributed=True, coordinator_address="127.0.0.1:{port}",
                            num_processes=2, process_id=pid, steps=100)
final = cvl.train(cfg)  # the whole loop: only process 0 writes a run directory
assert jax.process_count() == 2 and jax.device_count() == 2
raw = cvl.read_dataset_file({dataset!r})
state, history = test_cvl.train_chunks(cfg, raw, chunks=1, n=10)
np.savez({out!r} + f"/params{{pid}}.npz", *jax.tree.leaves(cvl.to_host((state.critic, state.actor))),
         loss=history[0]["critic_loss"])
print("DONE", pid, final.get("score"))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_same_step_and_agree(tmp_path, dataset):
    script = DISTRIBUTED_SCRIPT.format(here=str(HERE), dataset=str(dataset), out=str(tmp_path), port=free_port())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "DONE 0" in outs[0][0] and "DONE 1" in outs[1][0]
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1 and (runs[0] / "metrics.csv").exists()  # process 0 alone writes
    p0, p1 = np.load(tmp_path / "params0.npz"), np.load(tmp_path / "params1.npz")
    assert all(np.array_equal(p0[k], p1[k]) for k in p0.files)
    # and the 2-process step equals the same global batch on one device
    cfg = small_config(dataset, tmp_path)
    state, history = train_chunks(cfg, cvl.read_dataset_file(dataset), chunks=1, n=10)
    single = jax.tree.leaves(cvl.to_host((state.critic, state.actor)))
    for i, leaf in enumerate(single):
        np.testing.assert_allclose(p0[f"arr_{i}"], leaf, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ runs survive
def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, dataset):
    args = ["--dataset", dataset, "--eval-env", ENV_ID, "--hidden", "32", "32", "--batch-size", "64",
            "--repr-dim", "8", "--steps", "1500", "--updates-per-call", "50", "--eval-every", "250",
            "--eval-episodes", "2", "--checkpoint-every", "500", "--no-progress", "--preset", "cpu"]
    run_cli(*args, "--out", tmp_path / "straight")
    (straight,) = (tmp_path / "straight").iterdir()

    proc = subprocess.Popen([sys.executable, str(HERE / "cvl.py"), *map(str, args), "--out", str(tmp_path / "cut")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    deadline = time.time() + 300
    while time.time() < deadline:
        runs = list((tmp_path / "cut").glob("*/metrics.csv"))
        if runs and len(read_rows(runs[0].parent)) >= 6:  # past step 300, before the end
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "--resume" in err
    (cut,) = (tmp_path / "cut").iterdir()
    stopped_at = cvl.load_checkpoint(cut)["step"]
    assert 300 <= stopped_at < 1500
    assert int(read_rows(cut)[-1]["step"]) == stopped_at

    run_cli("--resume", cut, "--no-progress")
    assert without_timing(read_rows(cut)) == without_timing(read_rows(straight))
    assert [int(r["step"]) for r in read_rows(cut)] == list(range(50, 1501, 50))  # no duplicate or missing row


def test_resume_refuses_a_contradicting_flag(tmp_path, dataset):
    final = cvl.train(small_config(dataset, tmp_path, steps=50))
    proc = run_cli("--resume", final["run_dir"], "--batch-size", "32", check=False)
    assert proc.returncode == 2 and "--batch-size 32 contradicts the run being resumed" in proc.stderr
    cfg = cvl.resume_config(final["run_dir"], steps=100)  # extending a run is allowed
    assert cfg.steps == 100 and cfg.batch_size == 64 and cfg.resume == final["run_dir"]
    assert cvl.train(cfg)["step"] == 100


def test_divergence_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, dataset):
    cfg = small_config(dataset, tmp_path, steps=2000, checkpoint_every=50, lr=1e6, adam_eps=1e-30)
    with pytest.raises(cvl.Diverged) as err:
        cvl.train(cfg)
    assert "non-finite" in str(err.value) and "step" in str(err.value)
    (run_dir,) = tmp_path.iterdir()
    ckpt = cvl.load_checkpoint(run_dir)
    leaves = jax.tree.leaves(ckpt["state"])
    assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating))
    # from the command line: a non-zero exit and one line naming the loss and step
    proc = run_cli("--dataset", dataset, "--eval-env", ENV_ID, "--hidden", "32", "32", "--batch-size", "64",
                   "--lr", "1e6", "--adam-eps", "1e-30", "--steps", "2000", "--updates-per-call", "50",
                   "--out", tmp_path / "cli", "--no-progress", check=False)
    assert proc.returncode == 3 and "cvl: error: non-finite" in proc.stderr


def test_checkpoint_write_is_atomic(tmp_path, dataset, monkeypatch):
    final = cvl.train(small_config(dataset, tmp_path, steps=50))
    run_dir = Path(final["run_dir"])
    before = (run_dir / "checkpoint.msgpack").read_bytes()

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(cvl.os, "fsync", crash)  # dies after writing the temp file, before the rename
    cfg = cvl.load_checkpoint(run_dir)["config"]
    nets = cvl.make_networks(cfg, 6)
    state = cvl.init_states(cfg, nets, [0], 17, 6)
    with pytest.raises(OSError):
        cvl.save_checkpoint(run_dir, state, cfg, [])
    assert (run_dir / "checkpoint.msgpack").read_bytes() == before
    assert cvl.load_checkpoint(run_dir)["step"] == 50


@pytest.mark.parametrize("drop", ["critic_target", "absorbing"])
def test_a_checkpoint_from_an_older_version_is_refused_in_one_line(tmp_path, dataset, drop):
    final = cvl.train(small_config(dataset, tmp_path, steps=50, eval_every=50))
    path = Path(final["run_dir"]) / "checkpoint.msgpack"
    import flax.serialization
    payload = flax.serialization.msgpack_restore(path.read_bytes())
    if drop == "absorbing":
        del payload["state"]["critic"]["absorbing"]
    else:
        del payload["state"][drop]
    path.write_bytes(flax.serialization.msgpack_serialize(payload))
    before = path.read_bytes()
    proc = run_cli("--evaluate", str(path.parent), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "older cvl.py" in proc.stderr
    assert (drop if drop != "absorbing" else "absorbing-state goal") in proc.stderr
    assert path.read_bytes() == before  # nothing lost


def test_evaluate_a_saved_policy_and_write_a_video(tmp_path, dataset):
    final = cvl.train(small_config(dataset, tmp_path, steps=50))
    proc = run_cli("--evaluate", final["run_dir"], "--eval-episodes", "3", "--video", tmp_path / "ep.mp4",
                   "--video-steps", "100", env={"MUJOCO_GL": "egl"}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "normalised score" in proc.stdout and "over 3 episodes" in proc.stdout
    import imageio.v2 as imageio

    with imageio.get_reader(tmp_path / "ep.mp4") as reader:
        assert reader.count_frames() == 101  # the reset frame and 100 steps
        frames = np.stack([reader.get_data(i) for i in (0, 50, 100)]).astype(float)
    assert frames.shape == (3, 360, 480, 3)
    assert frames.std() > 1.0 and np.abs(np.diff(frames, axis=0)).mean() > 0.1  # a moving scene, not blank
    result = cvl.evaluate_checkpoint(final["run_dir"] + "/checkpoint.msgpack", episodes=2)
    assert result["step"] == 50 and np.isfinite(result["score"])


def test_video_without_a_gl_backend_is_skipped_with_a_message(capsys, monkeypatch):
    import gymnasium as gym

    real_make = gym.make

    def make(env_id, **kw):
        if kw.get("render_mode"):
            raise RuntimeError("cannot initialize EGL display")
        return real_make(env_id, **kw)

    monkeypatch.setattr(gym, "make", make)
    cfg = cvl.make_config("cpu", hidden=(16,), repr_dim=4)
    nets = cvl.make_networks(cfg, 6)
    actor = cvl.init_state(jax.random.key(0), cfg, nets, 17, 6).actor
    assert cvl.record_episode(actor, nets, ENV_ID, seed=0) is None
    err = capsys.readouterr().err
    assert "no video" in err and "cannot initialize EGL display" in err and "MUJOCO_GL=egl" in err


# ------------------------------------------------------------------------------------------------ bench tools
def test_critic_diagnostic_scores_a_run_against_monte_carlo_returns(tmp_path, dataset, raw_small, capsys):
    sys.path.insert(0, str(HERE / "bench"))
    import diagnose_critic

    rng = np.random.default_rng(0)
    rewards, ends = rng.normal(size=50), np.array([9] * 10 + [29] * 20 + [49] * 20)
    expected = [sum(0.9 ** (j - t) * rewards[j] for j in range(t, ends[t] + 1)) for t in range(50)]
    np.testing.assert_allclose(diagnose_critic.mc_returns(rewards, ends, 0.9), expected, rtol=1e-10)

    final = cvl.train(small_config(dataset, tmp_path, steps=100, num_seeds=2, eval_every=100))
    results = diagnose_critic.main([final["run_dir"], "--rows", "128", "--min-horizon", "20"])
    out = capsys.readouterr().out
    assert [r["seed"] for r in results] == [0, 1] and out.count("corr(Q, MC return)") == 6
    assert out.count("*normalized") == 2  # the estimator the run trained with is marked
    for r in results:
        assert r["z_mean"] > 0 and r["grad_ratio"] > 0
        for name in cvl.Q_ESTIMATORS:
            assert all(-1 <= c <= 1 for c in r[name]["corr"]) and 0 <= r[name]["beats_random"] <= 1
        # the normalised estimate is a weighted mean of the goals' rewards
        assert raw_small["rewards"].min() <= r["normalized"]["q_mean"] <= raw_small["rewards"].max()
    with pytest.raises(SystemExit, match="lower --rows or --min-horizon"):
        diagnose_critic.main([final["run_dir"], "--rows", "128", "--min-horizon", "500"])


# ---------------------------------------------------------------------------------------------- TD3+BC
def import_bench(name: str):
    sys.path.insert(0, str(HERE / "bench"))
    return __import__(name)


def test_td3_bc_transitions_are_normalised_with_dataset_statistics():
    td3_bc = import_bench("td3_bc")
    raw = hand_made_episodes()
    raw["observations"][:, 1] = np.random.default_rng(0).normal(5.0, 3.0, 18)
    raw["next_observations"][:-1] = raw["observations"][1:]
    raw["next_observations"][[5, 11, 17]] = raw["observations"][[5, 11, 17]] + 0.5
    data = cvl.make_data(raw)
    mean, std = td3_bc.normalizer(np.asarray(data.observations))
    tr = td3_bc.make_transitions(data, mean, std)
    obs = np.asarray(tr.observations)
    np.testing.assert_allclose(obs.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(obs.std(axis=0), raw["observations"].std(axis=0) / std, rtol=1e-5)
    assert (np.abs(obs.std(axis=0) - 1) < 1e-2).all()
    # next states use the same statistics: within an episode s'_j is the next row's normalised state
    np.testing.assert_allclose(np.asarray(tr.next_observations)[:5], obs[1:6], rtol=1e-5)
    assert np.flatnonzero(np.asarray(tr.dones)).tolist() == [5, 17]  # falls; row 11 is a timeout
    no_next = td3_bc.make_transitions(cvl.make_data({k: v for k, v in raw.items() if k != "next_observations"}),
                                      mean, std)
    # without stored next states the timeout's last row has no target; a fall's needs none
    assert 11 not in np.asarray(no_next.rows) and {5, 17} <= set(np.asarray(no_next.rows).tolist())


def td3_setup(raw, **kw):
    td3_bc = import_bench("td3_bc")
    cfg = td3_bc.TD3BCConfig(hidden=(64, 64), batch_size=128, **kw)
    data = cvl.make_data(raw)
    tr = jax.device_put(td3_bc.make_transitions(data, *td3_bc.normalizer(np.asarray(data.observations))))
    nets = td3_bc.Nets(actor=cvl.MLP(cfg.hidden, 6), critic=cvl.MLP(cfg.hidden, 1))
    return td3_bc, cfg, tr, nets, td3_bc.init_state(jax.random.key(0), cfg, nets, 17, 6)


def test_td3_bc_delays_the_actor_and_polyak_updates_the_targets(raw_small):
    td3_bc, cfg, tr, nets, s0 = td3_setup(raw_small)
    step = jax.jit(partial(td3_bc.update_step, cfg=cfg, nets=nets))
    s1, _ = step(s0, tr)
    s2, _ = step(s1, tr)
    leaves = jax.tree.leaves

    def differs(a, b):
        return not all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))

    assert differs(s1.critic, s0.critic) and differs(s2.critic, s1.critic)  # the critic learns every step
    assert not differs(s1.actor, s0.actor) and not differs(s1.actor_target, s0.actor_target)  # step 1: no actor
    assert not differs(s1.critic_target, s0.critic_target)
    assert differs(s2.actor, s1.actor)  # step 2: the actor moves, and both targets by tau towards the new weights
    for target, old, new in ((s2.actor_target, s1.actor_target, s2.actor),
                             (s2.critic_target, s1.critic_target, s2.critic)):
        for t, o, n in zip(leaves(target), leaves(old), leaves(new)):
            np.testing.assert_allclose(t, (1 - cfg.tau) * o + cfg.tau * n, rtol=1e-5, atol=1e-7)


def test_td3_bc_critic_loss_falls(raw_small):
    td3_bc, cfg, tr, nets, state = td3_setup(raw_small)
    train = td3_bc.make_train_fn(cfg, nets)
    state = jax.tree.map(lambda x: x[None], state)
    losses = []
    for _ in range(6):
        state, metrics = train(state, tr, 200)
        losses.append(float(np.asarray(metrics["critic_loss"]).mean()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_td3_bc_cli_trains_evaluates_and_resumes(tmp_path, dataset):
    td3_bc = import_bench("td3_bc")
    args = ["--dataset", str(dataset), "--eval-env", ENV_ID, "--steps", "100", "--eval-every", "100",
            "--updates-per-call", "50", "--checkpoint-every", "100", "--eval-episodes", "1", "--num-seeds", "2",
            "--hidden", "32", "32", "--batch-size", "64", "--out", str(tmp_path), "--no-progress"]
    final = td3_bc.main(args)
    run = Path(final["run_dir"])
    rows = read_rows(run)
    assert [int(r["step"]) for r in rows] == [50, 100] and rows[-1]["score_s1"] != ""
    assert (run / "checkpoint.msgpack").exists() and (run / "learning_curve.png").exists()
    extended = td3_bc.main(["--resume", str(run), "--steps", "150", "--no-progress"])
    rows = read_rows(run)
    assert [int(r["step"]) for r in rows] == [50, 100, 150] and extended["step"] == 150
