"""A mixed-quality dataset: the first N episodes of a D4RL-layout file plus M episodes of a uniformly random policy in
its env, written in D4RL layout. Behaviour cloning copies the random half too; an offline RL method whose value
function works should filter it out. (The local datasets are all one quality, so this is where a value function
should pay most.)

    python bench/mixed_dataset.py ../shared/d4rl/halfcheetah_medium-local.hdf5 HalfCheetah-v4 /tmp/hc-mixed.hdf5
    python cvl.py --dataset /tmp/hc-mixed.hdf5 --eval-env HalfCheetah-v4 --preset cpu --steps 30000 --num-seeds 3

The random episodes run to the env's own end (a fall) or --length steps (a time limit), seeded by --seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cvl  # noqa: E402

KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")


def first_episodes(raw: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The rows of the first n episodes (as cvl.split_episodes finds them)."""
    last = np.unique(cvl.split_episodes(raw))[:n][-1]
    return {k: v[:last + 1] for k, v in raw.items()}


def random_episodes(env_id: str, episodes: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Episodes of uniformly random actions, each to a fall or `length` steps."""
    import gymnasium as gym

    with cvl.quiet_env_creation():
        env = gym.make(env_id)
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    out = {k: [] for k in KEYS}
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed * 100_000 + ep)
        for t in range(length):
            action = rng.uniform(low, high).astype(np.float32)
            next_obs, reward, terminated, _, _ = env.step(action)
            for k, v in zip(KEYS, (obs, action, reward, terminated, t == length - 1 and not terminated, next_obs)):
                out[k].append(v)
            if terminated:
                break
            obs = next_obs
    env.close()
    return {k: np.asarray(v, dtype=bool if k in ("terminals", "timeouts") else np.float32) for k, v in out.items()}


def mix(data: dict[str, np.ndarray], noise: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The two parts one after the other, with the keys both have (a file without next_observations gives none:
    then each episode's last next state is unknown, as in that file)."""
    return {k: np.concatenate([data[k].astype(noise[k].dtype), noise[k]]) for k in KEYS if k in data}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="a D4RL-layout .hdf5/.npz file")
    parser.add_argument("env", help="its gymnasium env id, e.g. HalfCheetah-v4")
    parser.add_argument("out", type=Path, help="the .hdf5 file to write")
    parser.add_argument("--episodes", type=int, default=300, help="episodes kept from the dataset (its first ones)")
    parser.add_argument("--random-episodes", type=int, default=300, help="episodes of the uniformly random policy")
    parser.add_argument("--length", type=int, default=1000, help="the random episodes' time limit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random episodes")
    args = parser.parse_args(argv)
    if min(args.episodes, args.random_episodes, args.length) <= 0:
        parser.error("--episodes, --random-episodes and --length must be positive")
    try:
        data = first_episodes(cvl.read_dataset_file(args.dataset), args.episodes)
    except cvl.CVLError as e:
        parser.error(str(e))
    noise = random_episodes(args.env, args.random_episodes, args.length, args.seed)
    raw = mix(data, noise)
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for k, v in raw.items():
                f.create_dataset(k, data=v, compression="gzip")

    try:  # whole or not at all, so two makers started together (two bench/results.py runs) never leave half a file
        cvl.write_file(args.out, write, "the mixed dataset")
    except cvl.CVLError as e:
        parser.error(str(e))
    returns = [float(part["rewards"].sum()) / len(np.unique(cvl.split_episodes(part))) for part in (data, noise)]
    print(f"mixed_dataset: {len(data['rewards']):,} transitions of the data (mean return {returns[0]:.0f}) + "
          f"{len(noise['rewards']):,} random (mean return {returns[1]:.0f}) -> {args.out}")
    return args.out


if __name__ == "__main__":
    main()
