"""How good is a trained CVL critic as a Q function? Compare its Q estimate with the dataset's own returns.

    python bench/diagnose_critic.py RUN_DIR [--rows 4096] [--goals 4096]

For rows (s_t, a_t) of the run's dataset it prints, per seed and for two estimators over the same goals g_j
drawn from the whole dataset:
  raw        mean_j exp(f(s, a, g_j)) r(g_j), the density-ratio identity Q = E_{p(g)}[p(g|s,a) / p(g) r(g)] / (1-gamma)
             taken at face value (the marginal form of the original code's exp(f) r);
  normalized sum_j softmax_j(f(s, a, g_j)) r(g_j), the same with exp(f)'s unknown per-(s, a) factor divided out;
  - the Pearson and Spearman correlation of Q(s_t, a_t) with the Monte-Carlo discounted return
    sum_j gamma^j r_{t+j} (rows at least 500 steps from their episode's end, so the truncation is < gamma^500);
  - the correlation of Z(s, a) = mean_j exp(f(s, a, g_j)) with that return: Z should be constant (a density ratio
    averages to 1 over p(g)), so where it is not, it is what the raw estimate measures;
  - how often Q(s, a_data) > Q(s, a_random), a_random uniform in [-1, 1]^|A|;
and, for the run's own --q-estimator, the ratio of the actor's two gradient norms
|grad (1 - bc) Q| / |grad bc * BC NLL| on a training batch: far below 1, the actor is behaviour cloning.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cvl  # noqa: E402


def mc_returns(rewards: np.ndarray, episode_end: np.ndarray, gamma: float) -> np.ndarray:
    """sum_{j >= 0} gamma^j r_{t+j} within each row's episode, by one backward pass."""
    ret = np.zeros(len(rewards), np.float64)
    for t in range(len(rewards) - 1, -1, -1):
        ret[t] = rewards[t] + (gamma * ret[t + 1] if episode_end[t] > t else 0.0)
    return ret


def rank(x):
    r = np.empty(len(x))
    r[np.argsort(x)] = np.arange(len(x))
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory (or its checkpoint.msgpack) written by cvl.py")
    p.add_argument("--rows", type=int, default=4096, help="dataset rows (s, a) to score")
    p.add_argument("--goals", type=int, default=4096, help="marginal goals g_j per Q estimate")
    p.add_argument("--seed", type=int, default=0, help="seed for the rows, goals and random actions")
    p.add_argument("--min-horizon", type=int, default=500, help="score only rows this many steps from their end")
    args = p.parse_args(argv)

    ckpt = cvl.load_checkpoint(Path(args.run))
    cfg = ckpt["config"]
    data, _, obs_dim, act_dim = cvl.load_env_data(cfg)
    nets = cvl.make_networks(cfg, act_dim)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    state = cvl.restore_state(cvl.init_states(cfg, nets, seeds, obs_dim, act_dim), ckpt["state"])

    rng = np.random.default_rng(args.seed)
    end = np.asarray(data.episode_end)
    ret = mc_returns(np.asarray(data.rewards), end, cfg.gamma)
    far = np.flatnonzero(end - np.arange(len(end)) >= args.min_horizon)
    if len(far) < args.rows or len(data.anchors) < args.goals:
        raise SystemExit(f"diagnose_critic: only {len(far)} rows are {args.min_horizon} steps from their episode's "
                         f"end and {len(data.anchors)} have a future; lower --rows, --goals or --min-horizon")
    rows = rng.choice(far, args.rows, replace=False)
    goal_rows = rng.choice(np.asarray(data.anchors), args.goals, replace=False) + 1  # goals are later states
    s, a = data.observations[rows], data.actions[rows]
    g, r_g = data.observations[goal_rows], cvl.goal_reward_at(data, jnp.asarray(goal_rows), cfg.goal_reward)
    a_rand = jnp.asarray(rng.uniform(-1, 1, a.shape), jnp.float32)

    print(f"{args.run}: step {ckpt['step']}, {args.rows} rows, {args.goals} marginal goals, "
          f"MC return mean {ret[rows].mean():.1f} std {ret[rows].std():.1f}")
    results = []
    for i, seed in enumerate(seeds):
        critic = jax.tree.map(lambda x: x[i], state.critic)
        actor = jax.tree.map(lambda x: x[i], state.actor)
        psi = nets.psi.apply(critic["psi"], g)

        def logits(actions):
            return nets.phi.apply(critic["phi"], jnp.concatenate([s, actions], axis=-1)) @ psi.T

        f_data, f_rand = logits(a), logits(a_rand)
        estimators = {"raw": lambda f: np.asarray(jnp.exp(f) @ r_g / len(r_g)),
                      "normalized": lambda f: np.asarray(jax.nn.softmax(f, axis=-1) @ r_g)}
        z = np.asarray(jnp.exp(f_data).mean(axis=1))
        grad_ratio = actor_gradient_ratio(nets, critic, actor, data, cfg, jax.random.key(args.seed))
        print(f"  seed {seed}: Z(s, a) mean {z.mean():.3g} (1/(B-1) = {1 / (cfg.batch_size - 1):.3g}) std "
              f"{z.std():.3g}, corr(Z, MC return) {show(correlations(z, ret[rows]))} | {cfg.q_estimator} actor: "
              f"|grad Q| / |grad BC| {grad_ratio:.3g}")
        result = dict(seed=seed, z_mean=float(z.mean()), z_std=float(z.std()), z_corr=correlations(z, ret[rows]),
                      grad_ratio=grad_ratio)
        for name, q in estimators.items():
            q_data, q_rand = q(f_data), q(f_rand)
            result[name] = dict(corr=correlations(q_data, ret[rows]), beats_random=float(np.mean(q_data > q_rand)),
                                q_mean=float(q_data.mean()))
            print(f"    {name:>10}: corr(Q, MC return) {show(result[name]['corr'])} | "
                  f"Q(a_data) > Q(a_random) {result[name]['beats_random']:.3f} | Q mean {q_data.mean():.3g}")
        results.append(result)
    return results


def correlations(x, y) -> tuple[float, float]:
    """(Pearson, Spearman)."""
    return float(np.corrcoef(x, y)[0, 1]), float(np.corrcoef(rank(x), rank(y))[0, 1])


def show(c: tuple[float, float]) -> str:
    return f"pearson {c[0]:+.3f} spearman {c[1]:+.3f}"


def actor_gradient_ratio(nets, critic, actor, data, cfg, key) -> float:
    """|d/dtheta of (1 - bc) * mean Q| over |d/dtheta of bc * mean BC NLL| on one training batch."""
    k_batch, k_actor = jax.random.split(key)
    batch = cvl.sample_batch(data, k_batch, cfg.batch_size, cfg.gamma, cfg.goal_reward)
    psi = nets.psi.apply(critic["psi"], batch.goals)

    def term(actor_params, which):
        mean, std = cvl.actor_dist(nets, actor_params, batch.observations, cfg.actor_min_std)
        if which == "bc":
            data_u = jnp.arctanh(jnp.clip(batch.actions, -1 + 1e-6, 1 - 1e-6))
            return cfg.bc_coef * -cvl.tanh_gaussian_log_prob(mean, std, data_u).mean()
        u = mean + std * jax.random.normal(k_actor, mean.shape)
        return (1 - cfg.bc_coef) * cvl.q_estimate(nets, critic, batch.observations, jnp.tanh(u), psi,
                                                  batch.goal_rewards, cfg).mean()

    def norm(tree):
        return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))

    return norm(jax.grad(term)(actor, "q")) / max(norm(jax.grad(term)(actor, "bc")), 1e-30)


if __name__ == "__main__":
    main()
