"""Tests for cvl.py. Every dataset here is made from real short MuJoCo rollouts in D4RL layout.

Run: python -m pytest -q -n 2 test_cvl.py
"""
from __future__ import annotations

import csv
import dataclasses
import http.server
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import flax.serialization
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

# Many tests compile the same small programs: a compilation cache shared by this process and the cvl.py processes
# it starts keeps the suite within its time budget (each train() builds a fresh jitted function).
COMPILE_CACHE = Path(os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(
    os.environ.get("TMPDIR", "/tmp")) / f"cvl-test-jax-cache-{os.getuid()}")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", str(COMPILE_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The tests' programs are small and most of a cold run is compiling them: XLA's cheaper compile mode (here and in the
# processes the tests start) cuts that by about a fifth. The numbers stay IEEE float32; only fusion/LLVM work is skipped.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false"))


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


def central_difference(q_of, a, h: float = 1e-2) -> np.ndarray:
    """dQ/da row by row by central differences: q_of maps actions [N, |A|] to each row's Q [N], which depends on
    that row's own action only."""
    a = np.asarray(a)
    return np.stack([(q_of(a + d) - q_of(a - d)) / (2 * h) for d in h * np.eye(a.shape[1], dtype=a.dtype)], axis=1)


def read_rows(run_dir: Path) -> list[dict]:
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("wall_time", "updates_per_sec", "eval_seconds")} for r in rows]


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
    assert cvl.d4rl_urls("halfcheetah-medium-replay-v2") == [
        "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/halfcheetah_medium_replay-v2.hdf5"]
    assert cvl.d4rl_urls("hopper-medium-v2", "http://mirror/x/") == [
        "http://mirror/x/gym_mujoco_v2/hopper_medium-v2.hdf5", "http://mirror/x/hopper_medium-v2.hdf5"]
    assert cvl.d4rl_urls("hopper-medium-v2", "https://hf.co/d/resolve/main/{file}?download=1") == [
        "https://hf.co/d/resolve/main/hopper_medium-v2.hdf5?download=1"]
    monkeypatch.setenv("CVL_D4RL_URL", "http://env-mirror")
    assert cvl.d4rl_urls("hopper-expert-v2")[0] == "http://env-mirror/gym_mujoco_v2/hopper_expert-v2.hdf5"
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


def test_flat_mirrors_and_url_templates(http_server, tmp_path, dataset, monkeypatch):
    base, handler = http_server
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    handler.files["/flat/hopper_medium-v2.hdf5"] = dataset.read_bytes()  # laid out flat, as on a Hugging Face repo
    path = cvl.resolve_dataset(cvl.Config(env="hopper-medium-v2", d4rl_url=f"{base}/flat"))
    assert path.read_bytes() == dataset.read_bytes()
    assert [(p, code) for p, code in handler.requests] == [("/flat/gym_mujoco_v2/hopper_medium-v2.hdf5", None),
                                                          ("/flat/hopper_medium-v2.hdf5", None)]  # 404, then flat
    handler.requests.clear()
    handler.files["/repo/resolve/main/hopper_expert-v2.hdf5?download=1"] = dataset.read_bytes()
    cfg = cvl.Config(env="hopper-expert-v2", d4rl_url=f"{base}/repo/resolve/main/{{file}}?download=1")
    path = cvl.resolve_dataset(cfg)  # cached under the file's own name, not the URL's tail
    assert path == tmp_path / "d4rl" / "hopper_expert-v2.hdf5" and path.read_bytes() == dataset.read_bytes()
    assert [p for p, _ in handler.requests] == ["/repo/resolve/main/hopper_expert-v2.hdf5?download=1"]
    cfg = cvl.Config(env="walker2d-expert-v2", d4rl_url=f"{base}/nowhere", out=str(tmp_path / "runs"))
    with pytest.raises(cvl.CVLError) as err:
        cvl.train(cfg)
    msg = str(err.value)
    assert "nowhere/gym_mujoco_v2/walker2d_expert-v2.hdf5 and " in msg and "nowhere/walker2d_expert-v2.hdf5" in msg
    assert "404" in msg and "\n" not in msg and not list((tmp_path / "d4rl").glob("walker2d*"))


# -------------------------------------------------------------------------------------------------- Minari
MINARI_ID = "mujoco/hoppertest/random-v0"


@pytest.fixture(scope="module")
def minari_path(tmp_path_factory):
    """A small Minari dataset written offline by minari's own DataCollector from real Hopper-v5 rollouts: short
    episodes (at most 40 steps) of a random policy, so some end by a fall and some by the time limit."""
    import gymnasium as gym
    import minari

    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        with cvl.quiet_env_creation():
            env = minari.DataCollector(gym.make("Hopper-v5", max_episode_steps=40))
        rng = np.random.default_rng(0)
        for ep in range(30):
            env.reset(seed=ep)
            done = False
            while not done:
                _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 3).astype(np.float32))
                done = terminated or truncated
        env.create_dataset(MINARI_ID, eval_env="Hopper-v5", ref_min_score=-20.0, ref_max_score=3000.0,
                           algorithm_name="random", author="cvl tests", author_email="tests@example.org",
                           code_permalink="https://example.org", description="test fixture")
        env.close()
    finally:
        os.environ.pop("MINARI_DATASETS_PATH") if old is None else os.environ.__setitem__("MINARI_DATASETS_PATH", old)
    return root


def test_minari_episodes_flatten_into_d4rl_arrays(minari_path, monkeypatch):
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_path))
    raw = cvl.minari_arrays(cvl.minari_dataset(MINARI_ID))
    episodes = list(minari.load_dataset(MINARI_ID).iterate_episodes())
    assert len(raw["observations"]) == sum(len(ep.actions) for ep in episodes)
    row = 0
    for ep in episodes:  # row t is (o_t, a_t, r_t, o_{t+1}); terminations -> terminals, truncations -> timeouts
        n = len(ep.actions)
        np.testing.assert_array_equal(raw["observations"][row: row + n], ep.observations[:-1].astype(np.float32))
        np.testing.assert_array_equal(raw["next_observations"][row: row + n], ep.observations[1:].astype(np.float32))
        np.testing.assert_array_equal(raw["rewards"][row: row + n], ep.rewards.astype(np.float32))
        np.testing.assert_array_equal(raw["terminals"][row: row + n], ep.terminations)
        np.testing.assert_array_equal(raw["timeouts"][row: row + n], ep.truncations)
        row += n
    fell = [ep for ep in episodes if ep.terminations[-1]]
    assert fell and any(ep.truncations[-1] for ep in episodes)
    # a fallen episode's last transition is a goal with its own reward, and after it the absorbing state follows
    data = cvl.make_data(cvl.validate_dataset(raw, "minari", 11, 3))
    last = int(np.flatnonzero(raw["terminals"])[0])
    assert bool(data.terminal[last]) and last in np.asarray(data.anchors)
    assert raw["rewards"][last] == pytest.approx(float(fell[0].rewards[-1]))
    assert cvl.minari_eval_spec(cvl.minari_dataset(MINARI_ID)) == ("Hopper-v5", -20.0, 3000.0)


def test_minari_id_trains_evaluates_and_inspects(minari_path, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_path))
    args = ["--env", MINARI_ID, "--hidden", "32", "32", "--batch-size", "64", "--repr-dim", "8", "--steps", "300",
            "--updates-per-call", "100", "--eval-every", "300", "--eval-episodes", "2", "--out", str(tmp_path),
            "--no-progress", "--preset", "cpu"]
    final = cvl.main(args)
    assert Path(final["run_dir"]).name.startswith("mujoco-hoppertest-random-v0__s0__")
    assert final["step"] == 300
    assert final["score"] == pytest.approx(100 * (final["return_mean"] + 20.0) / 3020.0)  # the dataset's references
    assert "eval on Hopper-v5" in capsys.readouterr().out
    result = cvl.main(["--evaluate", final["run_dir"], "--eval-episodes", "2"])
    assert result["step"] == 300 and np.isfinite(result["score"])
    info = cvl.main(["--env", MINARI_ID, "--inspect", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert info["terminated"] + info["timed_out"] == info["episodes"] == 30 and info["terminated"] > 0
    assert f"{info['terminated']} end by termination, {info['timed_out']} by time limit" in out
    assert "Hopper-v5; reference returns -20 (score 0) and 3000 (score 100)" in out
    assert Path(info["plot"]).stat().st_size > 5000


def test_a_damaged_minari_data_file_fails_in_one_line(minari_path, tmp_path, monkeypatch):
    import shutil

    root = Path(shutil.copytree(minari_path, tmp_path / "minari"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    (data_file,) = (root / MINARI_ID).rglob("*.hdf5")
    data_file.write_bytes(data_file.read_bytes()[:3000])  # cut short, as an interrupted copy leaves it
    msg = fails_in_one_line(["--env", MINARI_ID, "--inspect"], "'s data cannot be read")
    assert f"delete {root / MINARI_ID}" in msg


def test_unknown_minari_ids_and_no_network_fail_in_one_line(minari_path, monkeypatch):
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(minari_path))
    monkeypatch.setattr(minari, "list_remote_datasets", lambda **kw: {"mujoco/hopper/medium-v0": {}})
    msg = fails_in_one_line(["--env", "mujoco/hoppertest/randm-v0", "--inspect"], "unknown Minari dataset")
    assert "did you mean mujoco/hoppertest/random-v0" in msg

    def offline(**kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(minari, "list_remote_datasets", offline)
    msg = fails_in_one_line(["--env", "mujoco/hopper/medium-v0", "--inspect"], "Minari's server cannot be reached")
    assert f"copy the folder to {minari_path / 'mujoco/hopper/medium-v0'}" in msg


def test_a_minari_id_not_on_disk_is_downloaded_by_minari(minari_path, monkeypatch, tmp_path):
    import shutil

    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty"))
    downloads = []

    def download_dataset(name, force_download=False):  # stands in for the network: "fetches" the fixture
        downloads.append(name)
        shutil.copytree(minari_path / name, tmp_path / "empty" / name)

    monkeypatch.setattr(minari, "list_remote_datasets", lambda **kw: {MINARI_ID: {}})
    monkeypatch.setattr(minari, "download_dataset", download_dataset)
    assert len(cvl.minari_arrays(cvl.minari_dataset(MINARI_ID))["rewards"]) > 0 and downloads == [MINARI_ID]
    cvl.minari_dataset(MINARI_ID)  # now local: not downloaded again
    assert downloads == [MINARI_ID]


def test_minari_is_imported_only_for_minari_ids(tmp_path, dataset):
    script = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import cvl; "
              f"cvl.main(['--dataset', {str(dataset)!r}, '--inspect', '--out', {str(tmp_path)!r}]); "
              f"print('minari imported' if 'minari' in sys.modules else 'minari not imported')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "minari not imported" in proc.stdout


def test_inspect_reports_a_d4rl_file_and_validates_it_as_training_does(tmp_path, raw_small, dataset, capsys):
    info = cvl.main(["--dataset", str(dataset), "--inspect", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    ends = np.flatnonzero(raw_small["timeouts"])
    returns = [raw_small["rewards"][a: b + 1].sum() for a, b in zip(np.r_[0, ends[:-1] + 1], ends)]
    assert info["episodes"] == 12 and info["timed_out"] == 12 and info["terminated"] == 0
    np.testing.assert_allclose(np.sort(info["returns"]), np.sort(returns), rtol=1e-5)
    assert f"median {np.median(returns):,.1f}" in out and "720 (720 with a future goal)" in out
    assert "HalfCheetah-v4; reference returns -280.179 (score 0) and 12135 (score 100)" in out
    assert (tmp_path / "halfcheetah-fixture_returns.png").stat().st_size > 5000
    bad = {k: v.copy() for k, v in raw_small.items()}
    bad["observations"][123, 4] = np.nan
    path = write_hdf5(tmp_path / "halfcheetah_bad.hdf5", bad)
    fails_in_one_line(["--dataset", path, "--inspect"], "key 'observations' row 123 is NaN")


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r.pop("timeouts"), "lacks key(s) timeouts"),
    (lambda r: r.__setitem__("rewards", r["rewards"][:-3]), "key 'rewards' has 717 rows"),
    (lambda r: r.__setitem__("observations", r["observations"][:, :11]), "key 'observations' has shape (720, 11)"),
    (lambda r: r["observations"].__setitem__((123, 4), np.nan), "key 'observations' row 123 is NaN"),
    (lambda r: r["observations"].__setitem__((45, 0), 3e12), "key 'observations' row 45 holds 3e+12, too large"),
    (lambda r: r["actions"].__setitem__((77, 2), 1.5), "key 'actions' row 77 is outside"),
    (lambda r: (r.pop("next_observations"), r.__setitem__("timeouts", np.ones(720, bool))),
     "no episode has more than one step"),
    (lambda r: [r.__setitem__(k, v[:0]) for k, v in list(r.items())], "the dataset has no rows"),
    (lambda r: r.__setitem__("rewards", np.array([b"x"] * 720)), "key 'rewards' holds |S1 values"),
    (lambda r: r.__setitem__("terminals", np.zeros((720, 2), bool)), "key 'terminals' has shape (720, 2)"),
    (lambda r: r.__setitem__("terminals", np.where(np.arange(720) == 33, np.nan, 0.0)),
     "key 'terminals' row 33 is nan, not 0 or 1"),
    (lambda r: r.__setitem__("timeouts", np.where(np.arange(720) == 7, 7, r["timeouts"])),
     "key 'timeouts' row 7 is 7, not 0 or 1"),
])
def test_bad_datasets_give_one_clear_line(tmp_path, raw_small, mutate, expected):
    """Each a line naming the file and the problem, from the command line, before a run directory exists."""
    raw = {k: v.copy() for k, v in raw_small.items()}
    mutate(raw)
    path = write_hdf5(tmp_path / "halfcheetah_bad.hdf5", raw)
    assert str(path) in fails_in_one_line(small_args(path, tmp_path / "out"), expected)
    assert not (tmp_path / "out").exists()


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
    with pytest.raises(cvl.CVLError, match="check that it is a complete .hdf5 or .npz file"):
        cvl.read_dataset_file(corrupt)
    with pytest.raises(cvl.CVLError, match="cannot infer the evaluation env"):
        cvl.eval_env_spec(cvl.Config(dataset=str(tmp_path / "mystery.hdf5")))
    # a config saved before --goal-reward, --actor-objective or --awr-advantage existed loads with what those runs did
    saved = dataclasses.asdict(cvl.Config(q_estimator="diag"))
    for name in ("goal_reward", "actor_objective", "awr_advantage", "normalize_states"):
        del saved[name]
    old = cvl.config_from_dict(saved)
    assert (old.goal_reward, old.actor_objective, old.awr_advantage, old.normalize_states) == ("goal", "q", "q", False)
    assert cvl.config_from_dict(dataclasses.asdict(cvl.Config())).goal_reward == "arrival"
    # a removed variant: a run saved with today's behaviour resumes, one that used the variant is refused
    today = dataclasses.asdict(cvl.Config())
    assert cvl.config_from_dict({**today, "conservative": 0.0, "density_ratio": "raw", "q_head": "none",
                                 "td_next_action": "sample", "push_critic": "readout"}) == cvl.Config()
    for saved, flag in [({**today, "conservative": 1.0}, "--conservative"),
                        ({**today, "density_ratio": "corrected"}, "--density-ratio"),
                        ({**today, "q_head": "onestep"}, "--q-head"),
                        ({**today, "td_next_action": "mean"}, "--td-next-action"),
                        ({**today, "push_critic": "onestep"}, "--push-critic"),
                        ({**today, "pick_samples": 16}, "--pick-samples"),
                        ({**today, "heads": 3, "head_margin": 1.0, "actor_objective": "heads"},
                         "--actor-objective heads"),
                        ({**today, "critic_loss": "infonce"}, "--critic-loss infonce"),
                        ({**today, "critic_loss": "td-infonce"}, "--critic-loss td-infonce")]:
        with pytest.raises(cvl.CVLError, match=f"this run used {flag}, which was removed .* commit [0-9a-f]{{7}}"):
            cvl.config_from_dict(saved)
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
    state = cvl.replicate(cvl.to_host_state(state), mesh)  # placed as train() places it, so one compile serves all
    state = state.replace(key=jax.random.wrap_key_data(state.key))
    data = cvl.replicate(data, mesh)
    step = cvl.make_train_fn(cfg, nets, mesh)
    history = []
    for _ in range(chunks):
        state, metrics, finite = step(state, data, n)
        assert np.asarray(finite).all()
        history.append({k: np.asarray(v).mean(axis=0) for k, v in metrics.items()})
    return state, history


@pytest.mark.parametrize("loss, accuracy, margin", [("nce", 10, 2.0), ("td", 5, 1.0)])
def test_critic_learns_where_the_future_is_predictable(tmp_path, loss, accuracy, margin):
    """Both critic losses pick each row's own future goal out of the batch far above chance (1 / B)."""
    raw = rollouts(episodes=64, length=25, seed=3, constant_action=True)
    cfg = small_config(tmp_path / "x.hdf5", tmp_path, hidden=(64, 64), batch_size=64, gamma=0.9, critic_loss=loss)
    _, history = train_chunks(cfg, raw, chunks=6, n=250)
    assert history[0]["critic_loss"] > history[-1]["critic_loss"]
    assert history[-1]["categorical_accuracy"] > accuracy / cfg.batch_size, history[-1]
    assert history[-1]["logits_pos"] > history[-1]["logits_neg"] + margin


def logit_by_hand(nets, critic, s, a, g, absorbing) -> float:
    """f(s, a, g) from the networks' raw outputs: phi . psi, or with --repr-norm unit (a critic with a log_scale)
    exp(log_scale) cos(phi, psi) + bias."""
    phi = np.asarray(nets.phi.apply(critic["phi"], np.concatenate([s, a])[None]))[0].astype(np.float64)
    psi = np.asarray(critic["absorbing"] if absorbing else nets.psi.apply(critic["psi"], g[None])[0], np.float64)
    if "log_scale" not in critic:
        return float(phi @ psi)
    cos = phi @ psi / np.linalg.norm(phi) / np.linalg.norm(psi)
    return float(np.exp(critic["log_scale"]) * cos + critic["bias"])


@pytest.mark.parametrize("repr_norm, td_weights", [("none", "raw"), ("unit", "raw"), ("none", "normalized")])
def test_contrastive_td_loss_matches_a_plain_loop(repr_norm, td_weights):
    """(1 - gamma) BCE(f(s, a, s'), 1) + mean_{j != i} [gamma w_ij BCE(f_ij, 1) + BCE(f_ij, 0)], with w from the
    target critic at (s', a' ~ pi) (--td-weights normalized: divided by its mean over the row's other goals) and,
    after a fall, w = 1 / P(absorbing) on absorbing goals only."""
    rng = np.random.default_rng(0)
    b, obs_dim, act_dim = 6, 3, 2
    cfg = cvl.make_config("cpu", hidden=(16,), repr_dim=4, critic_loss="td", gamma=0.8, td_max_weight=3.0,
                          repr_norm=repr_norm, td_weights=td_weights, normalize_states=False)  # raw inputs by hand
    nets = cvl.make_networks(cfg, act_dim)
    state = cvl.init_state(jax.random.key(0), cfg, nets, obs_dim, act_dim)
    target = jax.tree.map(lambda x: x * 1.5 + 0.1, state.critic)  # a target different from the critic
    state = state.replace(critic_target=target, critic={**state.critic, "absorbing": jnp.arange(4.0) / 4})
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    batch = cvl.Batch(f32(rng.normal(size=(b, obs_dim))), f32(rng.uniform(-1, 1, (b, act_dim))),
                      f32(rng.normal(size=(b, obs_dim))), jnp.array([0, 1, 0, 0, 1, 0], bool), f32(rng.normal(size=b)),
                      f32(rng.normal(size=(b, obs_dim))), jnp.zeros(b, bool), jnp.array([0, 0, 1, 0, 0, 0], bool),
                      f32(rng.normal(size=b)))
    key = jax.random.key(5)
    loss, (metrics, _) = cvl.critic_loss_td(state.critic, state, batch, key, cfg, nets, lambda x, *_: x)

    f = partial(logit_by_hand, nets)

    def bce(x, y):
        return float(np.log1p(np.exp(-x))) if y else float(np.log1p(np.exp(x)))

    mean, std = cvl.actor_dist(nets, state.actor, batch.next_observations, cfg)
    next_a = np.tanh(np.asarray(mean + std * jax.random.normal(key, mean.shape)))
    s, a, g, nxt = (np.asarray(x) for x in (batch.observations, batch.actions, batch.goals, batch.next_observations))
    absorbing = np.asarray(batch.absorbing)
    total = 0.0
    for i in range(b):
        row = (1 - cfg.gamma) * bce(f(state.critic, s[i], a[i], nxt[i], False), 1)
        ratios = [math.exp(f(target, nxt[i], next_a[i], g[k], absorbing[k])) for k in range(b) if k != i]
        for j in range(b):
            if j == i:
                continue
            fij = f(state.critic, s[i], a[i], g[j], absorbing[j])
            if bool(batch.done[i]):
                w = absorbing[j] / absorbing.mean()
            else:
                w = math.exp(f(target, nxt[i], next_a[i], g[j], absorbing[j]))
                w = w / np.mean(ratios) if td_weights == "normalized" else w
            row += (cfg.gamma * min(w, cfg.td_max_weight) * bce(fij, 1) + bce(fij, 0)) / (b - 1)
        total += row / b
    assert float(loss) == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("repr_norm", ["none", "unit"])
def test_unit_norm_representations_leave_an_action_only_the_direction_of_phi(raw_small, repr_norm):
    """With --repr-norm unit the logits are scale * cos(phi, psi) + bias (checked against the raw networks), so
    lengthening phi(s, a), e.g. by scaling its last layer, changes neither the critic's loss nor Q; without it, it
    changes both."""
    cfg = cvl.make_config("cpu", hidden=(32,), repr_dim=8, batch_size=16, repr_norm=repr_norm)
    nets = cvl.make_networks(cfg, 6)
    state = cvl.init_state(jax.random.key(0), cfg, nets, 17, 6)
    batch = cvl.sample_batch(cvl.make_data(raw_small), jax.random.key(1), 16, 0.99, "arrival")
    batch = batch._replace(absorbing=batch.absorbing.at[3].set(True))  # one absorbing goal among them
    logits, _ = cvl.critic_logits(nets, state.critic, batch.observations, batch.actions, batch.goals, batch.absorbing)
    s, a, g, absorbing = (np.asarray(x) for x in (batch.observations, batch.actions, batch.goals, batch.absorbing))
    for i, j in [(0, 1), (2, 2), (5, 3)]:
        assert float(logits[i, j]) == pytest.approx(logit_by_hand(nets, state.critic, s[i], a[i], g[j], absorbing[j]),
                                                    rel=1e-4, abs=1e-5)

    def loss_and_q(critic):
        loss, (_, psi) = cvl.critic_loss_nce(critic, state, batch, None, cfg, nets, lambda x, *_: x)
        return float(loss), np.asarray(cvl.q_estimate(nets, critic, s, a, psi, batch.goal_rewards, cfg))

    params = state.critic["phi"]["params"]
    last = max(k for k in params if k.startswith("Dense"))  # phi's output layer: 3x its kernel and bias, 3x phi
    longer = {**state.critic, "phi": {"params": {**params, last: jax.tree.map(lambda x: 3.0 * x, params[last])}}}
    (loss, q), (loss3, q3) = loss_and_q(state.critic), loss_and_q(longer)
    if repr_norm == "unit":
        assert loss3 == pytest.approx(loss, rel=1e-5) and np.allclose(q3, q, rtol=1e-5)
    else:
        assert abs(loss3 - loss) > 1e-3 and not np.allclose(q3, q, rtol=1e-3)


BC_CHECKED = set()
FROZEN_CRITIC = {"phi": None, "absorbing": np.zeros(2, np.float32)}  # hand-made phi and psi (below); numpy, since
# a JAX array made at import would start JAX before the multi-process test can call jax.distributed.initialize()


def frozen_critic_problem(b: int, data_actions: bool):
    """A batch of b rows (3-dim states, 2-dim actions: uniform in [-0.9, 0.9], or zeros) and a hand-made frozen
    critic, f(s, a, g_j) = 4 a_0 r_j: goals with high reward favour a high first action, so Q rises with a_0."""
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(b, 3)), jnp.float32)
    a = jnp.asarray(rng.uniform(-0.9, 0.9, (b, 2)), jnp.float32) if data_actions else jnp.zeros((b, 2))
    r = jnp.asarray(rng.normal(size=b), jnp.float32)
    batch = cvl.Batch(s, a, s, jnp.zeros(b, bool), r, s, jnp.zeros(b, bool), jnp.zeros(b, bool), r)
    phi = type("Phi", (), {"apply": staticmethod(lambda _, x: jnp.stack([4 * x[:, 3], x[:, 0] * 0], 1))})()
    return batch, jnp.stack([r, jnp.zeros(b)], axis=1), phi


def train_against_frozen_critic(batch, psi, phi, **flags):
    """300 Adam steps of the configured actor objective alone against the frozen critic; (cfg, nets, actor)."""
    cfg = cvl.make_config("cpu", **flags)
    nets = cvl.make_networks(cfg, 2)._replace(phi=phi)
    actor = nets.actor.init(jax.random.key(0), batch.observations)
    opt = cvl.make_optimizer(cfg)
    opt_state = opt.init(actor)
    grad = jax.jit(jax.grad(lambda p, k: cvl.ACTOR_OBJECTIVES[cfg.actor_objective](p, FROZEN_CRITIC, psi, nets, batch,
                                                                                  k, cfg.alpha, cfg)[0]))
    for i in range(300):
        updates, opt_state = opt.update(grad(actor, jax.random.key(i)), opt_state)
        actor = optax.apply_updates(actor, updates)
    return cfg, nets, actor


@pytest.mark.parametrize("objective, flags", [
    ("awr", dict(awr_beta=2.0, awr_advantage="q")), ("q", dict(bc_coef=0.5)), ("ddpg", dict()),
    ("ddpg", dict(ddpg_lambda="grad", ddpg_push=1.0)), ("awr-ddpg", dict(awr_advantage="q")),
    ("awr-push", dict(awr_beta=0.0, awr_push=0.5)),
    ("q", dict(bc_coef=0.5, q_estimator="marginal")), ("q", dict(bc_coef=0.5, q_estimator="diag"))])
def test_actor_moves_towards_what_a_frozen_critic_prefers(objective, flags):
    """Each actor objective, trained alone against the frozen critic, moves the policy's first action up, while
    behaviour cloning of the same data (centred on 0) does not; each logs Q at the policy's sampled actions as
    q_mean."""
    batch, psi, phi = frozen_critic_problem(256, data_actions=True)

    def train_actor(**kw):
        cfg, nets, actor = train_against_frozen_critic(batch, psi, phi, hidden=(32, 32), actor_objective=objective,
                                                       **kw)
        return cfg, nets, actor, cvl.eval_action(nets, actor, batch.observations)

    if objective not in BC_CHECKED:  # behaviour cloning is the same whatever the estimator: check it once
        bc = dict(awr=dict(awr_beta=0.0), q=dict(bc_coef=1.0), ddpg=dict(ddpg_alpha=1e-6),
                  **{"awr-ddpg": dict(ddpg_alpha=1e-6, awr_beta=0.0), "awr-push": dict(awr_beta=0.0, awr_push=1e-6)}
                  )[objective]
        bc_action = train_actor(**bc)[-1]
        assert abs(np.asarray(bc_action)[:, 0].mean()) < 0.15
        BC_CHECKED.add(objective)
    cfg, nets, actor, action = train_actor(**flags)
    assert np.asarray(action)[:, 0].mean() > 0.3
    _, metrics = cvl.ACTOR_OBJECTIVES[objective](actor, FROZEN_CRITIC, psi, nets, batch, jax.random.key(0), 0.1, cfg)
    mean, std = cvl.actor_dist(nets, actor, batch.observations, cfg)
    if objective in cvl.DDPG_STEPS:  # the deterministic policy's Q
        q = cvl.q_estimate(nets, FROZEN_CRITIC, batch.observations, jnp.tanh(mean), psi, batch.goal_rewards, cfg)
        assert float(metrics["q_mean"]) == pytest.approx(float(q.mean()), rel=1e-5)
        return
    q_draws = [float(cvl.q_estimate(nets, FROZEN_CRITIC, batch.observations,  # batch means of Q, 32 policy draws
                                    jnp.tanh(mean + std * jax.random.normal(jax.random.key(k), mean.shape)), psi,
                                    batch.goal_rewards, cfg).mean()) for k in range(32)]
    assert float(metrics["q_mean"]) == pytest.approx(np.mean(q_draws), abs=4 * np.std(q_draws) + 1e-4)
    assert objective != "awr" or 1 / 256 <= float(metrics["awr_ess"]) <= 1


def frozen_q_and_slope(a, r):
    """Q(s_i, a_i) of the frozen critic f(s_i, a_i, g_j) = 4 a_i0 r_j, each row's own goal left out, and dQ/da_0 = 4
    Var_softmax(r) (the softmax's weights move with f; dQ/da_1 = 0), in float64."""
    f = 4 * a[:, :1] * r[None, :]
    np.fill_diagonal(f, -np.inf)
    p = np.exp(f - f.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p @ r, 4 * (p @ r ** 2 - (p @ r) ** 2)


def awr_weights_by_hand(nets, actor, psi, batch, key, cfg, beta):
    """AWR's weights min(exp(beta A / std(A)), 100) of the batch's rows, from cvl's advantages, in float64."""
    adv, _ = cvl.awr_advantage(nets, FROZEN_CRITIC, actor, psi, batch, jax.random.fold_in(key, 1), cfg)
    adv = np.asarray(adv, np.float64)
    return np.minimum(np.exp(beta * adv / adv.std()), 100.0)


def test_ddpg_actor_loss_against_a_hand_computation():
    """-lambda Q(s, tanh(mean)) + mean_dims (tanh(mean) - a)^2, lambda = ddpg_alpha / mean|Q|, plus the BC NLL of the
    std with the mean held fixed: the mean's gradient comes from the first two terms only."""
    batch, psi, phi = frozen_critic_problem(64, data_actions=True)
    cfg = cvl.make_config("cpu", hidden=(16,), actor_objective="ddpg", ddpg_alpha=1.7)
    nets = cvl.make_networks(cfg, 2)._replace(phi=phi)
    actor = nets.actor.init(jax.random.key(1), batch.observations)
    loss, metrics = cvl.actor_loss_ddpg(actor, FROZEN_CRITIC, psi, nets, batch, jax.random.key(0), 0.0, cfg)
    mean, std = (np.asarray(x, np.float64) for x in cvl.actor_dist(nets, actor, batch.observations, cfg))
    a, r = np.tanh(mean), np.asarray(batch.goal_rewards, np.float64)
    q, g0 = frozen_q_and_slope(a, r)
    mse = ((a - np.asarray(batch.actions)) ** 2).mean(1)
    nll = np.asarray(cvl.bc_nll(jnp.asarray(mean), jnp.asarray(std), batch.actions))
    expected = np.mean(-1.7 / np.abs(q).mean() * q + mse) + nll.mean()
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(metrics["lmbda"]) == pytest.approx(1.7 / np.abs(q).mean(), rel=1e-4)

    # --ddpg-lambda grad: lambda = ddpg_push / rms dQ/da. Here dQ/da_0 = 4 Var_softmax(r) (the softmax's weights
    # move with f = 4 a_0 r), dQ/da_1 = 0, so the rms over rows and both dims is sqrt(mean(g0^2) / 2).
    cfg = cvl.make_config("cpu", hidden=(16,), actor_objective="ddpg", ddpg_lambda="grad", ddpg_push=0.3)
    loss, metrics = cvl.actor_loss_ddpg(actor, FROZEN_CRITIC, psi, nets, batch, jax.random.key(0), 0.0, cfg)
    lmbda = 0.3 / np.sqrt(np.mean(g0 ** 2) / 2)
    assert float(metrics["lmbda"]) == pytest.approx(lmbda, rel=1e-3)
    assert float(loss) == pytest.approx(np.mean(-lmbda * q + mse) + nll.mean(), rel=1e-3)


def test_awr_ddpg_weights_the_bc_term_by_awr_weights():
    """awr-ddpg is DDPG+BC with row i's squared error weighted by w_i / mean(w), w = AWR's weights (here with
    --ddpg-lambda grad); so on data where half the rows at each state took a good action and half a bad one, with
    the Q term nearly off, its policy goes to the good action where DDPG+BC's BC term pulls it to their mean."""
    batch, psi, phi = frozen_critic_problem(64, data_actions=True)
    cfg = cvl.make_config("cpu", hidden=(16,), actor_objective="awr-ddpg", ddpg_lambda="grad", ddpg_push=0.3,
                          awr_beta=1.5, awr_advantage="q")
    nets = cvl.make_networks(cfg, 2)._replace(phi=phi)
    actor = nets.actor.init(jax.random.key(1), batch.observations)
    key = jax.random.key(0)
    loss, metrics = cvl.actor_loss_awr_ddpg(actor, FROZEN_CRITIC, psi, nets, batch, key, 0.0, cfg)
    w = awr_weights_by_hand(nets, actor, psi, batch, key, cfg, beta=1.5)
    mean, std = (np.asarray(x, np.float64) for x in cvl.actor_dist(nets, actor, batch.observations, cfg))
    a, r = np.tanh(mean), np.asarray(batch.goal_rewards, np.float64)
    q, g0 = frozen_q_and_slope(a, r)  # at the policy's actions
    lmbda = 0.3 / np.sqrt(np.mean(g0 ** 2) / 2)
    mse = ((a - np.asarray(batch.actions)) ** 2).mean(1)
    nll = np.asarray(cvl.bc_nll(jnp.asarray(mean), jnp.asarray(std), batch.actions))
    assert float(loss) == pytest.approx(np.mean(-lmbda * q + w / w.mean() * mse) + nll.mean(), rel=1e-3)
    assert float(metrics["awr_ess"]) == pytest.approx(w.sum() ** 2 / (64 * (w ** 2).sum()), rel=1e-4)
    assert float(metrics["bc_weight_max"]) == pytest.approx(w.max() / w.mean(), rel=1e-4)  # the largest BC factor

    two = frozen_critic_problem(128, data_actions=False)[0]  # every state twice: first action +0.8, then -0.8
    s = jnp.concatenate([two.observations[:64]] * 2)
    a = jnp.concatenate([jnp.full((64, 2), 0.8), jnp.full((64, 2), -0.8)]).at[:, 1].set(0.0)
    r = jnp.concatenate([two.goal_rewards[:64]] * 2)
    batch = two._replace(observations=s, actions=a, next_observations=s, goals=s, goal_rewards=r, rewards=r)
    psi = jnp.stack([r, jnp.zeros_like(r)], axis=1)
    first = {}
    for name in ("ddpg", "awr-ddpg"):
        _, nets, actor = train_against_frozen_critic(batch, psi, phi, hidden=(32, 32), actor_objective=name,
                                                     ddpg_alpha=1e-3, **(dict(awr_beta=2.0, awr_advantage="q")
                                                                         if name == "awr-ddpg" else {}))
        first[name] = float(np.asarray(cvl.eval_action(nets, actor, s))[:, 0].mean())
    assert abs(first["ddpg"]) < 0.15
    assert first["awr-ddpg"] > 0.6


def test_awr_push_adds_a_precision_scaled_push_to_awr():
    """awr-push's gradient is AWR's plus, on row i's pre-tanh mean, -step_i / std_i^2 (over the batch size), step =
    awr_push mean(w) dQ/dmean / rms(dQ/dmean) held fixed: against a hand computation of dQ/dmean and of the
    gradient in the actor's parameters."""
    batch, psi, phi = frozen_critic_problem(64, data_actions=True)
    cfg = cvl.make_config("cpu", hidden=(16,), actor_objective="awr-push", awr_push=0.7, awr_beta=1.5,
                          awr_advantage="q")
    nets = cvl.make_networks(cfg, 2)._replace(phi=phi)
    actor = nets.actor.init(jax.random.key(1), batch.observations)
    key = jax.random.key(0)
    loss, metrics = cvl.actor_loss_awr_push(actor, FROZEN_CRITIC, psi, nets, batch, key, 0.1, cfg)
    awr_loss, awr_metrics = cvl.actor_loss_awr(actor, FROZEN_CRITIC, psi, nets, batch, key, 0.1, cfg)
    w = awr_weights_by_hand(nets, actor, psi, batch, key, cfg, beta=1.5)
    mean, std = (np.asarray(x, np.float64) for x in cvl.actor_dist(nets, actor, batch.observations, cfg))
    a, r = np.tanh(mean), np.asarray(batch.goal_rewards, np.float64)
    g = np.stack([frozen_q_and_slope(a, r)[1], np.zeros(64)], 1) * (1 - a ** 2)  # dQ/dmean at the policy's actions
    step = 0.7 * w.mean() * g / np.sqrt(np.mean(g ** 2))
    assert float(awr_metrics["awr_weight_mean"]) == pytest.approx(w.mean(), rel=1e-4)
    assert float(metrics["push_max"]) == pytest.approx(np.abs(step).max(), rel=1e-3)
    push = jnp.asarray(step / std ** 2, jnp.float32)
    assert float(loss) == pytest.approx(float(awr_loss) - float(np.mean(np.sum(step / std ** 2 * mean, 1))),
                                        rel=1e-3, abs=1e-4)

    def pushed(params):  # the push as a linear term in the mean, with the hand-computed factors
        m, _ = cvl.actor_dist(nets, params, batch.observations, cfg)
        return jnp.mean(jnp.sum(push * m, axis=-1))

    grad = jax.grad(lambda p: cvl.actor_loss_awr_push(p, FROZEN_CRITIC, psi, nets, batch, key, 0.1, cfg)[0])(actor)
    awr_grad = jax.grad(lambda p: cvl.actor_loss_awr(p, FROZEN_CRITIC, psi, nets, batch, key, 0.1, cfg)[0])(actor)
    expected = jax.tree.map(lambda gr, h: gr - h, awr_grad, jax.grad(pushed)(actor))
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-3, atol=1e-5)


def test_awr_push_moves_the_mean_by_awr_push_however_wide_the_data():
    """With AWR's weights off (beta 0), the push moves the policy's mean (before tanh) up dQ/dmean by about
    awr_push (sqrt(2) awr_push on the first of two action dims, the only one Q depends on) at the balance with
    behaviour cloning's pull, on narrow data and on data 8x wider alike; a push not divided by the std^2 the
    likelihood pulls with would move the narrow policy 64x less."""
    batch, psi, phi = frozen_critic_problem(256, data_actions=False)
    noise = np.random.default_rng(1).normal(size=(256, 2)).astype(np.float32)
    for spread in (0.05, 0.4):
        data = batch._replace(actions=jnp.asarray(spread * noise))
        means = []
        for push in (1e-6, 0.2):
            cfg, nets, actor = train_against_frozen_critic(data, psi, phi, hidden=(32, 32), actor_objective="awr-push",
                                                           awr_beta=0.0, awr_push=push)
            means.append(float(cvl.actor_dist(nets, actor, data.observations, cfg)[0][:, 0].mean()))
        assert 0.5 < (means[1] - means[0]) / (0.2 * np.sqrt(2)) < 1.5, (spread, means)


def test_awr_advantages_against_a_hand_computation():
    """q: Q(s, a_data) - V(s); td: (1 - gamma) r + gamma V(s') - V(s) with V(s') = 0 after a fall; V(s) is Q at the
    policy's actions (std ~0 here, so exactly Q(s, tanh(mean)))."""
    rng = np.random.default_rng(3)
    b, gamma = 5, 0.9
    f32 = partial(jnp.asarray, dtype=jnp.float32)
    s, s_next, a = f32(rng.normal(size=(b, 3))), f32(rng.normal(size=(b, 3))), f32(rng.uniform(-1, 1, (b, 2)))
    r, done = f32(rng.normal(size=b)), jnp.array([0, 1, 0, 0, 1], bool)
    batch = cvl.Batch(s, a, s, jnp.zeros(b, bool), r, s_next, jnp.zeros(b, bool), done, r)
    cfg = cvl.make_config("cpu", gamma=gamma)
    mean, next_mean, tiny = f32(rng.normal(size=(b, 2))), f32(rng.normal(size=(b, 2))), jnp.full((b, 2), 1e-7)

    def q_of(states, actions):  # Q depends on both the state and the action
        return states[:, 0] * 2.0 + actions[:, 1]

    def v(states, means):
        return np.asarray(states)[:, 0] * 2.0 + np.tanh(np.asarray(means))[:, 1]

    def dist_of(states):  # the policy at s_t or at s_{t+1}
        return (mean if states is s else next_mean), tiny

    key = jax.random.key(0)
    a_td, v_td = cvl.advantage_td(q_of, dist_of, batch, key, cfg)
    want = (1 - gamma) * np.asarray(r) + gamma * np.where(done, 0.0, v(s_next, next_mean)) - v(s, mean)
    assert np.allclose(a_td, want, atol=1e-5) and np.allclose(v_td, v(s, mean), atol=1e-5)
    a_q, v_q = cvl.advantage_q(q_of, dist_of, batch, key, cfg)
    assert np.allclose(a_q, np.asarray(q_of(s, a)) - v(s, mean), atol=1e-5) and np.allclose(v_q, v(s, mean), atol=1e-5)


def test_awr_weights_and_their_effective_sample_size_against_numpy():
    rng = np.random.default_rng(5)
    adv = rng.standard_t(3, size=64).astype(np.float32)  # heavy tails, as AWR's advantages have
    cfg = cvl.make_config("cpu", awr_beta=1.5, awr_max_weight=20.0)
    w, ess = cvl.awr_weights(jnp.asarray(adv), cfg)
    want = np.minimum(np.exp(1.5 * adv / adv.std()), 20.0)
    np.testing.assert_allclose(w, want, rtol=1e-5)
    assert float(ess) == pytest.approx(want.sum() ** 2 / (64 * (want ** 2).sum()), rel=1e-5)
    assert float(cvl.awr_weights(jnp.zeros(64), cfg)[1]) == pytest.approx(1.0)  # equal weights: the whole batch
    one = jnp.zeros(64).at[3].set(1.0)  # one row far above the rest, weights unclipped: nearly one row's worth
    assert float(cvl.awr_weights(one, dataclasses.replace(cfg, awr_beta=5.0, awr_max_weight=1e9))[1]) < 2.0 / 64


def test_awr_with_the_td_advantage_follows_the_datas_rewards_not_the_critics_action_ranking():
    """The frozen critic prefers a high first action; the data's rewards pay for a low one. The TD advantage follows
    the rewards (the critic only ranks states), the critic's own advantage follows the critic."""
    batch, psi, phi = frozen_critic_problem(256, data_actions=True)
    batch = batch._replace(rewards=-3.0 * batch.actions[:, 0])

    def first_action(advantage):
        _, nets, actor = train_against_frozen_critic(batch, psi, phi, hidden=(32, 32), actor_objective="awr",
                                                     awr_beta=2.0, awr_advantage=advantage, gamma=0.5)
        return np.asarray(cvl.eval_action(nets, actor, batch.observations))[:, 0].mean()

    assert first_action("td") < -0.3 and first_action("q") > 0.3


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
    grad = jax.jit(jax.grad(lambda p: cvl.bc_nll(*cvl.actor_dist(nets, p, s, cfg), a).mean()))
    for _ in range(1500):
        updates, opt_state = opt.update(grad(actor), opt_state)
        actor = optax.apply_updates(actor, updates)
    mean, std = (np.asarray(x) for x in cvl.actor_dist(nets, actor, s, cfg))
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
        policy = cvl.seeds_policy(partial(cvl.eval_action, cvl.make_networks(cfg, 6)))
        returns = cvl.evaluate(policy, actor_i, ENV_ID, [i], cfg.eval_episodes)
        score = cvl.normalized_score(returns.mean(), *cvl.D4RL_ENVS["halfcheetah"][1:])
        assert float(multi[-1][f"score_s{i}"]) == pytest.approx(score, rel=1e-9)
    scores = [float(multi[-1][f"score_s{i}"]) for i in range(2)]
    assert float(multi[-1]["score"]) == pytest.approx(np.mean(scores))
    assert float(multi[-1]["score_std"]) == pytest.approx(np.std(scores))


# ---------------------------------------------------------------------------------------------- end to end
def test_evaluation_compiles_the_policy_once_per_run_and_logs_its_seconds(tmp_path, dataset, monkeypatch):
    traces, eval_action = [], cvl.eval_action

    def counted(nets, actor, s):  # runs once per trace (compile), not per call
        traces.append(s.shape)
        return eval_action(nets, actor, s)

    monkeypatch.setattr(cvl, "eval_action", counted)
    cvl.train(small_config(dataset, tmp_path, steps=150, eval_every=50, num_seeds=2))
    rows = read_rows(next(tmp_path.glob("*/")))
    assert [int(r["step"]) for r in rows if r.get("score")] == [50, 100, 150]
    assert all(float(r["eval_seconds"]) > 0 for r in rows if r.get("score"))
    assert len(traces) == 1  # three evaluations, one compile


def test_cli_end_to_end_cpu_preset(tmp_path, dataset):
    run_cli("--dataset", dataset, "--preset", "cpu", "--steps", "300", "--out", tmp_path / "cli", "--eval-episodes",
            "3", "--no-progress")
    (run_dir,) = list((tmp_path / "cli").iterdir())
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
    # the same config in this process: the same losses and score
    same = cvl.train(cvl.make_config("cpu", dataset=str(dataset), steps=300, out=str(tmp_path / "here"),
                                     eval_episodes=3, progress=False))
    for got, want in zip(rows, read_rows(same["run_dir"])):
        for key in ("critic_loss", "actor_loss", "q_mean", "score"):
            if want.get(key):
                assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5), key


OPTIMISED_SCRIPT = """
import sys, numpy as np, jax
sys.path.insert(0, {here!r})
import cvl, test_cvl
assert not jax.config.read("jax_disable_most_optimizations")
raw = test_cvl.rollouts(episodes=8, length=40, seed=1)
for i, flags in enumerate(test_cvl.OPTIMISED_CONFIGS):
    state, history = test_cvl.train_chunks(cvl.make_config("cpu", **flags), raw, chunks=1, n=5)
    np.savez({out!r} + str(i), *jax.tree.leaves(cvl.to_host((state.critic, state.actor))))
"""
OPTIMISED_CONFIGS = [dict(hidden=(32, 32), batch_size=64, repr_dim=8),
                     dict(hidden=(32, 32), batch_size=64, repr_dim=8, action_negatives=4, actor_objective="ddpg",
                          layer_norm=True)]


def test_the_optimised_update_equals_the_one_the_tests_compile(tmp_path):
    """The suite compiles with most of XLA's optimisations off (for speed); the programs users run have them on.
    Five updates of each config, optimised in a fresh process, match the tests' unoptimised ones."""
    env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}
    out = str(tmp_path / "optimised")
    proc = subprocess.run([sys.executable, "-c", OPTIMISED_SCRIPT.format(here=str(HERE), out=out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert jax.config.read("jax_disable_most_optimizations")  # this process: the tests' mode
    raw = rollouts(episodes=8, length=40, seed=1)
    for i, flags in enumerate(OPTIMISED_CONFIGS):
        state, _ = train_chunks(cvl.make_config("cpu", **flags), raw, chunks=1, n=5)
        optimised = np.load(out + f"{i}.npz")
        leaves = jax.tree.leaves(cvl.to_host((state.critic, state.actor)))
        assert len(leaves) == len(optimised.files)
        for k, x in enumerate(leaves):
            np.testing.assert_allclose(optimised[f"arr_{k}"], x, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ multi-device
TWO_DEVICE_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {here!r})
import cvl, test_cvl
assert jax.device_count() == 2
raw = test_cvl.rollouts(episodes=8, length=40, seed=1)
for seeds in (1, 2):  # one seed (the seed axis dropped inside the step) and a vmapped pair
    results = []
    for devices in (1, 2):
        cfg = cvl.make_config("cpu", hidden=(32, 32), batch_size=64, repr_dim=8, devices=devices, num_seeds=seeds)
        state, history = test_cvl.train_chunks(cfg, raw, chunks=1, n=5, seeds=range(seeds))
        results.append((cvl.to_host(state.critic), cvl.to_host(state.actor), history[0]))
    (c1, a1, m1), (c2, a2, m2) = results
    for x, y in zip(jax.tree.leaves((c1, a1)), jax.tree.leaves((c2, a2))):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    for k in m1:  # an accuracy counts argmaxes, which a rounding-level difference flips at a near tie (contrastive
        # TD's positive s' can be another row's goal): up to 5 of the 5 x 64 rows may differ; the parameters may not
        tol = dict(atol=1 / 64) if k.endswith("accuracy") else dict(rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m1[k], m2[k], err_msg=k, **tol)
    print("EQUAL", seeds, sorted(m1))
"""


def test_two_devices_equal_one_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT.format(here=str(HERE))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EQUAL 1" in proc.stdout and "EQUAL 2" in proc.stdout and "critic_loss" in proc.stdout


DISTRIBUTED_SCRIPT = """
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {here!r})
import cvl, test_cvl
pid = int(sys.argv[1])
cfg = test_cvl.small_config({dataset!r}, {out!r}, distributed=True, coordinator_address="127.0.0.1:{port}",
                            num_processes=2, process_id=pid, steps=100, eval_episodes=1)
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
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cvl.os, "fsync", crash)  # dies after writing the temp file, before the rename
    cfg = cvl.load_checkpoint(run_dir)["config"]
    nets = cvl.make_networks(cfg, 6)
    state = cvl.init_states(cfg, nets, [0], 17, 6)
    with pytest.raises(cvl.WriteError, match="No space left on device"):
        cvl.save_checkpoint(run_dir, state, cfg, [])
    assert (run_dir / "checkpoint.msgpack").read_bytes() == before
    assert cvl.load_checkpoint(run_dir)["step"] == 50
    assert not list(run_dir.glob("*.tmp*"))  # no stale temp file


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
    # the same episodes as the run's last evaluation (its seeds, its episodes): the same score
    result = cvl.evaluate_checkpoint(final["run_dir"] + "/checkpoint.msgpack", episodes=2)
    assert result["step"] == 50 and result["score"] == pytest.approx(float(read_rows(final["run_dir"])[-1]["score"]),
                                                                     rel=1e-9)


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
    assert cvl.record_episode(actor, partial(cvl.eval_action, nets), ENV_ID, seed=0) is None
    err = capsys.readouterr().err
    assert "no video" in err and "cannot initialize EGL display" in err and "MUJOCO_GL=egl" in err


# ------------------------------------------------------------------------------ bad input, faults, long runs
def small_args(dataset, out, **kw) -> list[str]:
    """small_config as command-line flags."""
    base = dict(dataset=dataset, eval_env=ENV_ID, hidden="32 32", batch_size=64, repr_dim=8, steps=50,
                updates_per_call=50, eval_every=50, eval_episodes=1, checkpoint_every=50, out=out, preset="cpu")
    args = ["--no-progress"]
    for k, v in {**base, **kw}.items():
        args += ["--" + k.replace("_", "-"), *str(v).split(" ")]
    return args


def fails_in_one_line(argv, expected: str) -> str:
    """cvl.main(argv) stops with a CVLError (exit 2 from the command line) of one line containing `expected`."""
    with pytest.raises(cvl.CVLError) as err:
        cvl.main([str(a) for a in argv])
    msg = str(err.value)
    assert not isinstance(err.value, cvl.Diverged) and "\n" not in msg and expected in msg, msg
    return msg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, dataset):
    """A finished 50-step run; tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("finished")
    return Path(cvl.main(small_args(dataset, out))["run_dir"])


def copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / run.name))


@pytest.mark.parametrize("flags, expected", [
    (dict(seed=-1), "--seed must be >= 0, got -1"),
    (dict(devices=-1), "--devices must be >= 0, got -1"),
    (dict(lr=-1), "--lr must be positive"),
    (dict(lr=0), "--lr must be positive"),
    (dict(alpha=-1), "--alpha must be >= 0"),
    (dict(actor_min_std=-1), "--actor-min-std must be positive"),
    (dict(actor_max_std=1e-7), "--actor-max-std must be above --actor-min-std"),
    (dict(eval_env="CartPole-v1"), "needs flat continuous (Box) spaces"),
    (dict(actor_objective="awr", awr_advantage="td", q_estimator="diag"),
     "--awr-advantage td adds r to Q, so Q must be in the reward's units, which --q-estimator diag is not"),
    (dict(bc_coef=1.0, actor_objective="awr"), "--bc-coef 1.0 does nothing with --actor-objective awr: add "
                                               "--actor-objective q, or drop"),
    (dict(bc_coef=1.0, actor_objective="ddpg"), "--bc-coef 1.0 does nothing with --actor-objective ddpg"),
    (dict(actor_objective="ddpg", alpha=0.1), "--alpha 0.1 does nothing with --actor-objective ddpg: add "
                                              "--actor-objective awr or awr-push or q"),
    (dict(actor_objective="ddpg", ddpg_alpha=0), "--ddpg-alpha must be positive"),
    (dict(ddpg_alpha=1.0, actor_objective="awr"), "--ddpg-alpha 1.0 does nothing with --actor-objective awr: add "
                                                  "--actor-objective ddpg"),
    (dict(awr_beta=2.0, actor_objective="q"), "--awr-beta 2.0 does nothing with --actor-objective q"),
    (dict(awr_beta=2.0, actor_objective="ddpg"), "--awr-beta 2.0 does nothing with --actor-objective ddpg: add "
                                                 "--actor-objective awr"),
    (dict(actor_objective="awr-push", awr_push=0.0), "--awr-push must be positive"),
    (dict(awr_push=0.3, actor_objective="awr"), "--awr-push 0.3 does nothing with --actor-objective awr: add "
                                                "--actor-objective awr-push"),
    (dict(tau=0.01, critic_loss="nce"), "--tau 0.01 does nothing with --critic-loss nce: add --critic-loss td"),
    (dict(td_max_weight=5, critic_loss="nce"), "--td-max-weight 5.0 does nothing with --critic-loss nce"),
    (dict(td_weights="raw", critic_loss="nce"), "--td-weights raw does nothing with --critic-loss nce: add "
                                                "--critic-loss td"),
    (dict(action_negatives=-1), "--action-negatives must be >= 0"),
    (dict(action_coef=2.0), "--action-coef 2.0 does nothing with --action-negatives 0: add --action-negatives M"),
    (dict(action_sampler="uniform"), "--action-sampler uniform does nothing with --action-negatives 0"),
    (dict(ddpg_alpha=1.0, actor_objective="q"), "--ddpg-alpha 1.0 does nothing with --actor-objective q: add "
                                                "--actor-objective ddpg"),
    (dict(actor_objective="ddpg", ddpg_lambda="grad", ddpg_alpha=1.0), "--ddpg-alpha 1.0 does nothing with "
                                                                       "--ddpg-lambda grad: add --ddpg-lambda q"),
    (dict(ddpg_push=0.1), "--ddpg-push 0.1 does nothing with --ddpg-lambda q --actor-objective awr-push: add "
                          "--ddpg-lambda grad and --actor-objective ddpg or awr-ddpg, or drop"),
    (dict(actor_objective="ddpg", awr_beta=1.0), "--awr-beta 1.0 does nothing with --actor-objective ddpg: add "
                                                 "--actor-objective awr or awr-ddpg or awr-push, or drop"),
    (dict(actor_objective="ddpg", ddpg_lambda="grad", ddpg_push=0), "--ddpg-push must be positive"),
    (dict(batch_size=1), "--batch-size 1 leaves the critic no negatives"),
    (dict(goal_reward="goal", actor_objective="awr"), "--goal-reward goal leaves r_t out of Q"),
])
def test_bad_flags_stop_before_anything_is_written(tmp_path, dataset, flags, expected):
    fails_in_one_line(small_args(dataset, tmp_path / "out", **flags), expected)
    assert not (tmp_path / "out").exists()  # no run directory left behind


def test_unknown_d4rl_names_and_bad_mirrors_name_the_fix(tmp_path, monkeypatch):
    msg = fails_in_one_line(["--env", "halfcheeta-medium-v2", "--eval-env", ENV_ID], "unknown D4RL env")
    assert "did you mean halfcheetah-medium-v2" in msg
    fails_in_one_line(["--env", "no-such-env-v2"], "unknown D4RL env 'no-such-env-v2'")
    fails_in_one_line(["--env", "hopper-medium-v2", "--d4rl-url", "notaurl"], "--d4rl-url 'notaurl' is not an http")
    monkeypatch.setenv("CVL_D4RL_URL", "ftp:/x")
    fails_in_one_line(["--env", "hopper-medium-v2"], "CVL_D4RL_URL 'ftp:/x' is not an http")
    monkeypatch.delenv("CVL_D4RL_URL")
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "a-file" / "datasets"))
    (tmp_path / "a-file").write_text("not a folder")
    fails_in_one_line(["--env", "hopper-medium-v2", "--d4rl-url", "http://127.0.0.1:9"],
                      "set D4RL_DATASET_DIR to a writable folder")


def test_unwritable_out_fails_in_one_line_and_leaves_nothing(tmp_path, dataset):
    (tmp_path / "file").write_text("x")
    for out in ("/proc/cvl-test-out", tmp_path / "file" / "runs"):
        fails_in_one_line(small_args(dataset, out), "pass a writable --out")
    assert (tmp_path / "file").read_text() == "x"


def test_column_shaped_terminals_timeouts_and_rewards_read_as_flat(raw_small):
    raw = {k: v.copy() for k, v in raw_small.items()}
    raw["terminals"][[59, 300]] = True  # two falls, so terminals matter
    column = {**raw, **{k: raw[k][:, None] for k in ("terminals", "timeouts", "rewards")}}
    flat, col = (cvl.make_data(cvl.validate_dataset(r, "f", 17, 6)) for r in (raw, column))
    for a, b in zip(flat, col):
        np.testing.assert_array_equal(a, b)


def test_misleading_advice_is_gone(tmp_path, dataset, finished_run, monkeypatch):
    fails_in_one_line(small_args(tmp_path, tmp_path / "out"), "is a directory; pass the .hdf5 or .npz file")
    junk = tmp_path / "mine.hdf5"
    junk.write_bytes(b"not hdf5" * 100)
    msg = fails_in_one_line(small_args(junk, tmp_path / "out"), "check that it is a complete .hdf5 or .npz file")
    assert "download" not in msg
    monkeypatch.setattr(cvl.os, "access", lambda p, mode: Path(p) != dataset)
    fails_in_one_line(small_args(dataset, tmp_path / "out"), "cannot be read (permission denied)")
    monkeypatch.undo()
    fails_in_one_line(["--evaluate", dataset], "is a dataset file, not a checkpoint")
    run = copy_run(finished_run, tmp_path)
    (run / "checkpoint.msgpack").unlink()  # as a run killed before its first checkpoint by an older cvl.py
    fails_in_one_line(["--resume", run], "stopped before its first checkpoint")


def test_evaluate_checks_its_flags_before_evaluating(tmp_path, finished_run, capsys):
    for episodes in ("0", "-2"):
        fails_in_one_line(["--evaluate", finished_run, "--eval-episodes", episodes], "--eval-episodes must be positive")
    (tmp_path / "file").write_text("x")
    for video in ("/proc/cvl-test/v.gif", tmp_path / "file" / "v.mp4"):
        fails_in_one_line(["--evaluate", finished_run, "--video", video], "cannot create the video's folder")
    fails_in_one_line(["--evaluate", finished_run, "--video", tmp_path / "v.avi"], "must end in .mp4 or .gif")
    assert "normalised score" not in capsys.readouterr().out  # stopped before any evaluation ran


def test_resume_from_checkpoint_file_relative_dataset_and_any_folder(tmp_path, dataset, monkeypatch):
    monkeypatch.chdir(dataset.parent)
    final = cvl.main(small_args(dataset.name, tmp_path))  # a relative --dataset
    run = Path(final["run_dir"])
    assert json.loads((run / "config.json").read_text())["dataset"] == str(dataset)
    monkeypatch.chdir(tmp_path)
    before = (run / "config.json").read_text()
    fails_in_one_line(["--resume", run, "--steps", "20"], "--steps 20 is below the 50 steps")
    assert (run / "config.json").read_text() == before
    final = cvl.main(["--resume", str(run / "checkpoint.msgpack"), "--steps", "100", "--dataset", str(dataset)])
    assert final["step"] == 100 and final["run_dir"] == str(run)
    assert [int(r["step"]) for r in read_rows(run)] == [50, 100]


def test_a_second_resume_of_a_running_run_stops_in_one_line(tmp_path, finished_run):
    run = copy_run(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "lock"}
    with cvl.run_lock(run):
        fails_in_one_line(["--resume", run, "--steps", "100"], f"is in use by cvl.py (pid {os.getpid()} on ")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "lock"} == before
    assert cvl.main(["--resume", str(run), "--steps", "100"])["step"] == 100  # free again once the holder is gone


def test_a_signal_saves_the_last_finished_step_at_once_and_resume_equals_an_uninterrupted_run(
        tmp_path, dataset, monkeypatch, capsys):
    """SIGTERM sent by the training loop's own jitted call, so exactly where it lands is fixed: the call in flight
    is abandoned and the step before it is saved (also before the first call: every run is resumable)."""
    cfg = small_config(dataset, tmp_path / "straight", steps=300, eval_every=150, checkpoint_every=150)
    straight = cvl.train(cfg)["run_dir"]
    real = cvl.make_train_fn

    def signal_during_call(k):
        def make_train_fn(*args):
            fn, calls = real(*args), []

            def call(state, data, n):
                out = fn(state, data, n)
                calls.append(n)
                if len(calls) == k:
                    os.kill(os.getpid(), signal.SIGTERM)
                return out
            return call
        return make_train_fn

    cut = cfg
    for k, stopped_at in ((1, 0), (4, 150)):  # during the first call; during 150 -> 200, after two resumed calls
        monkeypatch.setattr(cvl, "make_train_fn", signal_during_call(k))
        with pytest.raises(cvl.Stopped) as stopped:
            cvl.train(dataclasses.replace(cfg, out=str(tmp_path / "cut")) if k == 1 else cut)
        assert stopped.value.code == 128 + signal.SIGTERM
        (run,) = (tmp_path / "cut").iterdir()
        assert cvl.load_checkpoint(run)["step"] == stopped_at
        assert [int(r["step"]) for r in read_rows(run)] == list(range(50, stopped_at + 1, 50))
        assert f"interrupted at step {stopped_at}" in capsys.readouterr().err
        cut = cvl.resume_config(str(run))
    monkeypatch.undo()
    cvl.train(cut)
    assert without_timing(read_rows(run)) == without_timing(read_rows(straight))


def stop_cli_when(args, ready, sig, tmp_path, timeout=300):
    """Start cvl.py, send `sig` once ready() holds; (exit code, stderr, seconds from the signal to the exit)."""
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "fresh-cache")}  # a compile that takes time
    proc = subprocess.Popen([sys.executable, str(HERE / "cvl.py"), *map(str, args)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env, cwd=HERE)
    start = time.monotonic()
    while not ready() and proc.poll() is None and time.monotonic() - start < timeout:
        time.sleep(0.02)
    sent = time.monotonic()
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    return proc.returncode, err, time.monotonic() - sent


def test_a_stop_while_an_env_is_made_still_says_so(tmp_path):
    """Env creation hides the process's stderr (quiet_env_creation); a stop landing then must still print its line
    (it once went to /dev/null: exit 130 and no message)."""
    code = ("import os, signal, sys, time; sys.path.insert(0, %r); import cvl; cvl.guard_stops('cvl')\n"
            "with cvl.quiet_env_creation():\n"
            "    print('hidden', file=sys.stderr, flush=True); os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
            % str(HERE))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "cvl: stopped by SIGINT; nothing was written", proc.stderr


def test_a_stop_at_any_moment_is_one_line_within_seconds_and_keeps_what_was_written(tmp_path, dataset,
                                                                                     finished_run):
    """Start-up (libraries loading), the first compile (the run's step-0 checkpoint just written), the training
    loop's evaluation and an --evaluate of a saved run: exit 128 + signal within 3 s (2 s asked, on a loaded 2-core
    machine), one line, nothing half-written, no run directory without a checkpoint."""
    def after(seconds):
        start = time.monotonic()
        return lambda: time.monotonic() - start > seconds

    code, err, took = stop_cli_when(small_args(dataset, tmp_path / "a"), after(1.0), signal.SIGINT, tmp_path)
    assert code == 130 and took < 3 and err.strip().count("\n") == 0, err
    assert "stopped by SIGINT; nothing was written" in err and not (tmp_path / "a").exists()

    big = small_args(dataset, tmp_path / "b", hidden="512 512", batch_size=512, updates_per_call=500, steps=1000)
    code, err, took = stop_cli_when(big, lambda: any((tmp_path / "b").glob("*/checkpoint.msgpack")),
                                    signal.SIGTERM, tmp_path)
    (run,) = (tmp_path / "b").iterdir()
    assert code == 143 and took < 3, (took, err)
    assert "saved at step 0; continue with: python cvl.py --resume" in err or "interrupted at step 0" in err, err
    assert cvl.load_checkpoint(run)["step"] == 0 and not list(run.glob("*.tmp*"))

    # 200 x 1,000 HalfCheetah steps at step 100, once the row of step 50 is written (plus 1.5 s)
    evaluating = small_args(dataset, tmp_path / "c", eval_episodes=200, eval_every=100, steps=100)
    code, err, took = stop_cli_when(evaluating, lambda: any(len(p.read_text().splitlines()) > 1 for p in
                                                            (tmp_path / "c").glob("*/metrics.csv"))
                                    and time.sleep(1.5) is None, signal.SIGTERM, tmp_path)
    (run,) = (tmp_path / "c").iterdir()
    # (on a loaded machine the stop can land while step 50's checkpoint is still being written: it then waits for
    # the write and says so in the other words)
    assert code == 143 and took < 3 and ("interrupted at step 50; checkpoint saved" in err
                                         or "is saved at step 50; continue with" in err), (took, err)
    assert cvl.load_checkpoint(run)["step"] == 50 and [r["step"] for r in read_rows(run)] == ["50"]

    code, err, took = stop_cli_when(["--evaluate", finished_run, "--eval-episodes", "100"], after(4), signal.SIGINT,
                                    tmp_path)
    assert code == 130 and took < 3 and "stopped by SIGINT; nothing was written" in err, (took, err)
    assert err.strip().count("\n") == 0


def test_a_full_disk_keeps_the_last_good_checkpoint_and_says_how_to_continue(tmp_path, dataset, monkeypatch, capsys):
    cfg = small_config(dataset, tmp_path, steps=200, eval_every=200, checkpoint_every=100)
    real_fsync, checkpoints = os.fsync, []

    def fsync(fd):  # the disk fills up during the third checkpoint (steps 0, 100, then 200)
        if "checkpoint" in os.readlink(f"/proc/self/fd/{fd}"):
            checkpoints.append(fd)
            if len(checkpoints) == 3:
                raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(cvl.os, "fsync", fsync)
    with pytest.raises(cvl.WriteError) as err:
        cvl.train(cfg)
    (run,) = tmp_path.iterdir()
    assert str(err.value) == (f"cannot write the checkpoint {run}/checkpoint.msgpack (No space left on device); the "
                              f"last good checkpoint (step 100) in {run} is kept: free space, then continue with: "
                              f"python cvl.py --resume {run}")
    assert cvl.load_checkpoint(run)["step"] == 100 and not list(run.glob("*.tmp*"))
    monkeypatch.undo()

    import matplotlib.figure

    def full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)  # and again while plotting at the very end
    final = cvl.train(cvl.resume_config(str(run)))
    err = capsys.readouterr()
    assert final["step"] == 200 and "cvl: done at step 200" in err.out
    assert "cvl: warning: cannot write the learning curve" in err.err and "the run is complete" in err.err
    assert [int(r["step"]) for r in read_rows(run)] == [50, 100, 150, 200]
    assert cvl.load_checkpoint(run)["step"] == 200 and not (run / "learning_curve.png").exists()


def test_metrics_log_appends_in_constant_time_and_rewrites_only_for_a_new_column(tmp_path, monkeypatch):
    rewrites, real = [], cvl.MetricsLog._rewrite
    monkeypatch.setattr(cvl.MetricsLog, "_rewrite", lambda self: (rewrites.append(len(self.rows)), real(self))[1])
    rows = [{"step": 0, "loss": 1.0}]
    log = cvl.MetricsLog(tmp_path / "metrics.csv", rows)
    for step in range(1, 41):
        row = {"step": step, "loss": 1 / step, **({"score": step} if step % 10 == 0 else {})}
        rows.append(row)
        log.append(row)
    assert rewrites == [1, 11]  # opening, then the first row with a score
    back = read_rows(tmp_path)
    assert [(int(r["step"]), float(r["loss"]), r["score"]) for r in back] == [
        (r["step"], r["loss"], str(r.get("score", ""))) for r in rows]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, dataset):
    for args in (small_args(dataset, tmp_path / "out", devices=-1), ["--evaluate", tmp_path, "--eval-episodes", "0"],
                 ["--steps", "many"], ["--no-such-flag"]):  # argparse's own errors too: one line, not a usage block
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("cvl: error: "), \
            proc.stderr
    assert not (tmp_path / "out").exists()


def pendulum_rollouts(episodes: int = 6, length: int = 50) -> dict[str, np.ndarray]:
    """Real Pendulum-v1 rollouts, actions uniform in its bounds [-2, 2]."""
    import gymnasium as gym

    env, rng = gym.make("Pendulum-v1"), np.random.default_rng(0)
    out = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")}
    for ep in range(episodes):
        obs, _ = env.reset(seed=ep)
        for t in range(length):
            action = rng.uniform(-2, 2, 1).astype(np.float32)
            next_obs, reward, terminated, _, _ = env.step(action)
            for k, v in zip(out, (obs, action, reward, terminated, t == length - 1, next_obs)):
                out[k].append(v)
            obs = next_obs
    env.close()
    return {k: np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32) for k, v in out.items()}


def test_other_action_bounds_are_mapped_to_the_policys_range_and_back(tmp_path):
    """Pendulum's [-2, 2]: the data's actions become a / 2 for training; the evaluated policy acts in [-2, 2];
    CVL and TD3+BC both train and evaluate on it; an action outside [-2, 2] is still refused."""
    raw = pendulum_rollouts()
    path = write_hdf5(tmp_path / "pendulum.hdf5", raw)
    cfg = small_config(path, tmp_path / "out", eval_env="Pendulum-v1", steps=20, eval_every=20, updates_per_call=10)
    data, _, _, _ = cvl.load_env_data(cfg)
    np.testing.assert_allclose(data.actions, raw["actions"] / 2, rtol=1e-6)
    assert np.abs(raw["actions"]).max() > 1.5
    policy = cvl.env_policy(lambda params, s: jnp.tanh(params * s[..., :1]), "Pendulum-v1")
    np.testing.assert_allclose(policy(100.0, jnp.array([[1.0, 0, 0], [-1.0, 0, 0], [0.0, 0, 0]])), [[2], [-2], [0]],
                               atol=1e-5)
    assert cvl.env_policy(policy, ENV_ID) is policy  # [-1, 1]: unchanged
    final = cvl.train(cfg)
    assert np.isfinite(final["return_mean"]) and final["return_mean"] < 0  # Pendulum's rewards are <= 0
    td3_bc = import_bench("td3_bc")
    assert np.isfinite(td3_bc.main(["--dataset", str(path), "--eval-env", "Pendulum-v1", "--steps", "20",
                                    "--eval-every", "20", "--updates-per-call", "10", "--eval-episodes", "1",
                                    "--hidden", "8", "--out", str(tmp_path / "td3"), "--no-progress"])["return_mean"])
    raw["actions"][5] = 2.5
    fails_in_one_line(small_args(write_hdf5(tmp_path / "pendulum_bad.hdf5", raw), tmp_path / "bad",
                                 eval_env="Pendulum-v1"), "key 'actions' row 5 is outside the env's bounds [-2, 2]")


def test_modes_that_exclude_each_other_and_odd_dataset_paths_fail_in_one_line(tmp_path, dataset, finished_run):
    fails_in_one_line(["--resume", finished_run, "--evaluate", finished_run, "--steps", "300"],
                      "--resume and --evaluate exclude each other")
    fails_in_one_line(["--inspect", "--resume", finished_run], "--resume and --inspect exclude each other")
    fifo = tmp_path / "data.hdf5"
    os.mkfifo(fifo)
    fails_in_one_line(small_args(fifo, tmp_path / "out"), "is not a regular file (a pipe, socket or device)")
    (tmp_path / "a.hdf5").symlink_to(tmp_path / "b.hdf5")
    (tmp_path / "b.hdf5").symlink_to(tmp_path / "a.hdf5")
    fails_in_one_line(small_args(tmp_path / "a.hdf5", tmp_path / "out"), "is a symbolic link loop")
    fails_in_one_line(small_args(dataset, tmp_path / "out", eval_env="HalfCheetah-v3"),
                      "HalfCheetah-v4 is the same model on the maintained mujoco: --eval-env HalfCheetah-v4")
    assert not (tmp_path / "out").exists()


def test_runs_that_cannot_fit_are_refused_before_anything_is_written(tmp_path, dataset, monkeypatch):
    """Against a device and host of 8 GB each; each message names the flag to lower."""
    monkeypatch.setattr(cvl, "device_memory", lambda: (8e9, "a test device"))
    monkeypatch.setattr(cvl, "host_memory", lambda: 8e9)
    for flags, expected in [(dict(batch_size=50000), "past int32 indexing; use at most 46340"),
                            (dict(batch_size=20000), "more than the 8.0 GB of a test device; lower --batch-size"),
                            (dict(num_seeds=30000), "more than the 8.0 GB of a test device; lower --num-seeds (about"),
                            (dict(hidden="20000 20000"), "lower --hidden"),
                            (dict(eval_episodes=1000000), "= 1,000,000 envs at once, about 1,500 GB, more than half "
                                                          "of this host's 8 GB; lower --eval-episodes")]:
        fails_in_one_line(small_args(dataset, tmp_path / "out", **flags), expected)
    assert not (tmp_path / "out").exists()
    td3_bc = import_bench("td3_bc")
    with pytest.raises(cvl.CVLError, match="lower --num-seeds"):
        td3_bc.main(["--dataset", str(dataset), "--eval-env", ENV_ID, "--num-seeds", "100000", "--out",
                     str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    cvl.check_fits(cvl.make_config("paper"), 1_000_000, 17, 6)  # the paper's setting fits in 8 GB


def test_resume_refuses_data_that_changed_naming_both(tmp_path, raw_small):
    path = write_hdf5(tmp_path / "halfcheetah_mine.hdf5", raw_small)
    run = cvl.train(small_config(path, tmp_path / "out", steps=50, eval_every=50))["run_dir"]
    before = (Path(run) / "metrics.csv").read_text()
    write_hdf5(path, {k: v[:500] for k, v in raw_small.items()})  # same path, 500 of its 720 rows
    msg = fails_in_one_line(["--resume", run, "--steps", "100"], "the data changed since run")
    assert "it trained on 720 rows, hash" in msg and "now holds 500 rows, hash" in msg
    assert (Path(run) / "metrics.csv").read_text() == before
    write_hdf5(path, raw_small)  # the same data again: it resumes
    assert cvl.main(["--resume", run, "--steps", "100"])["step"] == 100


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "0"], "--steps must be positive"), (["--eval-every", "0"], "--eval-every must be positive"),
    (["--hidden", "0"], "--hidden needs one or more positive widths"), (["--policy-freq", "0"], "--policy-freq must"),
    (["--discount", "nan"], "--discount must be in (0, 1), got nan"), (["--resume", "/nonexistent"], "no checkpoint"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_td3_bc_bad_input_is_one_line_and_leaves_nothing(tmp_path, dataset, flags, expected):
    td3_bc = import_bench("td3_bc")
    with pytest.raises(cvl.CVLError, match=re.escape(expected)):
        td3_bc.main(["--dataset", str(dataset), "--eval-env", ENV_ID, "--out", str(tmp_path / "out"), *flags])
    assert not (tmp_path / "out").exists()


def test_td3_bc_refuses_a_cvl_run_and_contradicting_flags(tmp_path, dataset, finished_run):
    td3_bc = import_bench("td3_bc")
    with pytest.raises(cvl.CVLError, match="is a CVL run, not a TD3\\+BC one; resume or evaluate it with python cvl.py"):
        td3_bc.main(["--resume", str(finished_run)])
    run = td3_bc.main(["--dataset", str(dataset), "--eval-env", ENV_ID, "--steps", "20", "--eval-every", "20",
                       "--updates-per-call", "10", "--eval-episodes", "1", "--hidden", "8", "--batch-size", "16",
                       "--out", str(tmp_path), "--no-progress"])["run_dir"]
    with pytest.raises(cvl.CVLError, match="--lr 5.0 contradicts the run being resumed"):
        td3_bc.main(["--resume", run, "--lr", "5"])
    with pytest.raises(cvl.CVLError, match="is a TD3\\+BC run, not a CVL one; resume or evaluate it with python "
                                           "bench/td3_bc.py"):
        cvl.main(["--resume", run])


def test_actor_std_is_bounded_in_log_space():
    cfg = cvl.make_config("cpu", hidden=(16,), actor_min_std=0.01, actor_max_std=2.0)
    nets = cvl.make_networks(cfg, 3)
    actor = nets.actor.init(jax.random.key(0), jnp.zeros((1, 4)))
    s = jnp.asarray(np.random.default_rng(0).normal(size=(512, 4)), jnp.float32)
    for scale in (1e3, -1e3):  # pre-activations far beyond either end
        big = jax.tree.map(lambda x, scale=scale: x * scale, actor)
        _, std = cvl.actor_dist(nets, big, s, cfg)
        assert float(std.min()) >= 0.01 - 1e-7 and float(std.max()) <= 2.0 + 1e-6
        assert float(std.min()) < 0.02 or float(std.max()) > 1.9  # the bound is what holds it


# ------------------------------------------------------------------------- what the losses and update compute
def test_binary_nce_learns_the_density_ratio_divided_by_b_minus_1():
    """A toy with a known density ratio: 4 one-hot states, each goal drawn from a known p(g | s). Binary NCE with
    B - 1 negatives per positive has its optimum at sigmoid(f) = p(g|s) / (p(g|s) + (B - 1) p(g)), i.e.
    exp(f) = p(g|s) / ((B - 1) p(g)); cvl's loss value is the mean over the B x B entries of the sigmoid
    cross-entropy, checked against a plain loop first."""
    k, b = 4, 16
    p_g_s = np.array([[.7, .1, .1, .1], [.1, .7, .1, .1], [.25, .25, .25, .25], [.05, .05, .1, .8]])
    ratio = p_g_s / p_g_s.mean(axis=0)  # p(s) uniform
    cfg = cvl.make_config("cpu", hidden=(), repr_dim=k, batch_size=b, lr=3e-3)
    nets = cvl.make_networks(cfg, 1)
    state = cvl.init_state(jax.random.key(0), cfg, nets, k, 1)
    eye = jnp.eye(k)

    def batch(key):
        ks, kg = jax.random.split(key)
        s = jax.random.randint(ks, (b,), 0, k)
        g = jax.random.categorical(kg, jnp.log(jnp.asarray(p_g_s))[s])
        z = jnp.zeros(b, bool)
        return cvl.Batch(eye[s], jnp.zeros((b, 1)), eye[g], z, jnp.zeros(b), eye[s], z, z, jnp.zeros(b))

    loss_fn = partial(cvl.critic_loss_nce, state=state, key=None, cfg=cfg, nets=nets, shard=lambda x, *_: x)
    x = batch(jax.random.key(1))
    f = np.asarray(cvl.critic_logits(nets, state.critic, x.observations, x.actions, x.goals, x.absorbing)[0])
    plain = np.mean([[math.log1p(math.exp(-f[i, j])) if i == j else math.log1p(math.exp(f[i, j])) for j in range(b)]
                     for i in range(b)])
    assert float(loss_fn(state.critic, batch=x)[0]) == pytest.approx(plain, rel=1e-5)

    opt = cvl.make_optimizer(cfg)

    @jax.jit
    def train(critic, opt_state, key):
        def step(carry, key):
            critic, opt_state = carry
            grads = jax.grad(lambda c: loss_fn(c, batch=batch(key))[0])(critic)
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(critic, updates), opt_state), None
        return jax.lax.scan(step, (critic, opt_state), jax.random.split(key, 6000))[0]

    critic, _ = train(state.critic, opt.init(state.critic), jax.random.key(2))
    f = np.asarray(cvl.critic_logits(nets, critic, eye, jnp.zeros((k, 1)), eye, jnp.zeros(k, bool))[0])
    np.testing.assert_allclose(np.exp(f) * (b - 1), ratio, rtol=0.2)


def action_toy_q_error(sampler: str) -> float:
    """A toy with a known answer for --action-negatives: 2 one-hot states, behaviour a = tanh(u), u ~ N(-+0.5, 0.5),
    goal 1 (reward 1) with p(g=1 | s, a) = sigmoid(4a + s - 0.5), else goal 0 (reward 0). Q = E[r(g) | s, a] is
    read out as cvl's normalised estimator does, sum_g p(g) exp(f) r(g) / sum_g p(g) exp(f) over the exact
    marginal; returns its largest error on a grid of actions in the behaviour's range after training cvl's critic
    loss (goal NCE + action contrast with 8 actions from the sampler, and the behaviour model beside them)."""
    b, steps = 64, 3000
    cfg = cvl.make_config("cpu", hidden=(32, 32), repr_dim=4, batch_size=b, lr=3e-3, action_negatives=8,
                          action_sampler=sampler, critic_loss="nce")  # the goals are given: no bootstrapping
    nets = cvl.make_networks(cfg, 1)
    state = cvl.init_state(jax.random.key(0), cfg, nets, 2, 1)
    eye, means = jnp.eye(2), jnp.array([-0.5, 0.5])

    def p1(s, a):
        return jax.nn.sigmoid(4 * a + s - 0.5)

    def batch(key, n=b):
        ks, ka, kg = jax.random.split(key, 3)
        s = jax.random.randint(ks, (n,), 0, 2)
        a = jnp.tanh(means[s] + 0.5 * jax.random.normal(ka, (n,)))
        g = (jax.random.uniform(kg, (n,)) < p1(s, a)).astype(jnp.int32)
        z = jnp.zeros(n, bool)
        return cvl.Batch(eye[s], a[:, None], eye[g], z, g.astype(jnp.float32), eye[s], z, z, jnp.zeros(n)), s, a

    loss_fn = partial(cvl.critic_loss, state=state, cfg=cfg, nets=nets, shard=lambda x, *_: x)
    opt = cvl.make_optimizer(cfg)

    @jax.jit
    def train(critic, opt_state, key):
        def step(carry, key):
            critic, opt_state = carry
            grads = jax.grad(lambda c: loss_fn(c, batch=batch(key)[0], key=jax.random.fold_in(key, 1))[0])(critic)
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(critic, updates), opt_state), None
        return jax.lax.scan(step, (critic, opt_state), jax.random.split(key, steps))[0]

    critic, _ = train(state.critic, opt.init(state.critic), jax.random.key(2))
    _, s, a = batch(jax.random.key(9), 100_000)
    p_g1 = float(p1(s, a).mean())
    s_grid, a_grid = jnp.repeat(jnp.arange(2), 9), jnp.tile(jnp.linspace(-0.8, 0.8, 9), 2)
    f = np.asarray(cvl.critic_logits(nets, critic, eye[s_grid], a_grid[:, None], eye, jnp.zeros(2, bool))[0])
    w = np.array([1 - p_g1, p_g1]) * np.exp(f)
    return float(np.abs(w[:, 1] / w.sum(1) - np.asarray(p1(s_grid, a_grid))).max())


def test_contrasting_behaviour_actions_keeps_q_and_uniform_actions_bias_it():
    """With a' from the behaviour model, the action loss's optimum agrees with the goal loss's, so Q is read out
    right; with a' uniform, f also has to learn log pi_beta(a|s), which the critic's low-rank f cannot keep apart
    from log p(g|s,a): Q is several times further off (0.05-0.09 vs 0.17-0.30 over 3 seeds when this was written)."""
    behaviour, uniform = action_toy_q_error("bc"), action_toy_q_error("uniform")
    assert behaviour < 0.1
    assert uniform > 1.5 * behaviour


def test_layer_norm_normalises_every_hidden_layer_of_phi_and_psi():
    """--layer-norm: each hidden layer is relu(LayerNorm(W x + b)), against numpy; the actor has none."""
    cfg = cvl.make_config("cpu", hidden=(8, 8), repr_dim=3, layer_norm=True)
    nets = cvl.make_networks(cfg, 2)
    params = nets.phi.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
    x0 = np.random.default_rng(0).normal(size=(4, 5))
    x = x0
    for i in range(2):
        h = x @ np.asarray(params[f"Dense_{i}"]["kernel"]) + np.asarray(params[f"Dense_{i}"]["bias"])
        h = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + 1e-6)
        x = np.maximum(h * np.asarray(params[f"LayerNorm_{i}"]["scale"]) + np.asarray(params[f"LayerNorm_{i}"]["bias"]),
                       0)
    x = x @ np.asarray(params["Dense_2"]["kernel"]) + np.asarray(params["Dense_2"]["bias"])
    np.testing.assert_allclose(nets.phi.apply({"params": params}, jnp.asarray(x0, jnp.float32)), x, rtol=1e-4,
                               atol=1e-5)
    assert "LayerNorm_0" in nets.psi.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
    assert "LayerNorm_0" not in nets.actor.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]


def test_normalize_states_feeds_every_network_the_standardised_state(raw_small):
    """--normalize-states: phi, psi, the actor and the behaviour model see (s - mean) / (std + 1e-3) of the data's
    states (numpy), i.e. exactly what the same parameters give on states standardised beforehand; the absorbing
    goal and the actions are untouched."""
    cfg = cvl.make_config("cpu", hidden=(16,), repr_dim=4, normalize_states=True, critics=2, action_negatives=2)
    nets = cvl.make_networks(cfg, 6)
    obs = raw_small["observations"]
    norm = cvl.state_normalizer(obs)
    mean, std = obs.astype(np.float64).mean(0), obs.astype(np.float64).std(0) + 1e-3
    np.testing.assert_allclose(norm["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm["std"], std, rtol=1e-5)
    state = cvl.init_state(jax.random.key(0), cfg, nets, 17, 6, norm)
    # the same parameters without the statistics
    plain = state.replace(critic={k: v for k, v in state.critic.items() if k != "obs"},
                          actor={k: v for k, v in state.actor.items() if k != "obs"})
    plain.critic["behavior"] = {k: v for k, v in state.critic["behavior"].items() if k != "obs"}
    s, a, g = obs[:32], raw_small["actions"][:32], raw_small["next_observations"][:32]
    z, zg = ((s - mean) / std).astype(np.float32), ((g - mean) / std).astype(np.float32)
    absorbing = np.arange(32) % 5 == 0
    member = jax.tree.map(lambda x: x[1], state.critic)  # one critic of the ensemble
    plain_member = jax.tree.map(lambda x: x[1], plain.critic)
    close = partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
    close(cvl.sa_features(nets, member, s, a), cvl.sa_features(nets, plain_member, z, a))
    close(cvl.goal_features(nets, state.critic, g, absorbing), cvl.goal_features(nets, plain.critic, zg, absorbing))
    close(cvl.eval_action(nets, state.actor, s), cvl.eval_action(nets, plain.actor, z))
    behavior = member["behavior"], plain_member["behavior"]
    close(cvl.actor_dist(nets, behavior[0], s, cfg)[0], cvl.actor_dist(nets, behavior[1], z, cfg)[0])
    # and it matters: unstandardised states give other features
    raw_phi = cvl.sa_features(nets, plain_member, s, a)
    assert np.abs(np.asarray(raw_phi - cvl.sa_features(nets, member, s, a))).max() > 1e-2
    # off: no statistics in the parameters, states go in as they are
    off = cvl.init_state(jax.random.key(0), cvl.make_config("cpu", hidden=(16,), repr_dim=4, normalize_states=False),
                         nets, 17, 6, norm)
    assert "obs" not in off.critic and "obs" not in off.actor


def test_the_state_statistics_are_never_trained_and_travel_with_the_checkpoint(tmp_path, dataset, raw_small):
    """Training moves every parameter but the statistics; --evaluate reads them from the checkpoint and plays the
    same episodes as the run's last evaluation."""
    final = cvl.train(small_config(dataset, tmp_path, steps=100, normalize_states=True, actor_objective="ddpg"))
    saved = flax.serialization.msgpack_restore((Path(final["run_dir"]) / "checkpoint.msgpack").read_bytes())["state"]
    norm = cvl.state_normalizer(raw_small["observations"])
    for params in (saved["critic"], saved["critic_target"], saved["actor"]):  # [0]: the seed axis
        np.testing.assert_allclose(params["obs"]["mean"][0], norm["mean"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(params["obs"]["std"][0], norm["std"], rtol=1e-6)
    trained_on = cvl.state_normalizer(np.asarray(cvl.load_env_data(small_config(dataset, tmp_path))[0].observations))
    for params in (saved["critic"], saved["actor"]):  # Adam's step on a zero gradient is exactly 0 (the Polyak
        for k in ("mean", "std"):                    # average of the target may round them by an ulp)
            np.testing.assert_array_equal(params["obs"][k][0], trained_on[k])
    cfg = small_config(dataset, tmp_path, normalize_states=True)
    start = cvl.init_state(jax.random.key(0), cfg, cvl.make_networks(cfg, 6), 17, 6, norm)
    assert not np.allclose(saved["actor"]["params"]["Dense_0"]["kernel"][0], start.actor["params"]["Dense_0"]["kernel"])
    result = cvl.evaluate_checkpoint(final["run_dir"], episodes=2)
    assert result["score"] == pytest.approx(float(read_rows(final["run_dir"])[-1]["score"]), rel=1e-9)


def test_one_update_uses_the_parameters_from_before_it_and_the_actor_never_moves_the_critic(raw_small):
    """learn_from_batch against an independent composition: the critic's gradient is that of its loss alone, and
    the actor's gradient is taken at the critic from before the step; Adam then applies both."""
    cfg = cvl.make_config("cpu", hidden=(32,), repr_dim=8, batch_size=32, actor_objective="q", bc_coef=0.3,
                          critic_loss="nce")  # the independent composition below writes NCE's loss
    nets = cvl.make_networks(cfg, 6)
    state = cvl.init_state(jax.random.key(0), cfg, nets, 17, 6)
    learn = jax.jit(partial(cvl.learn_from_batch, cfg=cfg, nets=nets, shard=lambda x, *_: x))
    state, _ = learn(state, cvl.sample_batch(cvl.make_data(raw_small), jax.random.key(3), 32, 0.99, "arrival"),
                     jax.random.key(4))  # one step first, so Adam's moments are not zero
    batch = cvl.sample_batch(cvl.make_data(raw_small), jax.random.key(1), 32, 0.99, "arrival")
    key = jax.random.key(2)
    new, _ = learn(state, batch, key)

    def critic_loss(c):
        logits, _ = cvl.critic_logits(nets, c, batch.observations, batch.actions, batch.goals, batch.absorbing)
        return optax.sigmoid_binary_cross_entropy(logits, jnp.eye(32)).mean()

    def actor_loss(p):
        psi = cvl.goal_features(nets, state.critic, batch.goals, batch.absorbing)
        return cvl.actor_loss_q(p, state.critic, psi, nets, batch, key, 0.0, cfg)[0]

    opt = cvl.make_optimizer(cfg)
    adam_step = jax.jit(lambda params, grads, opt_state: optax.apply_updates(params, opt.update(grads, opt_state)[0]))
    for params, loss, opt_state, got in ((state.critic, critic_loss, state.critic_opt, new.critic),
                                         (state.actor, actor_loss, state.actor_opt, new.actor)):
        want = adam_step(params, jax.jit(jax.grad(loss))(params), opt_state)
        for w, have in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
            np.testing.assert_allclose(have, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["nce", "td"])
def test_twin_critics_learn_independently_and_q_is_their_minimum(raw_small, loss):
    cfg = cvl.make_config("cpu", hidden=(32,), repr_dim=8, batch_size=32, critics=2, critic_loss=loss)
    nets = cvl.make_networks(cfg, 6)
    state = cvl.init_state(jax.random.key(0), cfg, nets, 17, 6)
    state = state.replace(critic_target=jax.tree.map(lambda x: 1.1 * x, state.critic))  # targets differ from critics
    batch = cvl.sample_batch(cvl.make_data(raw_small), jax.random.key(1), 32, 0.99, "arrival")
    key, shard = jax.random.key(2), (lambda x, *_: x)
    member = [jax.tree.map(lambda x, i=i: x[i], state.critic) for i in range(2)]
    target = [jax.tree.map(lambda x, i=i: x[i], state.critic_target) for i in range(2)]
    single = dataclasses.replace(cfg, critics=1)
    # Q: the minimum of the two critics' own estimates, each read out against its own goal features
    args = (batch.observations, batch.actions)
    q = cvl.q_estimate(nets, state.critic, *args, cvl.goal_features(nets, state.critic, batch.goals, batch.absorbing),
                       batch.goal_rewards, cfg)
    each = [np.asarray(cvl.q_estimate(nets, m, *args, cvl.goal_features(nets, m, batch.goals, batch.absorbing),
                                      batch.goal_rewards, single)) for m in member]
    assert not np.allclose(each[0], each[1])
    np.testing.assert_allclose(q, np.minimum(*each), rtol=1e-6)
    # the target of contrastive TD: the minimum of the target twins' logits
    a_next = batch.actions[::-1]
    twin = cvl.target_logits(nets, state.critic_target, batch.next_observations, a_next, batch.goals, batch.absorbing)
    each_target = [np.asarray(cvl.target_logits(nets, t, batch.next_observations, a_next, batch.goals,
                                                batch.absorbing)) for t in target]
    assert not np.allclose(*each_target)
    np.testing.assert_allclose(twin, np.minimum(*each_target), rtol=1e-6)
    # the ensemble's gradient for critic i is that of critic i's loss alone (contrastive TD: against the twins' min)
    grads = jax.jit(jax.grad(lambda c: cvl.critic_loss(c, state, batch, key, cfg, nets, shard)[0]))(state.critic)
    for i in range(2):
        own = jax.jit(jax.grad(lambda c, i=i: cvl.CRITIC_LOSSES[loss](
            c, state, batch, key, single, nets, shard)[0]))(member[i])
        for g, want in zip(jax.tree.leaves(jax.tree.map(lambda x, i=i: x[i], grads)), jax.tree.leaves(own)):
            np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-7)


def test_bc_coef_1_is_exactly_behaviour_cloning(raw_small):
    cfg = cvl.make_config("cpu", hidden=(32,), repr_dim=8, batch_size=32, actor_objective="q", bc_coef=1.0)
    nets = cvl.make_networks(cfg, 6)
    a, b = (cvl.init_state(jax.random.key(i), cfg, nets, 17, 6) for i in (0, 1))  # two different critics
    batch = cvl.sample_batch(cvl.make_data(raw_small), jax.random.key(1), 32, 0.99, "arrival")
    grads = [jax.grad(lambda p, st=st: cvl.actor_loss_q(p, st.critic, cvl.goal_features(
        nets, st.critic, batch.goals, batch.absorbing), nets, batch, jax.random.key(2), 0.0, cfg)[0])(a.actor)
        for st in (a, b)]
    bc = jax.grad(lambda p: cvl.bc_nll(*cvl.actor_dist(nets, p, batch.observations, cfg), batch.actions).mean())
    for g1, g2, want in zip(*(jax.tree.leaves(g) for g in (*grads, bc(a.actor)))):
        np.testing.assert_array_equal(g1, g2)
        np.testing.assert_allclose(g1, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("stds, rises", [((1e-4, 1e-3), True), ((0.5, 0.6), False)])
def test_auto_alpha_rises_while_entropy_is_below_target_and_falls_above(raw_small, stds, rises):
    cfg = cvl.make_config("cpu", hidden=(32,), repr_dim=8, batch_size=32, auto_alpha=True, actor_min_std=stds[0],
                          actor_max_std=stds[1], actor_objective="q")
    nets = cvl.make_networks(cfg, 6)
    state = cvl.init_state(jax.random.key(0), cfg, nets, 17, 6)
    data = cvl.make_data(raw_small)
    learn = jax.jit(partial(cvl.learn_from_batch, cfg=cfg, nets=nets, shard=lambda x, *_: x))
    for i in range(5):
        state, metrics = learn(state, cvl.sample_batch(data, jax.random.key(i), 32, 0.99, "arrival"),
                               jax.random.key(100 + i))
        assert (float(metrics["entropy"]) < -6) == rises  # target entropy -|A| = -6
    assert (float(metrics["alpha"]) > 1.0) == rises  # alpha starts at exp(0) = 1


def test_alpha_above_zero_keeps_the_policy_wider():
    """With the Q term alone (bc_coef 0) against the frozen critic, --alpha 1 keeps more entropy than 0."""
    batch, psi, phi = frozen_critic_problem(128, data_actions=False)
    entropy = {}
    for alpha in (0.0, 1.0):
        cfg, nets, actor = train_against_frozen_critic(batch, psi, phi, hidden=(32,), actor_objective="q",
                                                       bc_coef=0.0, alpha=alpha)
        entropy[alpha] = float(cvl.actor_loss_q(actor, FROZEN_CRITIC, psi, nets, batch, jax.random.key(0), alpha,
                                                cfg)[1]["entropy"])
    assert entropy[1.0] > entropy[0.0] + 1.0, entropy


def test_flags_parse_to_their_field_types_and_presets_yield_to_them():
    values = {int: 7, float: 0.125, str: None, bool: False}
    for f in dataclasses.fields(cvl.Config):
        default = getattr(cvl.Config(), f.name)
        if f.name == "hidden":
            assert cvl.parse_args(["--hidden", "8", "4"]) == {"hidden": (8, 4)}
        elif isinstance(default, bool):
            assert cvl.parse_args([f"--no-{f.name.replace('_', '-')}"]) == {f.name: False}
        elif f.metadata.get("choices"):
            choice = f.metadata["choices"][-1]
            assert cvl.parse_args(["--" + f.name.replace("_", "-"), choice]) == {f.name: choice}
        else:
            value = values[type(default)] if type(default) is not str else "x"
            parsed = cvl.parse_args(["--" + f.name.replace("_", "-"), str(value)])
            assert parsed == {f.name: value} and type(parsed[f.name]) is type(default), f.name
    given = cvl.parse_args(["--preset", "cpu", "--batch-size", "128"])
    cfg = cvl.make_config(given.pop("preset"), **given)
    assert (cfg.batch_size, cfg.hidden, cfg.steps) == (128, cvl.PRESETS["cpu"]["hidden"], cvl.PRESETS["cpu"]["steps"])


# ------------------------------------------------------------------------------------------------ bench tools
def test_critic_diagnostic_scores_a_run_against_monte_carlo_returns(tmp_path, dataset, raw_small, capsys):
    sys.path.insert(0, str(HERE / "bench"))
    import diagnose_critic

    rng = np.random.default_rng(0)
    rewards, ends = rng.normal(size=50), np.array([9] * 10 + [29] * 20 + [49] * 20)
    expected = [sum(0.9 ** (j - t) * rewards[j] for j in range(t, ends[t] + 1)) for t in range(50)]
    np.testing.assert_allclose(diagnose_critic.mc_returns(rewards, ends, 0.9), expected, rtol=1e-10)

    final = cvl.train(small_config(dataset, tmp_path, steps=100, num_seeds=2, eval_every=100, actor_objective="q"))
    results = diagnose_critic.main([final["run_dir"], "--rows", "128", "--min-horizon", "20", "--simulate", "16",
                                    "--horizon", "20"])
    out = capsys.readouterr().out
    assert [r["seed"] for r in results] == [0, 1] and out.count("corr(Q, MC return)") == 6  # 3 estimators
    assert out.count("AWR advantage td") == 4 and out.count("corr(A, A')") == 2 * len(cvl.ADVANTAGES)
    ckpt = cvl.load_checkpoint(Path(final["run_dir"]))
    cfg = ckpt["config"]
    data, _, obs_dim, act_dim = cvl.load_env_data(cfg)
    nets = cvl.make_networks(cfg, act_dim)
    state = cvl.restore_state(cvl.init_states(cfg, nets, [0, 1], obs_dim, act_dim), ckpt["state"])
    assert out.count("*normalized") == 2  # the estimator the run trained with is marked
    # the paper's actor's |grad (1 - bc) Q| / |grad bc BC|: the two norms do not depend on bc, so the reported ratio
    # times bc / (1 - bc) is the same at any other bc_coef
    critic0, actor0 = (jax.tree.map(lambda x: x[0], t) for t in (state.critic, state.actor))
    at_half = diagnose_critic.actor_gradient_ratio(nets, critic0, actor0, data, dataclasses.replace(cfg, bc_coef=0.5),
                                                   jax.random.key(0))
    assert results[0]["grad_ratio"] > 0
    assert results[0]["grad_ratio"] * cfg.bc_coef / (1 - cfg.bc_coef) == pytest.approx(at_half, rel=1e-4)
    ends = cvl.split_episodes(raw_small)
    for r in results:
        assert r["z_mean"] > 0 and r["grad_ratio"] == pytest.approx(diagnose_critic.actor_gradient_ratio(
            nets, jax.tree.map(lambda x: x[r["seed"]], state.critic), jax.tree.map(lambda x: x[r["seed"]], state.actor),
            data, cfg, jax.random.key(0)), rel=1e-4)
        # each scored row's Monte-Carlo return, by a plain loop over its own episode
        want = [sum(0.99 ** (j - t) * raw_small["rewards"][j] for j in range(t, ends[t] + 1)) for t in r["rows"]]
        np.testing.assert_allclose(r["mc_return"], want, rtol=1e-6)
        for name in cvl.Q_ESTIMATORS:
            q, q_random = r[name]["q"], r[name]["q_random"]
            assert len(q) == 128 and not np.array_equal(q, q_random)
            assert r[name]["corr"][0] == pytest.approx(np.corrcoef(q, want)[0, 1], abs=1e-6)
            assert r[name]["beats_random"] == np.mean(q > q_random)
        sim, q = r["simulated"], r["normalized"]
        assert sim["rows"] == 16 and sim["agree"] == np.mean((q["q"][:16] > q["q_random"][:16]) ==
                                                             (sim["g_data"] > sim["g_random"]))
        # the near action, the data's plus N(0, 0.1^2): its Q as training computes it, and the agreement
        a_data = np.asarray(data.actions)[r["rows"][:16]]
        assert 0 < np.abs(sim["a_near"] - a_data).mean() < 0.2 and sim["g_near"].shape == (16,)
        near_batch = cvl.batch_at(data, jax.random.key(0), jnp.asarray(r["rows"][:cfg.batch_size]), cfg.gamma,
                                  cfg.goal_reward)
        critic_i = jax.tree.map(lambda x: x[r["seed"]], state.critic)
        a_near = np.asarray(near_batch.actions).copy()
        a_near[:16] = sim["a_near"]
        q_near = cvl.q_estimate(nets, critic_i, near_batch.observations, jnp.asarray(a_near),
                                cvl.goal_features(nets, critic_i, near_batch.goals, near_batch.absorbing),
                                near_batch.goal_rewards, cfg)
        np.testing.assert_allclose(sim["q_near"], np.asarray(q_near)[:16], rtol=1e-5, atol=1e-7)
        assert sim["near_agree"] == np.mean((q["q"][:16] > sim["q_near"]) == (sim["g_data"] > sim["g_near"]))
        # each AWR advantage of the simulated rows, as training computes it on the run's own batch of those rows
        i = r["seed"]
        critic, actor = (jax.tree.map(lambda x: x[i], tree) for tree in (state.critic, state.actor))
        batch = cvl.batch_at(data, jax.random.key(0), jnp.asarray(r["rows"][:cfg.batch_size]), cfg.gamma,
                             cfg.goal_reward)
        psi = cvl.goal_features(nets, critic, batch.goals, batch.absorbing)
        for name in cvl.ADVANTAGES:
            adv, _ = cvl.awr_advantage(nets, critic, actor, psi, batch, jax.random.key(0),
                                       dataclasses.replace(cfg, awr_advantage=name))
            np.testing.assert_allclose(sim[f"advantage_{name}"], np.asarray(adv)[:16], rtol=1e-5, atol=1e-7)
            # and again with independent goals (the next seed's draw) and policy samples: the retest
            again = cvl.batch_at(data, jax.random.key(1), jnp.asarray(r["rows"][:cfg.batch_size]), cfg.gamma,
                                 cfg.goal_reward)
            adv_again, _ = cvl.awr_advantage(nets, critic, actor, cvl.goal_features(nets, critic, again.goals,
                                                                                    again.absorbing),
                                             again, jax.random.key(1), dataclasses.replace(cfg, awr_advantage=name))
            retest = r[f"retest_{name}"]
            np.testing.assert_allclose(retest["a"][:cfg.batch_size], np.asarray(adv), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(retest["a_again"][:cfg.batch_size], np.asarray(adv_again), rtol=1e-5,
                                       atol=1e-7)
            assert not np.allclose(retest["a"], retest["a_again"])
            assert retest["corr"][0] == pytest.approx(np.corrcoef(retest["a"], retest["a_again"])[0, 1], abs=1e-6)
            assert sim[f"advantage_{name}_corr"][0] == pytest.approx(
                np.corrcoef(sim[f"advantage_{name}"], sim["g_data"] - sim["g_policy"])[0, 1], abs=1e-6)
        # the action sensitivity: dQ/da by central differences, row by row (a row's Q depends on its own action only)
        full = cvl.batch_at(data, jax.random.key(0), jnp.asarray(r["rows"]), cfg.gamma, cfg.goal_reward)
        fd = []
        for k in range(0, 128, cfg.batch_size):
            sl = slice(k, k + cfg.batch_size)
            psi_k = cvl.goal_features(nets, critic, full.goals[sl], full.absorbing[sl])
            q_at = lambda x: np.asarray(cvl.q_estimate(nets, critic, full.observations[sl], x, psi_k,  # noqa: E731
                                                       full.goal_rewards[sl], cfg), np.float64)
            fd.append(central_difference(q_at, full.actions[sl]))
        fd = np.concatenate(fd)
        rms = np.sqrt(np.mean(fd ** 2))
        # the step along the critic's gradient: length 0.1 (before clipping) in fd's direction; and its returns
        up = sim["a_up"] - a_data
        inside = (np.abs(sim["a_up"]) < 1).all(axis=1)
        np.testing.assert_allclose(np.linalg.norm(up[inside], axis=1), 0.1, rtol=1e-3)
        cos = (up * fd[:16]).sum(1) / (np.linalg.norm(up, axis=1) * np.linalg.norm(fd[:16], axis=1))
        assert (cos[inside] > 0.99).all()
        assert sim["up_better"] == np.mean(sim["g_up"] > sim["g_data"])
        assert sim["up_gain"] == pytest.approx(np.mean(sim["g_up"] - sim["g_data"]))
        # the policy's own action (cvl.eval_action, deterministic) moved 0.1 along dQ/da taken at that action
        a_pi = np.asarray(cvl.eval_action(nets, actor, full.observations[:16]))
        np.testing.assert_allclose(sim["a_policy"], a_pi, rtol=1e-5, atol=1e-6)
        psi_0 = cvl.goal_features(nets, critic, full.goals[:cfg.batch_size], full.absorbing[:cfg.batch_size])
        a_at = np.asarray(cvl.eval_action(nets, actor, full.observations[:cfg.batch_size]))
        q_pi = lambda x: np.asarray(cvl.q_estimate(nets, critic, full.observations[:cfg.batch_size], x,  # noqa: E731
                                                   psi_0, full.goal_rewards[:cfg.batch_size], cfg), np.float64)
        fd_pi = central_difference(q_pi, a_at)[:16]
        up_pi = sim["a_pi_up"] - a_pi
        inside = (np.abs(sim["a_pi_up"]) < 1).all(axis=1)
        assert inside.sum() >= 8
        np.testing.assert_allclose(np.linalg.norm(up_pi[inside], axis=1), 0.1, rtol=1e-3)
        cos = (up_pi * fd_pi).sum(1) / (np.linalg.norm(up_pi, axis=1) * np.linalg.norm(fd_pi, axis=1))
        assert (cos[inside] > 0.99).all()
        assert sim["pi_up_better"] == np.mean(sim["g_pi_up"] > sim["g_policy"])
        assert sim["pi_up_gain"] == pytest.approx(np.mean(sim["g_pi_up"] - sim["g_policy"]))
        sens, q_own = r["sensitivity"], r["normalized"]["q"]
        assert sens["grad_rms"] == pytest.approx(rms, rel=0.05)
        assert sens["per_mean_abs_q"] == pytest.approx(sens["grad_rms"] / np.abs(q_own).mean(), rel=1e-6)
        assert sens["per_std_q"] == pytest.approx(sens["grad_rms"] / np.std(q_own), rel=1e-6)
        a_rows = np.asarray(full.actions)
        fd_out = (fd * a_rows).sum(1) / (np.linalg.norm(fd, axis=1) * np.linalg.norm(a_rows, axis=1))
        assert sens["outward"] == pytest.approx(fd_out.mean(), abs=0.02)  # the cosine with the data's action
        # G(a_policy): the seed's own policy from the restored state, by a plain loop
        import gymnasium as gym
        with cvl.quiet_env_creation():
            env = gym.make(ENV_ID)
        for row, g_pi in zip(r["rows"][:2], sim["g_policy"][:2]):
            env.reset(seed=0)
            assert diagnose_critic.restore(env, data.observations[row])
            obs, g = np.asarray(data.observations[row], np.float64), 0.0
            for t in range(20):
                action = np.asarray(cvl.eval_action(nets, actor, jnp.asarray(obs[None], jnp.float32)))[0]
                obs, reward, terminated, _, _ = env.unwrapped.step(action.astype(np.float64))
                g += cfg.gamma ** t * reward
                if terminated:
                    break
            assert g_pi == pytest.approx(g, rel=2e-3)  # the batched policy differs from this one in the last bits
        env.close()
        # the normalised estimate is a weighted mean of the goals' rewards
        assert raw_small["rewards"].min() <= r["normalized"]["q"].min() <= r["normalized"]["q"].max() <= \
            raw_small["rewards"].max()
    with pytest.raises(SystemExit, match="lower --rows or --min-horizon"):
        diagnose_critic.main([final["run_dir"], "--rows", "128", "--min-horizon", "500"])

    # --readout-batch 128: every row's Q is read out over the other 127 rows' goals in one softmax (numpy, by hand)
    wide = diagnose_critic.main([final["run_dir"], "--rows", "128", "--min-horizon", "20", "--simulate", "0",
                                 "--seeds", "1", "--readout-batch", "128"])[0]
    np.testing.assert_array_equal(wide["rows"], results[0]["rows"])  # the same rows as in batches of 64
    critic0 = jax.tree.map(lambda x: x[0], state.critic)
    batch = cvl.batch_at(data, jax.random.key(0), jnp.asarray(wide["rows"]), cfg.gamma, cfg.goal_reward)
    phi = np.asarray(cvl.sa_features(nets, critic0, data.observations[wide["rows"]], data.actions[wide["rows"]]))
    psi = np.asarray(cvl.goal_features(nets, critic0, batch.goals, batch.absorbing))
    f = (phi @ psi.T).astype(np.float64)
    np.fill_diagonal(f, -np.inf)
    p = np.exp(f - f.max(axis=1, keepdims=True))
    want_q = (p / p.sum(axis=1, keepdims=True)) @ np.asarray(batch.goal_rewards, np.float64)
    np.testing.assert_allclose(wide["normalized"]["q"], want_q, rtol=1e-4, atol=1e-5)
    assert not np.allclose(wide["normalized"]["q"], results[0]["normalized"]["q"], rtol=1e-3)  # 63 goals differ


def test_gradient_agreement_is_the_rowwise_cosine_of_two_critics_action_gradients(capsys):
    diagnose_critic = import_bench("diagnose_critic")
    rows = np.arange(4)
    mine = dict(seed=0, rows=rows, grad=np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [1.0, 1.0]]))
    theirs = dict(seed=0, rows=rows, grad=np.array([[1.0, 1.0], [0.0, -5.0], [2.0, 0.0], [-1.0, 1.0]]))
    out = diagnose_critic.gradient_agreement(mine, theirs, "other")
    want = [1 / np.sqrt(2), -1.0, 1.0, 0.0]  # by hand: 45 degrees, opposite, the same way, at right angles
    np.testing.assert_allclose(out["cos"], want, atol=1e-12)
    assert out["mean"] == pytest.approx(np.mean(want)) and out["median"] == pytest.approx(np.median(want))
    assert out["positive"] == 0.5 and "mean +0.177" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="same batch size and gamma"):
        diagnose_critic.gradient_agreement(mine, dict(theirs, rows=rows + 1), "other")


def test_closed_loop_selection_picks_the_candidate_the_critic_rates_highest(tmp_path, dataset):
    diagnose_critic = import_bench("diagnose_critic")
    # the candidates: the policy's own action first, then samples of its tanh-Gaussian with the std scaled
    mean, std = jnp.array([[0.3, -2.0], [0.0, 1.0]]), jnp.array([[0.5, 0.1], [1.0, 2.0]])
    key = jax.random.key(3)
    cand = np.asarray(diagnose_critic.candidate_actions(mean, std, key, 4, 0.5))
    eps = np.asarray(jax.random.normal(key, (3, 2, 2)))
    np.testing.assert_allclose(cand[0], np.tanh(mean), rtol=1e-6)
    np.testing.assert_allclose(cand[1:], np.tanh(np.asarray(mean) + 0.5 * np.asarray(std) * eps), rtol=1e-5)
    same = np.asarray(diagnose_critic.candidate_actions(mean, std, key, 4, 0.0))
    np.testing.assert_allclose(same, np.broadcast_to(np.tanh(mean), same.shape), rtol=1e-6)
    # best: per row the argmax of q, by a plain loop; random: one of the same candidates, not always the first
    rng = np.random.default_rng(0)
    cands, q = rng.normal(size=(5, 300, 2)).astype(np.float32), rng.normal(size=(5, 300)).astype(np.float32)
    best = np.asarray(diagnose_critic.pick(jnp.asarray(cands), jnp.asarray(q), "best", key))
    np.testing.assert_array_equal(best, np.stack([cands[int(np.argmax(q[:, i])), i] for i in range(300)]))
    rand = np.asarray(diagnose_critic.pick(jnp.asarray(cands), jnp.asarray(q), "random", key))
    chosen = [[j for j in range(5) if np.array_equal(cands[j, i], rand[i])] for i in range(300)]
    assert all(len(c) == 1 for c in chosen) and len({c[0] for c in chosen}) == 5
    # conservative: against numpy, min_k gain_k - margin std_k gain_k over K heads, gain over the own action (the
    # first candidate), which scores 0; heads that never agree keep the own action everywhere
    qk = rng.normal(size=(3, 5, 300)).astype(np.float32) + np.array([0.0, 0.3, 0.1, 0.2, 0.4])[None, :, None]
    for margin in (0.0, 0.7):
        gain = qk - qk[:, :1]
        score = gain.min(0) - margin * gain.std(0)
        score[0] = 0.0
        want = score.argmax(0)
        got = np.asarray(diagnose_critic.conservative_pick(jnp.asarray(cands), jnp.asarray(qk), margin))
        np.testing.assert_array_equal(got, cands[want, np.arange(300)])
        assert 0 < np.mean(want > 0) < 1  # both cases occur
    opposed = np.stack([q, -q])
    np.testing.assert_array_equal(diagnose_critic.conservative_pick(jnp.asarray(cands), jnp.asarray(opposed), 0.0),
                                  cands[0])
    # a CVL critic's readout over fixed goals, against numpy: softmax_j(phi . psi_j) r_j, the min over twins
    cfg = small_config(dataset, tmp_path, critics=2)
    data, _, obs_dim, act_dim = cvl.load_env_data(cfg)
    nets = cvl.make_networks(cfg, act_dim)
    state = cvl.init_states(cfg, nets, [0, 1], obs_dim, act_dim)
    scorers, score, _ = diagnose_critic.cvl_scorer(nets, cfg, state, data, 32, jax.random.key(0))
    goals = cvl.sample_batch(jax.tree.map(jnp.asarray, data), jax.random.key(0), 32, cfg.gamma, cfg.goal_reward)
    s, a = np.asarray(data.observations[:40]), np.asarray(data.actions[:40])
    r = np.asarray(goals.goal_rewards, np.float64)
    for seed in (0, 1):
        mine = jax.tree.map(lambda x: x[seed], scorers)
        want = []
        for c in range(2):
            critic = jax.tree.map(lambda x: x[seed, c], state.critic)
            phi = np.asarray(nets.phi.apply(critic["phi"], np.concatenate([s, a], 1)), np.float64)
            psi = np.asarray(nets.psi.apply(critic["psi"], np.asarray(goals.goals)), np.float64)
            psi[np.asarray(goals.absorbing)] = np.asarray(critic["absorbing"])
            f = phi @ psi.T
            w = np.exp(f - f.max(1, keepdims=True))
            want.append((w / w.sum(1, keepdims=True)) @ r)
        np.testing.assert_allclose(np.asarray(score(mine, s, a)), np.min(want, axis=0), rtol=1e-4, atol=1e-6)
        # the selecting policy acts with a candidate whose Q is the highest of its state's candidates
        propose = partial(cvl.actor_dist, nets, cfg=cfg)
        policy = diagnose_critic.selecting_policy(propose, score, 6, 1.0, "best")
        actor = jax.tree.map(lambda x: x[seed], state.actor)
        acted = np.asarray(policy((actor, mine), jnp.asarray(s)))
        cand = np.asarray(diagnose_critic.candidate_actions(*propose(actor, jnp.asarray(s)),
                                                            diagnose_critic.obs_key(s), 6, 1.0))
        q_cand = np.stack([np.asarray(score(mine, s, c)) for c in cand])
        q_acted = np.asarray(score(mine, s, acted))
        assert np.isin(acted, cand).all()
        np.testing.assert_allclose(q_acted, q_cand.max(0), rtol=1e-5, atol=1e-7)
        assert (q_cand.max(0) - q_cand.min(0) > 1e-6).all()  # the choice mattered


@pytest.mark.parametrize("stored_next", [True, False])
def test_onestep_head_targets_and_fit(tmp_path, dataset, stored_next):
    """(1 - gamma) r_t + gamma V(s_{t+1}), 0 after a fall, on the rows whose next state is known or that fell; and a
    head fitted to them reproduces them, in their units."""
    diagnose_critic = import_bench("diagnose_critic")
    raw = hand_made_episodes()
    if not stored_next:
        del raw["next_observations"]
    data = cvl.make_data(raw)
    values = np.arange(18, dtype=np.float64) * 0.1 + 5.0
    y, rows = diagnose_critic.onestep_targets(data, values, 0.9)
    assert list(rows) == [t for t in range(18) if stored_next or t != 11]  # the time limit's s_{e+1} is unknown
    for t in rows:
        fell = t in (5, 17)
        assert y[t] == pytest.approx(0.1 * raw["rewards"][t] + 0.9 * (0.0 if fell else values[t]))
    # the fit: a tiny head on the fixture's rollouts, V(s') a known function of the next state
    cfg = small_config(dataset, tmp_path)
    data, _, _, _ = cvl.load_env_data(cfg)
    score, head, mse = diagnose_critic.fit_onestep_head(cfg, data, lambda s: jnp.tanh(s[:, 0]) + s[:, 1] ** 2, 3000,
                                                        jax.random.key(0))
    y, rows = diagnose_critic.onestep_targets(data, np.tanh(np.asarray(data.next_observations)[:, 0])
                                              + np.asarray(data.next_observations)[:, 1] ** 2, cfg.gamma)
    q = np.asarray(score(head, np.asarray(data.observations)[rows], np.asarray(data.actions)[rows]))
    assert mse < 0.2 and np.corrcoef(q, y[rows])[0, 1] > 0.9
    assert abs(q.mean() - y[rows].mean()) < 0.1 * y[rows].std() and q.std() == pytest.approx(y[rows].std(), rel=0.2)


def test_closed_loop_selection_from_the_command_line(tmp_path, dataset, capsys):
    diagnose_critic = import_bench("diagnose_critic")
    final = cvl.train(small_config(dataset, tmp_path, steps=100, num_seeds=2, eval_every=100))
    run = final["run_dir"]
    base = [run, "--rows", "128", "--min-horizon", "20", "--simulate", "0", "--episodes", "1", "--select-goals", "64"]
    results = diagnose_critic.main(base + ["--select", "3"])
    ckpt = cvl.load_checkpoint(Path(run))
    cfg = ckpt["config"]
    data, (env_id, lo, hi), obs_dim, act_dim = cvl.load_env_data(cfg)
    nets = cvl.make_networks(cfg, act_dim)
    state = cvl.restore_state(cvl.init_states(cfg, nets, [0, 1], obs_dim, act_dim), ckpt["state"])
    own = cvl.evaluate(cvl.seeds_policy(partial(cvl.eval_action, nets)), state.actor, env_id, [0, 1], 1)
    np.testing.assert_allclose([r["select"]["policy"] for r in results], cvl.normalized_score(own[:, 0], lo, hi),
                               rtol=1e-6)
    for r in results:
        sel = r["select"]
        assert sel["gain"] == pytest.approx(sel["best"] - sel["random"]) and sel["best"] != sel["random"]
    assert capsys.readouterr().out.count("the critic's best") == 2
    # with no spread every candidate is the policy's own action: whichever is picked, the episode is the policy's
    still = diagnose_critic.main(base + ["--select", "3", "--select-spread", "0", "--seeds", "1"])
    assert len(still) == 1 and still[0]["select"]["best"] == still[0]["select"]["random"] == results[0]["select"][
        "policy"]
    with pytest.raises(SystemExit, match="at least 2 candidates"):
        diagnose_critic.main(base + ["--select", "1"])
    # --select-head: the best by a one-step head fitted to each seed's critic, against the same random picks
    headed = diagnose_critic.main(base + ["--select", "3", "--select-head", "200"])
    for r, before in zip(headed, results):
        sel = r["select"]
        assert sel["random"] == before["select"]["random"] and sel["head_gain"] == pytest.approx(
            sel["head_best"] - sel["random"]) and sel["head_mse"] > 0
    # several heads with a margin no gain can clear: every step keeps the policy's own action
    cautious = diagnose_critic.main(base + ["--select", "3", "--select-head", "200", "--select-heads", "2",
                                            "--select-margin", "1e9"])
    assert [r["select"]["head_best"] for r in cautious] == [r["select"]["policy"] for r in results]
    # --push-steps: a step of 0 is the policy's own action; a step along the slope changes the episode
    pushed = diagnose_critic.main(base + ["--push-steps", "0", "0.5"])
    for r, before in zip(pushed, results):
        assert r["push"]["policy"] == r["push"]["steps"][0.0] == before["select"]["policy"]
        assert r["push"]["steps"][0.5] != r["push"]["policy"]
    # the pushed action is tanh(mean + beta g / c), g = dQ/dmean by central differences, c its rms on data states
    propose = partial(cvl.actor_dist, nets, cfg=cfg)
    scorers, score, _ = diagnose_critic.cvl_scorer(nets, cfg, state, data, 64, jax.random.key(0))
    actor, scorer = jax.tree.map(lambda x: x[0], (state.actor, scorers))
    states = np.asarray(data.observations)
    states = states[np.random.default_rng(0).choice(len(states), min(2048, len(states)), replace=False)]

    def slope(s):
        mean = np.asarray(propose(actor, jnp.asarray(s))[0], np.float64)
        g = np.zeros_like(mean)
        for d in range(mean.shape[1]):
            e = np.zeros_like(mean)
            e[:, d] = 1e-2
            up, down = (np.asarray(score(scorer, s, np.tanh(mean + sign * e).astype(np.float32)), np.float64)
                        for sign in (1, -1))
            g[:, d] = (up - down) / 2e-2
        return mean, g
    c = np.sqrt(np.mean(slope(states)[1] ** 2))
    assert pushed[0]["push"]["scale"] == pytest.approx(c, rel=0.05)
    s = states[:64]
    mean, g = slope(s)
    acted = np.asarray(diagnose_critic.pushing_policy(propose, score, 0.5)((actor, scorer, jnp.float32(c)),
                                                                           jnp.asarray(s)), np.float64)
    moved = (np.arctanh(np.clip(acted, -1 + 1e-6, 1 - 1e-6)) - mean) * c / 0.5
    np.testing.assert_allclose(moved, g, atol=0.05 * np.abs(g).max())


def test_simulated_returns_restore_dataset_states_and_replay_their_rewards(raw_small):
    """From a dataset row's restored state, the data's action gives the logged reward, and a policy that answers
    each observation with the data's next action gives r_t + gamma r_{t+1} + gamma^2 r_{t+2}."""
    diagnose_critic = import_bench("diagnose_critic")
    obs, act, rew = (raw_small[k].astype(np.float64) for k in ("observations", "actions", "rewards"))
    rows = np.array([3, 40, 77])  # rows with two more steps in their episode

    def replay(o):  # the action the data took at the row whose observation this is
        return act[np.abs(obs[None] - np.asarray(o)[:, None]).sum(-1).argmin(axis=1)]

    one = diagnose_critic.simulated_returns(ENV_ID, obs[rows], act[rows], replay, 0.9, horizon=1)
    np.testing.assert_allclose(one, rew[rows], rtol=1e-4, atol=1e-4)
    three = diagnose_critic.simulated_returns(ENV_ID, obs[rows], act[rows], replay, 0.9, horizon=3)
    np.testing.assert_allclose(three, rew[rows] + 0.9 * rew[rows + 1] + 0.81 * rew[rows + 2], rtol=1e-3, atol=1e-3)
    twice = diagnose_critic.simulated_returns(ENV_ID, obs[rows], np.concatenate([act[rows], -act[rows]]), replay,
                                              0.9, horizon=1)  # a second action per state: rows i and i + n
    np.testing.assert_allclose(twice[:3], rew[rows], rtol=1e-4, atol=1e-4)
    assert not np.allclose(twice[3:], rew[rows], atol=1e-2)


def test_results_rows_are_valid_configs_and_their_labels_name_their_flags():
    """Each cvl.py row of the results tables parses into a config that passes check_config (a flag a later default
    made idle would be an error there), and its label names every flag it passes, so a table's row says its command;
    the default row passes none, and the rows that pin --critic-loss nce differ from the default in that field."""
    results = import_bench("results")
    folders = [folder for _, folder, *_ in results.METHODS]
    assert len(set(folders)) == len(folders)
    for name, folder, script, flags, _ in results.METHODS:
        if script != results.CVL:
            continue
        cvl.check_config(cvl.make_config("cpu", **cvl.parse_args(flags)))
        i = 0
        while i < len(flags):
            takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            said = " ".join(flags[i:i + 1 + takes_value])
            assert said in name, f"row {folder}: label does not say {said!r}"
            i += 1 + takes_value
    rows = {folder: flags for _, folder, _, flags, _ in results.METHODS}
    assert rows["cvl"] == []
    assert cvl.make_config("cpu", **cvl.parse_args(rows["cvl-nce"])).critic_loss != cvl.Config().critic_loss


def test_results_stops_in_one_line_when_a_run_is_stopped_and_resumes_it_next_time(tmp_path, monkeypatch):
    results = import_bench("results")
    calls = []
    monkeypatch.setattr(results, "run_to_end", lambda cmd: calls.append(cmd) or 143)
    args = SimpleNamespace(steps=300, quiet=True)
    with pytest.raises(SystemExit, match=r"cvl stopped with exit code 143; .* the same command resumes it"):
        results.run_method(tmp_path / "cvl", results.CVL, ["--awr-beta", "1.0"], 3, "hopper-medium-local", args)
    assert "--num-seeds" in calls[0] and calls[0][-3:] == ["--awr-beta", "1.0", "--no-progress"]
    run = tmp_path / "cvl" / "hopper-medium-local__s0__x"  # what the stopped run left: a checkpoint at step 100
    run.mkdir(parents=True)
    (run / "checkpoint.msgpack").write_bytes(b"x")
    (run / "metrics.csv").write_text("step,score\n100,1.0\n")
    with pytest.raises(SystemExit):
        results.run_method(tmp_path / "cvl", results.CVL, [], 3, "hopper-medium-local", args)
    assert calls[1][2:6] == ["--resume", str(run), "--steps", "300"]


SAVING_CHILD = """
import pathlib, signal, sys, time
def stop(signum, _):
    pathlib.Path(sys.argv[1]).write_text(str(signum))  # what a run does: save its last step, then exit 128 + signum
    sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[1] + ".ready").write_text("")
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_results_passes_a_stop_on_to_the_run_and_waits_for_it_to_save(tmp_path, sig):
    """A SIGINT or SIGTERM sent to results.py alone reaches the training process, which saves and exits; results.py
    gets its exit code (and then prints its one line), where it used to kill the run unsaved."""
    results = import_bench("results")
    saved = tmp_path / "saved"

    def stop_when_ready():
        deadline = time.time() + 30
        while not Path(str(saved) + ".ready").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), sig)

    before = signal.getsignal(sig)
    threading.Thread(target=stop_when_ready, daemon=True).start()
    code = results.run_to_end([sys.executable, "-c", SAVING_CHILD, str(saved)])
    assert code == 128 + sig and saved.read_text() == str(int(sig))
    assert signal.getsignal(sig) is before  # this process's own handling is back


def test_results_makes_a_derived_dataset_on_first_use(tmp_path, monkeypatch, raw_small):
    """A dataset made by a script (the mixed-quality one) is written before its first run and passed to it; a second
    run uses the file as it is."""
    results = import_bench("results")
    src = write_hdf5(tmp_path / "src.hdf5", raw_small)
    made = tmp_path / "data" / "mixed.hdf5"
    monkeypatch.setitem(results.DATASETS, "mixed", (made, ENV_ID, 0.0))
    monkeypatch.setitem(results.MAKE, "mixed", [str(src), ENV_ID, str(made), "--episodes", "2",
                                                "--random-episodes", "1", "--length", "20"])
    calls = []
    monkeypatch.setattr(results, "run_to_end", lambda cmd: calls.append(cmd) or 0)
    args = SimpleNamespace(steps=300, quiet=True)
    results.run_method(tmp_path / "a", results.CVL, [], 1, "mixed", args)
    assert len(cvl.read_dataset_file(made)["rewards"]) == 2 * 60 + 20
    assert calls[0][calls[0].index("--dataset") + 1] == str(made)
    stamp = made.stat().st_mtime_ns
    results.run_method(tmp_path / "b", results.CVL, [], 1, "mixed", args)
    assert made.stat().st_mtime_ns == stamp and len(calls) == 2


def test_results_table_summarises_a_run_by_a_plain_computation(tmp_path):
    """summarise: final, best and 2nd-half mean from the evaluation rows; train minutes = sum of each call's updates
    over its updates/s (pauses and evaluations excluded); the table and plot are written with those numbers."""
    results = import_bench("results")
    run = tmp_path / "hopper-medium-local__s0__x"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"num_seeds": 3}))
    evals = {200: (10.0, 1.0), 400: (30.0, 2.0), 600: (20.0, 3.0), 800: (25.0, 0.5)}  # step: (score, score_std)
    lines = ["step,wall_time,updates_per_sec,score,score_std"]
    for step in range(100, 900, 100):
        score, std = evals.get(step, ("", ""))
        lines.append(f"{step},{step * 6.0},{5.0 if step <= 400 else 2.0},{score},{std}")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    r = results.summarise(run)
    assert r["steps"] == 800 and r["seeds"] == 3 and r["final"] == (25.0, 0.5) and r["best"] == (30.0, 2.0)
    assert r["late"] == pytest.approx((20.0 + 25.0) / 2)  # the evaluations after half of the run's 800 steps
    assert r["train_minutes"] == pytest.approx((4 * 100 / 5.0 + 4 * 100 / 2.0) / 60)
    assert r["minutes"] == pytest.approx(800 * 6.0 / 60)
    out = tmp_path / "table.md"
    results.report({"CVL": r}, "hopper-medium-local", out, note="Trained on a GPU, then finished on a CPU.")
    row = next(line for line in out.read_text().splitlines() if line.startswith("| CVL |"))
    assert row == "| CVL | 800 | 3 | 25.0 +- 0.5 | 30.0 +- 2.0 | 22.5 | 5 | 80 |"
    assert "\nTrained on a GPU, then finished on a CPU.\n" in out.read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_results_curves_csv_round_trips_into_a_later_table_as_a_reference(tmp_path, monkeypatch, capsys):
    """report writes each run's seed-mean curve beside its table; --reference draws a committed curve beside new runs
    (summarised from the CSV alone, minutes blank, its runs' own rows winning), and a bad file is one error line."""
    results = import_bench("results")
    curve = ([10_000, 20_000, 30_000, 40_000], [40.0, 50.0, 45.0, 47.0], [1.0, 2.0, 3.0, 0.5])
    r = dict(**results.curve_summary(*curve), steps=40_000, seeds=3, minutes=10.0, train_minutes=8.0)
    main = tmp_path / "main" / "hopper-medium-local.md"
    main.parent.mkdir()
    results.report({"TD3+BC": r, "BC": {**r, "seeds": 1}}, "hopper-medium-local", main)
    ref = main.with_suffix(".csv")
    back = results.read_curves(ref)
    assert list(back) == ["TD3+BC", "BC"] and back["BC"]["seeds"] == 1 and back["TD3+BC"]["steps"] == 40_000
    for got, want in zip(back["TD3+BC"]["curve"], curve):
        np.testing.assert_allclose(got, want)
    assert back["TD3+BC"]["final"] == (47.0, 0.5) and back["TD3+BC"]["best"] == (50.0, 2.0)
    assert back["TD3+BC"]["late"] == pytest.approx((45.0 + 47.0) / 2)

    runs = tmp_path / "runs"  # a later session: a new row ran, and a BC run exists here too (it wins over the CSV)
    monkeypatch.setattr(results, "METHODS", [("BC", "bc", results.CVL, [], 1), ("new", "new", results.CVL, [], 3),
                                             ("young", "young", results.CVL, [], 3)])
    for folder, score in (("bc", 60.0), ("new", 55.0), ("young", "")):  # young: training, no evaluation yet
        run = runs / "hopper-medium-local" / folder / "hopper-medium-local__s0__x"
        run.mkdir(parents=True)
        (run / "checkpoint.msgpack").write_bytes(b"x")
        (run / "config.json").write_text(json.dumps({"num_seeds": 3}))
        (run / "metrics.csv").write_text(f"step,wall_time,updates_per_sec,score,score_std\n1000,60,10,{score},"
                                         f"{1 if score else ''}\n")
    screen = tmp_path / "screen"
    monkeypatch.setattr(sys, "argv", ["results.py", "--report-only", "--datasets", "hopper-medium-local", "--runs",
                                      str(runs), "--tables", str(screen), "--reference", str(ref)])
    results.main()
    table = (screen / "hopper-medium-local.md").read_text()
    assert "| TD3+BC (committed curve) | 40,000 | 3 | 47.0 +- 0.5 | 50.0 +- 2.0 | 46.0 |  |  |" in table
    assert "| BC | 1,000 | 3 | 60.0 +- 1.0 |" in table and "| BC (committed curve)" not in table
    assert "| young" not in table  # no row until its first evaluation
    assert str(ref) in table
    written = results.read_curves(screen / "hopper-medium-local.csv")
    assert list(written) == ["BC", "new"]  # the reference's curve stays in its own table's CSV

    bad = tmp_path / "hopper-medium-local.csv"
    for text in ("step,score\n1,2\n", "method,seeds,step,score,score_std\nBC,3,1000,high,1\n"):
        bad.write_text(text)
        monkeypatch.setattr(sys, "argv", ["results.py", "--report-only", "--reference", str(bad)])
        with pytest.raises(SystemExit) as stop:
            results.main()
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert stop.value.code == 2 and err.startswith("results.py: error: --reference ") and str(bad) in err
    monkeypatch.setattr(sys, "argv", ["results.py", "--report-only", "--reference", str(tmp_path / "other.csv")])
    with pytest.raises(SystemExit):
        results.main()
    assert "the file's name must be a dataset's" in capsys.readouterr().err


def test_results_keeps_a_tables_earlier_rows_whose_runs_are_not_here(tmp_path, monkeypatch, capsys):
    """Run folders are not committed, so a later session's table keeps its CSV's rows that have no run here (marked,
    dashed, written back to the CSV), a run here replaces its row, --fresh drops the rest, and a CSV that is not a
    curves file stops in one line before anything trains."""
    results = import_bench("results")
    curve = ([10_000, 20_000], [40.0, 50.0], [1.0, 2.0])
    r = dict(**results.curve_summary(*curve), steps=20_000, seeds=3, minutes=10.0, train_minutes=8.0)
    tables = tmp_path / "tables"
    tables.mkdir()
    results.report({"TD3+BC": r, "BC": r}, "hopper-medium-local", tables / "hopper-medium-local.md")
    runs = tmp_path / "runs"
    monkeypatch.setattr(results, "METHODS", [("BC", "bc", results.CVL, [], 3), ("new", "new", results.CVL, [], 3)])
    for folder, score in (("bc", 60.0), ("new", 55.0)):
        run = runs / "hopper-medium-local" / folder / "hopper-medium-local__s0__x"
        run.mkdir(parents=True)
        (run / "checkpoint.msgpack").write_bytes(b"x")
        (run / "config.json").write_text(json.dumps({"num_seeds": 3}))
        (run / "metrics.csv").write_text(f"step,wall_time,updates_per_sec,score,score_std\n1000,60,10,{score},1\n")
    argv = ["results.py", "--report-only", "--datasets", "hopper-medium-local", "--runs", str(runs), "--tables",
            str(tables)]
    for _ in range(2):  # the second rebuild reads the kept row back from the CSV the first one wrote
        monkeypatch.setattr(sys, "argv", argv)
        results.main()
        table = (tables / "hopper-medium-local.md").read_text()
        assert "| TD3+BC (kept curve) | 20,000 | 3 | 50.0 +- 2.0 | 50.0 +- 2.0 | 50.0 |  |  |" in table
        assert "| BC | 1,000 | 3 | 60.0 +- 1.0 |" in table and "| new | 1,000 |" in table and "| BC (kept" not in table
        written = results.read_curves(tables / "hopper-medium-local.csv")
        assert list(written) == ["BC", "new", "TD3+BC"] and written["BC"]["final"] == (60.0, 1.0)
        np.testing.assert_allclose(written["TD3+BC"]["curve"][1], curve[1])
    monkeypatch.setattr(sys, "argv", [*argv, "--fresh"])
    results.main()
    assert list(results.read_curves(tables / "hopper-medium-local.csv")) == ["BC", "new"]

    (tables / "hopper-medium-local.csv").write_text("step,score\n1,2\n")
    monkeypatch.setattr(sys, "argv", argv[:1] + argv[2:])  # would train: it must stop before that
    monkeypatch.setattr(results, "run_method", lambda *a: pytest.fail("trained despite a bad table"))
    with pytest.raises(SystemExit) as stop:
        results.main()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "hopper-medium-local.csv" in err and "--fresh" in err


def test_mixed_dataset_appends_random_episodes_to_the_first_episodes_of_a_file(tmp_path, raw_small, capsys,
                                                                               monkeypatch):
    """bench/mixed_dataset.py: the file's first N episodes unchanged, then M episodes of uniform random actions that
    replay in the simulator (their rewards are the env's), each ending by its time limit; a file without
    next_observations gives a mix without them; a bad dataset is one error line, exit 2."""
    mixed = import_bench("mixed_dataset")
    src = write_hdf5(tmp_path / "src.hdf5", raw_small)  # 12 episodes of 60 steps
    renames, replace = [], os.replace

    def watched_replace(a, b):  # the file appears under its name only whole: written elsewhere, then renamed
        renames.append((Path(a).name, Path(b).exists(), cvl.read_dataset_file(Path(a))["rewards"].size))
        replace(a, b)

    monkeypatch.setattr(cvl.os, "replace", watched_replace)
    out = mixed.main([str(src), ENV_ID, str(tmp_path / "mix.hdf5"), "--episodes", "3", "--random-episodes", "2",
                      "--length", "50", "--seed", "4"])
    assert renames == [(f"mix.tmp{os.getpid()}.hdf5", False, 280)] and not list(tmp_path.glob("*.tmp*"))
    raw = cvl.read_dataset_file(out)
    assert len(raw["rewards"]) == 3 * 60 + 2 * 50 and set(raw) == set(mixed.KEYS)
    for k in mixed.KEYS:
        np.testing.assert_array_equal(raw[k][:180], raw_small[k][:180])
    noise = {k: v[180:] for k, v in raw.items()}
    assert np.flatnonzero(noise["timeouts"]).tolist() == [49, 99] and not noise["terminals"].any()
    assert np.abs(noise["actions"]).max() <= 1 and noise["actions"].std() == pytest.approx(1 / math.sqrt(3), abs=0.05)
    assert len(np.unique(cvl.split_episodes(raw))) == 5
    import gymnasium as gym

    with cvl.quiet_env_creation():
        env = gym.make(ENV_ID)  # the second random episode, replayed
    obs, _ = env.reset(seed=4 * 100_000 + 1)
    np.testing.assert_allclose(obs, noise["observations"][50], atol=1e-6)
    for t in range(50, 100):
        obs, reward, *_ = env.step(noise["actions"][t])
        assert reward == pytest.approx(noise["rewards"][t], abs=1e-5)
        np.testing.assert_allclose(obs, noise["next_observations"][t], atol=1e-5)
    printed = capsys.readouterr().out
    assert "180 transitions of the data" in printed and "+ 100 random" in printed

    no_next = write_hdf5(tmp_path / "no_next.hdf5", {k: v for k, v in raw_small.items() if k != "next_observations"})
    raw = cvl.read_dataset_file(mixed.main([str(no_next), ENV_ID, str(tmp_path / "m2.hdf5"), "--episodes", "2",
                                            "--random-episodes", "1", "--length", "10"]))
    assert "next_observations" not in raw and len(raw["rewards"]) == 130
    with pytest.raises(SystemExit) as stop:
        mixed.main([str(tmp_path / "missing.hdf5"), ENV_ID, str(tmp_path / "m3.hdf5")])
    assert stop.value.code == 2 and "does not exist" in capsys.readouterr().err


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
        state, metrics, _ = train(state, tr, 200)
        losses.append(float(np.asarray(metrics["critic_loss"]).mean()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_td3_bc_in_cvls_training_loop_equals_a_plain_loop_of_its_update(tmp_path, dataset):
    """cvl.run_training drives TD3+BC: its logged losses and final parameters are those of a plain Python loop of
    td3_bc.update_step per seed, from the seed's own key on the same normalised data. (When the loop moved into
    cvl.py, a 1,000-step hopper-medium-local run gave bit-identical metrics and scores before and after.)"""
    td3_bc = import_bench("td3_bc")
    final = td3_bc.main(["--dataset", str(dataset), "--eval-env", ENV_ID, "--steps", "60", "--eval-every", "60",
                         "--updates-per-call", "30", "--eval-episodes", "1", "--num-seeds", "2", "--hidden", "16",
                         "--batch-size", "32", "--out", str(tmp_path), "--no-progress"])
    rows = read_rows(final["run_dir"])
    cfg = td3_bc.TD3BCConfig(dataset=str(dataset), hidden=(16,), batch_size=32)
    data, _, obs_dim, act_dim = cvl.load_env_data(cfg)
    tr = jax.device_put(td3_bc.make_transitions(data, *td3_bc.normalizer(np.asarray(data.observations))))
    nets = td3_bc.Nets(actor=cvl.MLP(cfg.hidden, act_dim), critic=cvl.MLP(cfg.hidden, 1))
    step = jax.jit(partial(td3_bc.update_step, cfg=cfg, nets=nets))
    saved = cvl.load_checkpoint(Path(final["run_dir"]), td3_bc.TD3BCConfig, "TD3+BC")["state"]
    for seed in (0, 1):
        state, losses = td3_bc.init_state(jax.random.key(seed), cfg, nets, obs_dim, act_dim), []
        for _ in range(60):
            state, metrics = step(state, tr)
            losses.append(float(metrics["critic_loss"]))
        for row, chunk in zip(rows, (losses[:30], losses[30:])):
            assert float(row[f"critic_loss_s{seed}"]) == pytest.approx(np.mean(chunk), rel=1e-4)
        for got, want in zip(jax.tree.leaves(saved["actor"]), jax.tree.leaves(state.actor)):
            np.testing.assert_allclose(got[seed], want, rtol=1e-4, atol=1e-6)


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
    # diagnose_critic scores its first critic on the data's vs random actions, states normalised as in training
    diagnose_critic = import_bench("diagnose_critic")
    results = diagnose_critic.main([str(run), "--rows", "128", "--min-horizon", "20", "--simulate", "8",
                                    "--horizon", "10"])
    data, _, obs_dim, act_dim = cvl.load_env_data(td3_bc.TD3BCConfig(dataset=str(dataset)))
    norm = np.load(run / "normalizer.npz")
    nets = td3_bc.Nets(actor=cvl.MLP((32, 32), act_dim), critic=cvl.MLP((32, 32), 1))
    payload = flax.serialization.msgpack_restore((run / "checkpoint.msgpack").read_bytes())
    assert [r["seed"] for r in results] == [0, 1]
    first = diagnose_critic.main([str(run), "--rows", "128", "--min-horizon", "20", "--simulate", "0", "--seeds", "1"])
    assert [r["seed"] for r in first] == [0] and first[0]["beats_random"] == results[0]["beats_random"]
    # --against: the same rows diagnosed for a second run, each seed's dQ/da compared with the other's
    paired = diagnose_critic.main([str(run), "--rows", "128", "--min-horizon", "20", "--simulate", "0",
                                   "--against", str(run)])
    for r in paired:
        np.testing.assert_allclose(r["against"]["cos"], 1.0, atol=1e-5)  # a critic points where it points
        np.testing.assert_allclose(r["grad"], results[r["seed"]]["grad"], rtol=1e-6)
    for i, r in enumerate(results):
        critic = jax.tree.map(lambda x: jnp.asarray(x[i]), payload["state"]["critic"])
        s = (np.asarray(data.observations)[r["rows"]] - norm["mean"]) / norm["std"]
        sa = np.concatenate([s, np.asarray(data.actions)[r["rows"]]], 1).astype(np.float32)
        q1 = np.asarray(nets.critic.apply(jax.tree.map(lambda x: x[0], critic), sa))[:, 0]
        np.testing.assert_allclose(r["q"], q1, rtol=1e-4, atol=1e-5)
        assert r["beats_random"] == np.mean(r["q"] > r["q_random"])
        q1_at = lambda x: np.asarray(nets.critic.apply(jax.tree.map(lambda y: y[0], critic),  # noqa: E731
                                                       np.concatenate([s, x], 1).astype(np.float32)))[:, 0]
        a = np.asarray(data.actions)[r["rows"]]
        fd = central_difference(q1_at, a)
        assert r["sensitivity"]["grad_rms"] == pytest.approx(np.sqrt(np.mean(fd ** 2)), rel=0.05)
        assert r["sensitivity"]["per_mean_abs_q"] == pytest.approx(r["sensitivity"]["grad_rms"] / np.abs(q1).mean(),
                                                                   rel=1e-6)
        fd_out = (fd * a).sum(1) / (np.linalg.norm(fd, axis=1) * np.linalg.norm(a, axis=1))
        assert r["sensitivity"]["outward"] == pytest.approx(fd_out.mean(), abs=0.02)
        sim = r["simulated"]
        assert sim["agree"] == np.mean((r["q"][:8][sim["ok"]] > r["q_random"][:8][sim["ok"]]) ==
                                       (sim["g_data"] > sim["g_random"]))
        assert sim["near_agree"] == np.mean((r["q"][:8][sim["ok"]] > sim["q_near"]) == (sim["g_data"] > sim["g_near"]))
        up = sim["a_up"] - a[:8][sim["ok"]]  # 0.1 along TD3+BC's dQ/da, where no bound clips it
        inside = (np.abs(sim["a_up"]) < 1).all(axis=1)
        cos = (up * fd[:8][sim["ok"]]).sum(1) / (np.linalg.norm(up, axis=1) * np.linalg.norm(fd[:8][sim["ok"]], axis=1))
        assert (cos[inside] > 0.99).all() and sim["up_better"] == np.mean(sim["g_up"] > sim["g_data"])
        # and from the policy's own action, along TD3+BC's dQ/da taken there
        actor = jax.tree.map(lambda x: jnp.asarray(x[i]), payload["state"]["actor"])
        a_pi = np.asarray(td3_bc.policy(nets, actor, s), np.float64)  # every row: q1_at takes them all
        fd_pi = central_difference(q1_at, a_pi)[:8]
        a_pi = a_pi[:8]
        np.testing.assert_allclose(sim["a_policy"], a_pi[sim["ok"]], rtol=1e-5, atol=1e-6)
        up_pi = sim["a_pi_up"] - a_pi[sim["ok"]]
        inside = (np.abs(sim["a_pi_up"]) < 1).all(axis=1)
        cos = (up_pi * fd_pi[sim["ok"]]).sum(1) / (np.linalg.norm(up_pi, axis=1)
                                                   * np.linalg.norm(fd_pi[sim["ok"]], axis=1))
        assert inside.any() and (cos[inside] > 0.99).all()
        assert sim["pi_up_better"] == np.mean(sim["g_pi_up"] > sim["g_policy"])


def test_td3_bc_a_signal_saves_the_last_finished_step_and_resume_equals_an_uninterrupted_run(
        tmp_path, dataset, monkeypatch, capsys):
    """As for cvl.py: SIGTERM during a jitted call abandons it, saves the step before it and exits 128 + 15."""
    td3_bc = import_bench("td3_bc")
    args = ["--dataset", str(dataset), "--eval-env", ENV_ID, "--steps", "200", "--eval-every", "100",
            "--updates-per-call", "50", "--checkpoint-every", "100", "--eval-episodes", "1", "--num-seeds", "2",
            "--hidden", "32", "32", "--batch-size", "64", "--no-progress"]
    straight = Path(td3_bc.main(args + ["--out", str(tmp_path / "straight")])["run_dir"])
    real = td3_bc.make_train_fn

    def make_train_fn(*a):
        fn, calls = real(*a), []

        def call(state, data, n):
            out = fn(state, data, n)
            calls.append(n)
            if len(calls) == 2:  # during 50 -> 100: step 50, never checkpointed on schedule, is saved
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return call

    monkeypatch.setattr(td3_bc, "make_train_fn", make_train_fn)
    with pytest.raises(cvl.Stopped) as stopped:
        td3_bc.main(args + ["--out", str(tmp_path / "cut")])
    assert stopped.value.code == 128 + signal.SIGTERM
    (run,) = (tmp_path / "cut").iterdir()
    saved = flax.serialization.msgpack_restore((run / "checkpoint.msgpack").read_bytes())
    assert int(saved["step"]) == 50 and [int(r["step"]) for r in read_rows(run)] == [50]
    assert f"interrupted at step 50; checkpoint saved. Continue with: python bench/td3_bc.py --resume {run}" in \
        capsys.readouterr().err
    monkeypatch.undo()
    td3_bc.main(["--resume", str(run), "--no-progress"])
    assert without_timing(read_rows(run)) == without_timing(read_rows(straight))
