"""Speed of CVL's train step against this machine's limit and against the naive way of writing it.

    python bench/bench_update.py                      # the table for this machine (a few minutes on 2 CPU cores)
    python bench/bench_update.py --dataset PATH       # on a real dataset (default: ../shared/d4rl/...-local.hdf5)

Columns, all from this one run:
- updates/s of the full jitted train step (batch and goal sampling, critic and actor updates) per (hidden, batch),
  with --updates-per-call 1 and with N updates per call (lax.scan);
- GFLOP per update from XLA's own cost analysis of the compiled one-update step;
- this machine's peak dense float32 matmul throughput (a large jitted jnp.dot, best of several);
- the fraction of that peak the train step reaches;
- the same for the other policy steps (--actor-objective awr, q, ddpg, awr-ddpg; the paper's is q) and the other
  critic loss (--critic-loss nce, the paper's) at the first size, so all can be compared in one run;
- TD3+BC's updates/s (bench/td3_bc.py at its published settings), the reference method, on the same data;
- the seconds of one 10-episode evaluation (cvl.evaluate, the policy compiled once) and its share of a run;
- the naive baseline: the same update maths, but each batch sampled on the host with numpy, copied to the device,
  and one jit call per update; and the speed-up over it.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import cvl  # noqa: E402
import td3_bc  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "d4rl" / "halfcheetah_medium-local.hdf5"


def peak_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n ** 3 / best


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def setup(raw, hidden: int, batch: int, **overrides):
    cfg = cvl.make_config("paper", hidden=(hidden, hidden), batch_size=batch, devices=1, **overrides)
    obs_dim, act_dim = raw["observations"].shape[1], raw["actions"].shape[1]
    nets = cvl.make_networks(cfg, act_dim)
    mesh = cvl.make_mesh(cfg)
    state = cvl.init_states(cfg, nets, [0], obs_dim, act_dim)
    return cfg, nets, mesh, state


def fused_updates_per_sec(cfg, nets, mesh, state, data, n: int, min_seconds: float) -> tuple[float, float]:
    """(updates/s, XLA flops of one update) for jit(scan(update)) with n updates per call."""
    step = cvl.make_train_fn(cfg, nets, mesh)
    flops = step.lower(state, data, 1).compile().cost_analysis()
    flops = flops[0] if isinstance(flops, list) else flops
    for _ in range(2):  # compile and warm up: the state a call returns is placed differently from a fresh one, so
        state, metrics, _ = step(state, data, n)  # the second call compiles once more
    jax.block_until_ready(metrics)
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        state, metrics, _ = step(state, data, n)
        jax.block_until_ready(metrics)
        calls += 1
    return calls * n / (time.perf_counter() - start), float(flops["flops"])


def naive_updates_per_sec(cfg, nets, state, raw, min_seconds: float) -> float:
    """A batch fetched to the host, copied back to the device, and one jit call per update: how such code is often
    written. The batch is cvl.sample_batch's own, so both rows time the same distribution."""
    data = jax.device_put(cvl.make_data(raw))
    sample = jax.jit(cvl.sample_batch, static_argnums=(2, 3, 4))
    keys = iter(jax.random.key(i) for i in range(1 << 30))

    def host_batch():
        return jax.device_get(sample(data, next(keys), cfg.batch_size, cfg.gamma, cfg.goal_reward))

    no_shard = lambda x, *spec: x  # noqa: E731
    update = jax.jit(lambda s, b, k: cvl.learn_from_batch(s, b, k, cfg, nets, no_shard))
    single = jax.tree.map(lambda x: x[0], state)
    key = jax.random.key(1)
    for _ in range(3):  # compile and warm up
        key, sub = jax.random.split(key)
        single, metrics = update(single, jax.device_put(host_batch()), sub)
    jax.block_until_ready(metrics)
    updates, start = 0, time.perf_counter()
    while updates < 10 or time.perf_counter() - start < min_seconds:
        key, sub = jax.random.split(key)
        single, metrics = update(single, jax.device_put(host_batch()), sub)
        float(metrics["critic_loss"])  # the per-step host read such loops do for logging
        updates += 1
    return updates / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATA, help="D4RL-layout file to sample from")
    parser.add_argument("--sizes", nargs="+", default=["256x256", "1024x1024"], help="hidden x batch pairs")
    parser.add_argument("--updates-per-call", type=int, default=100, help="N for the lax.scan rows")
    parser.add_argument("--seconds", type=float, default=10.0, help="minimum timed seconds per row")
    parser.add_argument("--eval-episodes", type=int, default=10, help="episodes of the timed evaluation")
    args = parser.parse_args()

    raw = cvl.read_dataset_file(args.dataset)
    peak = peak_matmul_flops()
    default = cvl.Config()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), jax "
          f"{jax.__version__}; dataset {args.dataset.name}; peak float32 matmul {peak / 1e9:.0f} GFLOP/s; "
          f"CVL rows: the default critic (--critic-loss {default.critic_loss}) and policy step (--actor-objective "
          f"{default.actor_objective}), states "
          f"{'standardised' if default.normalize_states else 'raw'}")
    header = ("| hidden | batch | updates/call | updates/s | GFLOP/update | GFLOP/s | % of matmul peak | "
              "naive updates/s | speed-up |")
    print(header + "\n|" + "---:|" * 9)
    made = cvl.make_data(raw)  # the device-side dataset, replicated onto each row's mesh
    for size in args.sizes:
        hidden, batch = map(int, size.split("x"))
        cfg, nets, mesh, state = setup(raw, hidden, batch)
        data = cvl.replicate(made, mesh)
        naive = naive_updates_per_sec(cfg, nets, state, raw, args.seconds)
        for n in (1, args.updates_per_call):
            ups, flops = fused_updates_per_sec(cfg, nets, mesh, state, data, n, args.seconds)
            if size == args.sizes[0]:
                fused = ups  # the first size's N-per-call speed, for the evaluation's share below
            print(f"| {hidden} | {batch} | {n} | {ups:,.1f} | {flops / 1e9:.3f} | {ups * flops / 1e9:,.1f} | "
                  f"{100 * ups * flops / peak:.0f}% | {naive:,.1f} | {ups / naive:.2f}x |", flush=True)
    hidden, batch = map(int, args.sizes[0].split("x"))
    print()
    variants = [("actor_objective", o) for o in cvl.ACTOR_OBJECTIVES if o != default.actor_objective]
    variants += [("critic_loss", c) for c in cvl.CRITIC_LOSSES if c != default.critic_loss]
    for field, value in variants:  # the other policy steps and critics, each with the rest at its default
        cfg, nets, mesh, state = setup(raw, hidden, batch, **{field: value})
        ups, _ = fused_updates_per_sec(cfg, nets, mesh, state, cvl.replicate(made, mesh), args.updates_per_call,
                                       args.seconds)
        print(f"CVL with {cvl.flag_name(field)} {value} (hidden {hidden}, batch {batch}), one seed, "
              f"{args.updates_per_call} updates/call: {ups:,.1f} updates/s", flush=True)
    ups = td3_bc_updates_per_sec(raw, args.updates_per_call, args.seconds)
    print(f"TD3+BC (bench/td3_bc.py, its published (256, 256), batch 256), one seed, {args.updates_per_call} "
          f"updates/call: {ups:,.1f} updates/s", flush=True)
    env_id = cvl.eval_env_spec(cvl.make_config(dataset=str(args.dataset)))[0]
    first, again = evaluation_seconds(raw, env_id, hidden, args.eval_episodes)
    every = cvl.Config.eval_every
    print(f"Evaluation, {args.eval_episodes} episodes of {env_id}, one seed (hidden {hidden}): {again:.2f} s "
          f"({first:.2f} s the first time, compile included); at the fused rows' {fused:,.0f} updates/s it is "
          f"{100 * again / (again + every / fused):.1f}% of a run that evaluates every {every:,} steps", flush=True)


def evaluation_seconds(raw, env_id: str, hidden: int, episodes: int) -> tuple[float, float]:
    """Seconds of one cvl.evaluate of an untrained CVL policy, first (compiling the policy) and second call. An
    untrained hopper falls at once; halfcheetah always runs its 1,000 steps, as trained policies do."""
    cfg = cvl.make_config("paper", hidden=(hidden, hidden))
    nets = cvl.make_networks(cfg, raw["actions"].shape[1])
    actor = cvl.init_states(cfg, nets, [0], raw["observations"].shape[1], raw["actions"].shape[1]).actor
    policy = cvl.seeds_policy(partial(cvl.eval_action, nets))
    return tuple(timed(lambda: cvl.evaluate(policy, actor, env_id, [0], episodes)) for _ in range(2))


def td3_bc_updates_per_sec(raw, n: int, min_seconds: float) -> float:
    """The reference method's jit(scan(vmap(update))) on the same data, timed like CVL's fused rows."""
    cfg = td3_bc.TD3BCConfig()
    data = cvl.make_data(raw)
    tr = jax.device_put(td3_bc.make_transitions(data, *td3_bc.normalizer(np.asarray(data.observations))))
    act_dim = raw["actions"].shape[1]
    nets = td3_bc.Nets(actor=cvl.MLP(cfg.hidden, act_dim), critic=cvl.MLP(cfg.hidden, 1))
    state = jax.tree.map(lambda x: x[None], td3_bc.init_state(jax.random.key(0), cfg, nets,
                                                               raw["observations"].shape[1], act_dim))
    train = td3_bc.make_train_fn(cfg, nets)
    for _ in range(2):  # compile and warm up (twice: see fused_updates_per_sec)
        state, metrics, _ = train(state, tr, n)
    jax.block_until_ready(metrics)
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < min_seconds:
        state, metrics, _ = train(state, tr, n)
        jax.block_until_ready(metrics)
        calls += 1
    return calls * n / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
