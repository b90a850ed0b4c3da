"""How good is a trained CVL critic as a Q function? Compare its Q estimate with the dataset's own returns.

    python bench/diagnose_critic.py RUN_DIR [--rows 4096]

For rows (s_t, a_t) of the run's dataset it prints, per seed, for every Q estimator of cvl.py (the run's own, the
one its actor was trained with, is marked), each computed exactly as in training: cvl.q_estimate on batches of the
run's --batch-size rows (or --readout-batch rows), each row's goal drawn from its own future by cvl.sample_goals,
the batch's goals being the negatives:
  - the Pearson and Spearman correlation of Q(s_t, a_t) with the Monte-Carlo discounted return
    sum_j gamma^j r_{t+j}, with zeros after a fall (rows of episodes that fell, or at least --min-horizon steps from
    a time limit, so the truncation is < gamma^min_horizon);
  - how often Q(s, a_data) > Q(s, a_random), a_random uniform in [-1, 1]^|A|;
  - Z(s, a) = mean_{j != i} exp(f(s, a, g_j)) and its correlation with that return: a density ratio averages to 1
    over p(g), so where Z varies it is what the raw estimates measure;
  - with --simulate N (default 256), the simulator's answer for the first N rows: each row's state is restored in
    the eval env, the data's action or the random one is taken, then the run's own policy (deterministic) acts for
    --horizon steps; the discounted returns G say which of the two actions is truly better for that policy, and
    the critic is scored on agreeing with them (a critic of the data's behaviour should agree where the policy is
    close to it). States are restored from observations (x position 0, which these envs' dynamics ignore); rows
    whose observation does not round-trip (e.g. a clipped velocity) are skipped. Each AWR advantage of cvl.py
    (--awr-advantage), computed as in training for the data's action, is scored by its correlation with the
    simulator's advantage G(a_data) - G(a_policy), a_policy the policy's own first action: whether it knows which
    data actions beat the policy;
  - each AWR advantage of cvl.py (--awr-advantage) of the data's actions, computed as in training, and again with
    goals drawn independently (and other policy samples for V): corr(A, A'), how much of A is the row's and how
    much the batch's goals (1: none of it is sampling noise);
  - the action sensitivity of the run's own Q at the data's actions: rms dQ/da over mean |Q| (times alpha, the push
    a DDPG+BC step gets off the data) and over the std of Q across the rows (also for a bench/td3_bc.py run), the
    mean cosine of dQ/da with the data's action (does the critic want actions larger or smaller?), and in
    the simulator whether the return rises when the data's action moves --near along dQ/da, and when the policy's
    own action moves --near along dQ/da taken at that action (where the policy step pushes it from);
with --against OTHER_RUN, the cosine between this run's dQ/da and the other run's (CVL or TD3+BC) on the same rows;
with --push-steps BETA..., the critic in closed loop as a test-time push: the policy (of this run or of --candidates)
acts with its mean moved BETA along the critic's dQ/dmean (normalised as the training push normalises it);
with --select N, the critic in closed loop: the score of a policy that acts with the best of N candidate actions
(the policy's own and N - 1 samples of it, of this run or of --candidates) by the critic's Q, against one that picks
a random one of them (the gain is what the critic's ranking of near-policy actions is worth), and with --select-head
the same for a head regressed onto (1 - gamma) r + gamma V(s'), the critic's value of the data's next state (with
--select-heads K --select-margin M, K heads, and a sample only where every head prefers it by M stds of their gains);
and, for --actor-objective q, the ratio of the actor's two gradient norms |grad (1 - bc) Q| / |grad bc * BC NLL| on a
training batch (far below 1: the actor is behaviour cloning), from cvl.actor_loss_q itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cvl  # noqa: E402


def mc_returns(rewards: np.ndarray, episode_end: np.ndarray, gamma: float) -> np.ndarray:
    """sum_{j >= 0} gamma^j r_{t+j} within each row's episode (0 after its end), by one backward pass."""
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
    p.add_argument("run", help="a run directory (or its checkpoint.msgpack) written by cvl.py, or a run directory "
                   "of bench/td3_bc.py (its critic, as the reference)")
    p.add_argument("--rows", type=int, default=4096, help="dataset rows (s, a) to score (a multiple of the batch)")
    p.add_argument("--seed", type=int, default=0, help="seed for the rows, goals and random actions")
    p.add_argument("--simulate", type=int, default=256, help="rows checked in the simulator (0: none)")
    p.add_argument("--horizon", type=int, default=300, help="steps of each simulated return (gamma^300 = 0.05)")
    p.add_argument("--near", type=float, default=0.1, help="std of the noise of the near action, a + N(0, std^2), "
                   "and the length of the step along dQ/da")
    p.add_argument("--readout-batch", type=int, default=0, help="read Q out over batches of this many rows, each "
                   "row's goal a negative of the others (0: the run's --batch-size, as in training): more goals in "
                   "the softmax, the same critic")
    p.add_argument("--seeds", type=int, default=0, help="diagnose only the run's first N seeds (0: all)")
    p.add_argument("--min-horizon", type=int, default=500, help="rows of time-limited episodes: at least this many "
                   "steps from the end")
    p.add_argument("--against", default="", help="a second run (CVL or bench/td3_bc.py) diagnosed on the same rows: "
                   "per seed, the cosine between the two critics' dQ/da at the data's actions (do their policy steps "
                   "point the same way?)")
    p.add_argument("--select", type=int, default=0, help="closed loop: act in --episodes episodes per seed with the "
                   "best of N candidate actions by this critic, and with a random one of them (0: off)")
    p.add_argument("--select-spread", type=float, default=1.0, help="the candidates' std: the policy's times this")
    p.add_argument("--select-goals", type=int, default=1024, help="data goals a CVL critic's Q is read out with")
    p.add_argument("--candidates", default="", help="the cvl.py run whose policy proposes the candidates (default: "
                   "the diagnosed run; needed when that is a bench/td3_bc.py run)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per seed of each --select or --push-steps "
                   "policy")
    p.add_argument("--push-steps", type=float, nargs="+", default=[], metavar="BETA", help="closed loop: the "
                   "policy of --candidates (default: the diagnosed run) acts with its mean moved BETA along this "
                   "critic's dQ/dmean, over its rms on data states, as the training push does (cvl.py's "
                   "--awr-push) but at test time: one score per BETA (Park et al. 2024's test-time policy "
                   "extraction)")
    p.add_argument("--select-head", type=int, default=0, help="with --select on a cvl.py run: also fit, for this "
                   "many steps, a head q(s, a) to (1 - gamma) r + gamma V(s') (V the critic's value of states) per "
                   "seed and pick the candidates by it (0: off; 100000 takes a few minutes per seed on a CPU)")
    p.add_argument("--select-heads", type=int, default=1, help="with --select-head: fit this many heads per seed "
                   "(other inits and batches) and pick conservatively: a sample replaces the policy's own action "
                   "only where every head prefers it by --select-margin stds of their gains")
    p.add_argument("--select-margin", type=float, default=0.0, help="with --select-head: the margin, in stds of the "
                   "heads' gains over the policy's own action, a sample needs to replace it")
    args = p.parse_args(argv)
    if args.select == 1 or args.select < 0:
        raise SystemExit("diagnose_critic: --select needs at least 2 candidates (0: off)")
    if args.select and args.select_head and is_td3bc_run(args.run):
        raise SystemExit("diagnose_critic: --select-head fits a head to a CVL critic's value of states; "
                         f"{args.run} is a bench/td3_bc.py run")
    results = diagnose(args)
    if args.against:
        other = diagnose(argparse.Namespace(**{**vars(args), "run": args.against}))
        for mine, theirs in zip(results, other):
            mine["against"] = gradient_agreement(mine, theirs, args.against)
    loop = closed_loop(args) if args.select or args.push_steps else None  # loaded and played once for both
    if args.select:
        for mine, selected in zip(results, select_in_closed_loop(args, loop)):
            mine["select"] = selected
    if args.push_steps:
        for mine, pushed in zip(results, push_in_closed_loop(args, loop)):
            mine["push"] = pushed
    return results


def diagnose(args) -> list[dict]:
    """Every diagnostic of one run (a cvl.py run, or a bench/td3_bc.py run's critic), one dict per seed."""
    if is_td3bc_run(args.run):  # a bench/td3_bc.py run: the TD critic as the reference
        return diagnose_td3bc(args)

    ckpt, cfg, data, (env_id, _, _), nets, seeds, state = load_cvl_run(args.run)
    seeds = seeds[:args.seeds or None]

    b = args.readout_batch or cfg.batch_size
    rows, ret, rng = pick_rows(data, cfg.gamma, b, args)
    n_rows = len(rows)
    s, a = data.observations[rows], data.actions[rows]
    a_rand, a_near = other_actions(a, rng, args.near)
    batch = cvl.batch_at(data, jax.random.key(args.seed), jnp.asarray(rows), cfg.gamma, cfg.goal_reward)
    goals, absorbing, r_g = batch.goals, batch.absorbing, batch.goal_rewards
    batch_again = cvl.batch_at(data, jax.random.key(args.seed + 1), jnp.asarray(rows), cfg.gamma, cfg.goal_reward)

    print(f"{args.run}: step {ckpt['step']}, {n_rows} rows in batches of {b}, MC return mean {ret.mean():.1f} "
          f"std {ret.std():.1f}; Q estimator used in training: {cfg.q_estimator}")
    results = []
    for i, seed in enumerate(seeds):
        critic = jax.tree.map(lambda x: x[i], state.critic)
        actor = jax.tree.map(lambda x: x[i], state.actor)

        def per_batch(fn):  # fn(batch slice) over the rows, one training-sized batch at a time
            return np.concatenate([np.asarray(fn(slice(k, k + b))) for k in range(0, n_rows, b)])

        def psi(sl, bt=batch):  # the goals' features of a batch slice
            return cvl.goal_features(nets, critic, bt.goals[sl], bt.absorbing[sl])

        def q(actions, name):
            cfg_q = dataclasses.replace(cfg, q_estimator=name)
            return per_batch(lambda sl: cvl.q_estimate(nets, critic, s[sl], actions[sl], psi(sl), r_g[sl], cfg_q))

        first = jax.tree.map(lambda x: x[0], critic) if cvl.is_ensemble(critic) else critic  # Z of one critic

        def z(sl):
            f = cvl.pair_logits(first, cvl.sa_features(nets, first, s[sl], a[sl]),
                                cvl.goal_features(nets, first, goals[sl], absorbing[sl]))
            return jnp.exp(cvl.off_diagonal(f)).sum(axis=1) / (b - 1)

        zs = per_batch(z)
        result = dict(seed=seed, rows=rows, mc_return=ret, z_mean=float(zs.mean()), z_std=float(zs.std()),
                      z_corr=correlations(zs, ret))
        if cfg.actor_objective == "q":
            result["grad_ratio"] = actor_gradient_ratio(nets, critic, actor, data, cfg, jax.random.key(args.seed))
        print(f"  seed {seed}: Z(s, a) mean {zs.mean():.3g} (1/(B-1) = {1 / (b - 1):.3g}) std {zs.std():.3g}, "
              f"corr(Z, MC return) {show(result['z_corr'])}"
              + (f" | actor: |grad Q| / |grad BC| {result['grad_ratio']:.3g}" if "grad_ratio" in result else ""))
        for name in cvl.Q_ESTIMATORS:
            q_data, q_rand = q(a, name), q(a_rand, name)
            result[name] = dict(corr=correlations(q_data, ret), beats_random=float(np.mean(q_data > q_rand)),
                                q_mean=float(q_data.mean()), q=q_data, q_random=q_rand)
            mark = "*" if name == cfg.q_estimator else " "
            print(f"   {mark}{name:>10}: corr(Q, MC return) {show(result[name]['corr'])} | "
                  f"Q(a_data) > Q(a_random) {result[name]['beats_random']:.3f} | Q mean {q_data.mean():.3g}")

        own_q = result[cfg.q_estimator]["q"]
        grad = per_batch(lambda sl: jax.grad(lambda x: cvl.q_estimate(nets, critic, s[sl], x, psi(sl), r_g[sl],
                                                                       cfg).sum())(a[sl]))
        result["sensitivity"], result["grad"] = action_sensitivity(grad, own_q, a), grad

        def advantage(name, bt, key):  # an AWR advantage of the rows' data actions, as training computes it
            cfg_a = dataclasses.replace(cfg, awr_advantage=name)
            return per_batch(lambda sl: cvl.awr_advantage(nets, critic, actor, psi(sl, bt),
                                                          jax.tree.map(lambda x: x[sl], bt), key, cfg_a)[0])

        for name in cvl.ADVANTAGES:  # twice: with the scored batches' goals, then with independent ones
            adv = advantage(name, batch, jax.random.key(args.seed))
            adv_again = advantage(name, batch_again, jax.random.key(args.seed + 1))
            result[f"retest_{name}"] = dict(a=adv, a_again=adv_again, corr=correlations(adv, adv_again))
            print(f"     AWR advantage {name}{'*' if name == cfg.awr_advantage else ' '}: the same rows with other "
                  f"goals and policy samples, corr(A, A') {show(result[f'retest_{name}']['corr'])}")
        if args.simulate:
            policy = jax.jit(lambda obs: cvl.eval_action(nets, actor, obs))
            a_pi = per_batch(lambda sl: policy(s[sl]))
            grad_pi = per_batch(lambda sl: jax.grad(lambda x: cvl.q_estimate(nets, critic, s[sl], x, psi(sl), r_g[sl],
                                                                              cfg).sum())(a_pi[sl]))
            own = result[cfg.q_estimator]
            sim = result["simulated"] = simulate_pairs(env_id, s, a, a_rand, a_near, own["q"], own["q_random"],
                                                       q(a_near, cfg.q_estimator), policy, cfg.gamma, args,
                                                       f"the critic ({cfg.q_estimator})", uphill(a, grad, args.near),
                                                       a_pi, uphill(a_pi, grad_pi, args.near))
            ok, n = sim["ok"], len(sim["ok"])
            g_data, g_pi = sim["g_data"], sim["g_policy"]
            for name in cvl.ADVANTAGES:  # each AWR advantage of the data's action, computed as in training
                adv = result[f"retest_{name}"]["a"][:n][ok]
                sim[f"advantage_{name}"], sim[f"advantage_{name}_corr"] = adv, correlations(adv, g_data - g_pi)
                print(f"     AWR advantage {name}{'*' if name == cfg.awr_advantage else ' '}: corr(A(s, a_data), "
                      f"G(a_data) - G(a_policy)) {show(sim[f'advantage_{name}_corr'])}")
        results.append(result)
    return results


def pick_rows(data: cvl.Data, gamma: float, b: int, args):
    """--rows dataset rows (a multiple of the batch b) whose Monte-Carlo return is known, their returns, and the rng
    that drew them (which then draws the random actions)."""
    rng = np.random.default_rng(args.seed)
    end = np.asarray(data.episode_end)
    ret = mc_returns(np.asarray(data.rewards), end, gamma)
    exact = np.asarray(data.terminal) | (end - np.arange(len(end)) >= args.min_horizon)
    candidates = np.intersect1d(np.flatnonzero(exact), np.asarray(data.anchors))
    n_rows = args.rows // b * b
    if len(candidates) < max(n_rows, b):
        raise SystemExit(f"diagnose_critic: only {len(candidates)} rows have a known return ({args.min_horizon} "
                         f"steps from a time limit, or in an episode that fell) and --rows {args.rows} must be at "
                         f"least the run's batch {b}; lower --rows or --min-horizon")
    rows = rng.choice(candidates, n_rows, replace=False)
    return rows, ret[rows], rng


def other_actions(a, rng, near: float):
    """The actions each row's data action a is compared with: uniform in [-1, 1], and near it (a + N(0, near^2),
    clipped), drawn in that order from rng."""
    a_rand = jnp.asarray(rng.uniform(-1, 1, a.shape), jnp.float32)
    return a_rand, jnp.asarray(np.clip(np.asarray(a) + near * rng.standard_normal(a.shape), -1, 1), jnp.float32)


def uphill(a, grad, size: float):
    """The data's action moved `size` along the critic's gradient dQ/da (a unit direction per row), clipped: where a
    DDPG+BC step on this critic goes from the data."""
    grad = np.asarray(grad, np.float64)
    unit = grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-12)
    return jnp.asarray(np.clip(np.asarray(a) + size * unit, -1, 1), jnp.float32)


def simulate_pairs(env_id, s, a, a_rand, a_near, q_data, q_rand, q_near, policy, gamma, args, critic_name: str,
                   a_up, a_pi, a_pi_up) -> dict:
    """The first --simulate rows in the simulator: the data's action, a random one, one near the data's (a + N(0,
    --near^2), clipped) and the policy's own first action, then the policy. Whether the critic (its Q of the rows at
    each of the three) agrees with the returns G on which of a pair is better, and corr(dQ, dG): the data's action
    against the random one (top-level keys), and against the near one ("near_*": the local ranking a DDPG-style
    policy step follows). And the policy step itself: a_up, the data's action moved --near along the critic's
    gradient (uphill), against the data's: how often the simulator's return rises along it ("up_better", 0.5 for a
    direction that knows nothing) and by how much on average ("up_gain"). The same for a_pi_up, the policy's own
    action a_pi (policy(s), the caller's) moved --near along the gradient taken there, against a_pi ("pi_up_better",
    "pi_up_gain"): whether the critic knows the way up from where the policy is, which is where a policy step pushes
    it from. Prints a line for each."""
    n = min(args.simulate, len(s))
    a_pi = np.asarray(a_pi[:n])  # the policy's own first action: G(a_pi) is its value V(s)
    first_actions = np.concatenate([np.asarray(x[:n]) for x in (a, a_rand, a_near)]
                                   + [a_pi, np.asarray(a_up[:n]), np.asarray(a_pi_up[:n])])
    g = simulated_returns(env_id, np.asarray(s[:n]), first_actions, policy, gamma, args.horizon)  # i, n + i, ...
    ok = ~np.isnan(g[:n])
    g_data, g_rand, g_near, g_pi, g_up, g_pi_up = (g[k * n:(k + 1) * n][ok] for k in range(6))
    sim = dict(rows=int(ok.sum()), ok=ok, g_data=g_data, g_random=g_rand, g_near=g_near, g_policy=g_pi,
               a_near=np.asarray(a_near[:n])[ok], q_near=np.asarray(q_near)[:n][ok], g_up=g_up,
               a_up=np.asarray(a_up[:n])[ok], up_better=float(np.mean(g_up > g_data)),
               up_gain=float(np.mean(g_up - g_data)), a_policy=a_pi[ok], g_pi_up=g_pi_up,
               a_pi_up=np.asarray(a_pi_up[:n])[ok], pi_up_better=float(np.mean(g_pi_up > g_pi)),
               pi_up_gain=float(np.mean(g_pi_up - g_pi)))
    sim.update(pair_agreement(sim, q_data, q_rand, q_near, critic_name, args.horizon))
    for what, key in (("the data's action", "up"), ("the policy's own action", "pi_up")):
        print(f"    simulator, {what} moved {args.near} along the critic's gradient dQ/da there (the policy step's "
              f"direction): the return rises {sim[key + '_better']:.3f} of the time, by {sim[key + '_gain']:+.3g} "
              "on average")
    return sim


def pair_agreement(sim: dict, q_data, q_rand, q_near, critic_name: str, horizon: int) -> dict:
    """Against simulate_pairs' returns: how often a critic's Q of the simulated rows (the data's action, a random
    one, a near one) agrees with G on which of a pair is better, and corr(dQ, dG); "near_*" for the near pair."""
    n, ok = len(sim["ok"]), sim["ok"]
    g_data = sim["g_data"]
    q_d, q_r, q_n = (np.asarray(x)[:n][ok] for x in (q_data, q_rand, q_near))
    out = {}
    for prefix, other, g_o, q_o in (("", "random", sim["g_random"], q_r), ("near_", "near", sim["g_near"], q_n)):
        out.update({f"{prefix}data_better": float(np.mean(g_data > g_o)),
                    f"{prefix}agree": float(np.mean((q_d > q_o) == (g_data > g_o))),
                    f"{prefix}corr": correlations(q_d - q_o, g_data - g_o)})
        print(f"    simulator ({sim['rows']} rows, {horizon} steps, then this seed's policy), the data's action "
              f"against a {other} one: the data's is better {out[prefix + 'data_better']:.3f} of the time; "
              f"{critic_name} agrees {out[prefix + 'agree']:.3f}; corr(Q(a_data) - Q(a_{other}), G(a_data) - "
              f"G(a_{other})) {show(out[prefix + 'corr'])}")
    return out


def diagnose_td3bc(args) -> list[dict]:
    """The same rows, random actions and simulator check for a bench/td3_bc.py run's first critic Q_1 (the one its
    actor follows), on states normalised as in its training: the agreement a TD critic reaches on these pairs."""
    td3_bc = import_td3_bc()
    payload, cfg, data, (env_id, _, _), nets, seeds, state, (mean, std) = load_td3bc_run(args.run)
    seeds = seeds[:args.seeds or None]
    rows, ret, rng = pick_rows(data, cfg.discount, cfg.batch_size, args)
    s, a = data.observations[rows], data.actions[rows]
    a_rand, a_near = other_actions(a, rng, args.near)
    s_norm = (s - mean) / std  # the states as its critic saw them in training
    print(f"{args.run}: TD3+BC, step {payload['step']}, {len(rows)} rows, MC return mean {ret.mean():.1f}")
    results = []
    for i, seed in enumerate(seeds):
        critic = jax.tree.map(lambda x: x[i], state.critic)
        actor = jax.tree.map(lambda x: x[i], state.actor)

        def q1(x, critic=critic):  # its Q_1 at the rows' states
            return td3_bc.twin_q(nets, critic, s_norm, x)[0]

        q_data, q_rand, q_near = (np.asarray(q1(x)) for x in (a, a_rand, a_near))
        grad = np.asarray(jax.grad(lambda x: q1(x).sum())(a))
        policy = jax.jit(lambda obs, actor=actor: td3_bc.policy(nets, actor, (obs - mean) / std))
        result = dict(seed=seed, rows=rows, q=q_data, q_random=q_rand, corr=correlations(q_data, ret),
                      beats_random=float(np.mean(q_data > q_rand)))
        print(f"  seed {seed}: corr(Q_1, MC return) {show(result['corr'])} | Q(a_data) > Q(a_random) "
              f"{result['beats_random']:.3f}")
        result["sensitivity"], result["grad"] = action_sensitivity(grad, q_data, a), grad
        if args.simulate:
            a_pi = np.asarray(policy(s))
            grad_pi = np.asarray(jax.grad(lambda x: q1(x).sum())(jnp.asarray(a_pi)))
            result["simulated"] = simulate_pairs(env_id, s, a, a_rand, a_near, q_data, q_rand, q_near, policy,
                                                 cfg.discount, args, "TD3+BC's critic", uphill(a, grad, args.near),
                                                 a_pi, uphill(a_pi, grad_pi, args.near))
        results.append(result)
    return results


def is_td3bc_run(run) -> bool:
    return (Path(run) / "normalizer.npz").exists()


def import_td3_bc():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import td3_bc

    return td3_bc


def load_cvl_run(run):
    """A cvl.py run: (checkpoint, config, data, (eval env, ref min, ref max), networks, seeds, train state)."""
    ckpt = cvl.load_checkpoint(Path(run))
    cfg = ckpt["config"]
    data, env, obs_dim, act_dim = cvl.load_env_data(cfg)
    nets = cvl.make_networks(cfg, act_dim)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    return ckpt, cfg, data, env, nets, seeds, cvl.restore_state(cvl.init_states(cfg, nets, seeds, obs_dim, act_dim),
                                                                 ckpt["state"])


def load_td3bc_run(run):
    """A bench/td3_bc.py run: (checkpoint payload, config, data, env, networks, seeds, train state, (state mean,
    state std) of its normalisation)."""
    import json

    import flax.serialization

    td3_bc = import_td3_bc()
    run = Path(run)
    cfg = cvl.config_from_dict(json.loads((run / "config.json").read_text()), td3_bc.TD3BCConfig)
    data, env, obs_dim, act_dim = cvl.load_env_data(cfg)
    nets = td3_bc.Nets(actor=cvl.MLP(cfg.hidden, act_dim), critic=cvl.MLP(cfg.hidden, 1))
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    template = cvl.init_seeds(lambda key: td3_bc.init_state(key, cfg, nets, obs_dim, act_dim), seeds)
    payload = flax.serialization.msgpack_restore((run / "checkpoint.msgpack").read_bytes())
    norm = np.load(run / "normalizer.npz")
    return (payload, cfg, data, env, nets, seeds, cvl.restore_state(template, payload["state"]),
            (jnp.asarray(norm["mean"], jnp.float32), jnp.asarray(norm["std"], jnp.float32)))


def action_sensitivity(grad: np.ndarray, q: np.ndarray, a) -> dict:
    """How hard a DDPG+BC step (bench/td3_bc.py's, or --actor-objective ddpg) is pushed off the data's actions a: the
    rms over rows and action dims of dQ/da at a, relative to mean |Q| (the step's lambda is alpha / mean |Q|, so this
    times alpha is the push the BC term has to balance) and to the std of Q over the rows (the critic's own scale
    between states); and which way: the mean over rows of the cosine between dQ/da and a ("outward", +1 when the
    critic wants every action larger along itself, -1 when smaller). Prints a line."""
    rms = float(np.sqrt(np.mean(np.asarray(grad, np.float64) ** 2)))
    out = dict(grad_rms=rms, per_mean_abs_q=rms / float(np.abs(q).mean()), per_std_q=rms / float(np.std(q)),
               outward=float(row_cosine(grad, a).mean()))
    print(f"    action sensitivity at the data's actions: rms dQ/da / mean|Q| {out['per_mean_abs_q']:.4f}, "
          f"/ std(Q) over the rows {out['per_std_q']:.3f}; cos(dQ/da, a) {out['outward']:+.3f}")
    return out


def row_cosine(x, y) -> np.ndarray:
    """The cosine between x[i] and y[i] for each row i (0 where either is 0)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-30)


def gradient_agreement(mine: dict, theirs: dict, name: str) -> dict:
    """How alike two critics' action gradients are at the same rows: per row the cosine between dQ/da of one and of
    the other (1: their DDPG+BC steps leave the data the same way; about 0: unrelated directions), its mean and
    median, and the share of rows where it is positive. Prints a line."""
    if not np.array_equal(mine["rows"], theirs["rows"]):
        raise SystemExit(f"diagnose_critic: --against {name} drew other rows (its batch size or discount differ); "
                         "compare runs that train with the same batch size and gamma")
    cos = row_cosine(mine["grad"], theirs["grad"])
    out = dict(cos=cos, mean=float(cos.mean()), median=float(np.median(cos)), positive=float(np.mean(cos > 0)))
    print(f"  seed {mine['seed']} against {name} (seed {theirs['seed']}): cosine of the two critics' dQ/da at the "
          f"data's actions, mean {out['mean']:+.3f}, median {out['median']:+.3f}, positive {out['positive']:.3f}")
    return out


# ------------------------------------------------------------------------------------- selection in closed loop
def candidate_actions(mean, std, key, n: int, spread: float):
    """[n, rows, |A|] candidates per row: the policy's own action tanh(mean) first, then n - 1 samples
    tanh(mean + spread * std * eps) of its tanh-Gaussian, the std scaled by `spread`."""
    u = mean + spread * std * jax.random.normal(key, (n - 1, *mean.shape))
    return jnp.concatenate([jnp.tanh(mean)[None], jnp.tanh(u)])


def pick(candidates, q, how: str, key):
    """[rows, |A|]: per row the candidate with the highest q ("best"), or one drawn uniformly from the same
    candidates ("random"); candidates [n, rows, |A|], q [n, rows]."""
    i = jnp.argmax(q, axis=0) if how == "best" else jax.random.randint(key, q.shape[1:], 0, q.shape[0])
    return jnp.take_along_axis(candidates, i[None, :, None], axis=0)[0]


def obs_key(s):
    """A key made of the observations' bits: cvl.evaluate passes the policy none, and so the best and the random
    policy draw the same candidates wherever they see the same states."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(s, jnp.float32), jnp.int32)
    return jax.random.fold_in(jax.random.key(0), jnp.sum(bits))


def selecting_policy(propose, score, n: int, spread: float, how: str):
    """policy((proposer params, scorer params), s) for cvl.evaluate: n candidate_actions from propose(params, s) ->
    the policy's (mean, std) before tanh, and the one `how` picks by score(params, s, a) -> Q(s, a)."""
    def policy(params, s):
        proposer, scorer = params
        key = obs_key(s)
        candidates = candidate_actions(*propose(proposer, s), key, n, spread)
        q = jax.vmap(lambda a: score(scorer, s, a))(candidates)
        return pick(candidates, q, how, jax.random.fold_in(key, 1))
    return policy


def conservative_pick(candidates, q, margin: float):
    """[rows, |A|]: per row the candidate with the best min_k gain_k - margin std_k gain_k, gain_k = q_k(candidate)
    - q_k(own) over K heads' q [K, n, rows], the own action (the first candidate) scoring 0: a sample replaces it
    only where every head prefers it by `margin` stds of their gains. With one head and no margin, the head's best
    (or the own action where no sample beats it)."""
    gain = q - q[:, :1]
    return pick(candidates, (gain.min(axis=0) - margin * gain.std(axis=0)).at[0].set(0.0), "best", None)


def picking_policy(propose, head_score, n: int, spread: float, margin: float):
    """policy((proposer params, stacked heads), s) for cvl.evaluate: conservative_pick among the same candidates as
    selecting_policy's (its own action and n - 1 samples, the same key), scored by fitted heads head_score(head, s,
    a)."""
    def policy(params, s):
        proposer, heads = params
        candidates = candidate_actions(*propose(proposer, s), obs_key(s), n, spread)
        q = jax.vmap(lambda h: jax.vmap(lambda a: head_score(h, s, a))(candidates))(heads)  # [K, n, rows]
        return conservative_pick(candidates, q, margin)
    return policy


def goal_readout(nets, critic: dict, s, a, psi, goal_rewards, estimator: str):
    """A CVL critic's Q(s, a) against one fixed set of data goals (psi, their rewards), for states that are not
    the goals' own rows: marginal as cvl.q_marginal, every other estimator as cvl.q_normalized (diag needs a row's
    own goal); the minimum over an ensemble, as cvl.q_estimate."""
    if cvl.is_ensemble(critic):
        return jax.vmap(lambda c, p: goal_readout(nets, c, s, a, p, goal_rewards, estimator))(critic, psi).min(0)
    f = cvl.pair_logits(critic, cvl.sa_features(nets, critic, s, a), psi)
    if estimator == "marginal":
        return jnp.exp(f) @ goal_rewards / f.shape[-1]
    return jax.nn.softmax(f, axis=-1) @ goal_rewards


def cvl_scorer(nets, cfg, state, data, n_goals: int, key):
    """(scorer params stacked over seeds, score(params, s, a) -> Q, its name) of a CVL run's critics, each read out
    over the same n_goals data goals drawn as training draws a batch's."""
    goals = cvl.sample_batch(jax.tree.map(jnp.asarray, data), key, n_goals, cfg.gamma, cfg.goal_reward)
    critic = {k: v for k, v in state.critic.items() if k != "behavior"}  # --action-negatives' BC policy
    psi = jax.vmap(lambda c: cvl.goal_features(nets, c, goals.goals, goals.absorbing))(critic)

    def score(scorer, s, a):
        critic, psi = scorer
        return goal_readout(nets, critic, s, a, psi, goals.goal_rewards, cfg.q_estimator)
    return (critic, psi), score, f"the critic ({cfg.q_estimator} over {n_goals} data goals)"


def td3bc_scorer(nets, state, norm):
    """The same for a bench/td3_bc.py run's first critic, on states normalised as in its training."""
    td3_bc = import_td3_bc()
    mean, std = norm

    def score(critic, s, a):
        return td3_bc.twin_q(nets, critic, (s - mean) / std, a)[0]
    return state.critic, score, "TD3+BC's critic Q_1"


def onestep_targets(data, values_next, gamma: float):
    """(1 - gamma) r_t + gamma V(s_{t+1}) per row, V = 0 after a fall (a true termination at the episode's last row),
    and the rows where it is defined: s_{t+1} stored, or the fall (as TD3+BC's targets). In the readout's units,
    (1 - gamma) Q."""
    fell, rows = import_td3_bc().usable_rows(data)
    y = (1 - gamma) * np.asarray(data.rewards, np.float64) + gamma * np.where(fell, 0.0, values_next)
    return y, rows


def fit_onestep_head(cfg, data, critic_value, steps: int, key, chunk: int = 65536):
    """A head q(s, a) (an MLP of the run's widths on standardised states and the action) regressed for `steps`
    Adam steps (batch and learning rate of the run) onto onestep_targets, with V(s') = critic_value(s') the critic's
    readout at the policy's action: the contrastive critic's value of states, and the action's effect through the
    data's own reward and next state. Not bootstrapped. Returns (score(head, s, a), head (its parameters and the
    targets' scale), the mse of the last 100 batches over the targets' variance)."""
    obs = np.asarray(data.observations)
    mean, std = import_td3_bc().normalizer(obs)  # standardised states, as TD3+BC's critic sees them
    nxt = np.asarray(data.next_observations)
    v = np.concatenate([np.asarray(critic_value(jnp.asarray(nxt[i:i + chunk]))) for i in range(0, len(nxt), chunk)])
    y, rows = onestep_targets(data, v, cfg.gamma)
    y_mean, y_std = y.mean(), y.std() + 1e-12
    x = jnp.asarray(np.concatenate([(obs - mean) / std, np.asarray(data.actions)], 1), jnp.float32)
    y, rows = jnp.asarray((y - y_mean) / y_std, jnp.float32), jnp.asarray(rows)
    net = cvl.MLP(cfg.hidden, 1)
    opt = optax.adam(cfg.lr)
    k_init, k_steps = jax.random.split(key)
    params = net.init(k_init, x[:1])

    def step(carry, k):
        params, opt_state = carry
        i = rows[jax.random.randint(k, (cfg.batch_size,), 0, len(rows))]
        loss, grad = jax.value_and_grad(lambda p: jnp.mean((net.apply(p, x[i])[:, 0] - y[i]) ** 2))(params)
        updates, opt_state = opt.update(grad, opt_state)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.jit(lambda p, ks: jax.lax.scan(step, (p, opt.init(p)), ks))(
        params, jax.random.split(k_steps, steps))
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    def score(head, s, a):  # in the readout's units
        q = net.apply(head["net"], jnp.concatenate([(s - mean) / std, a], -1))[..., 0]
        return q * head["scale"] + head["shift"]
    head = dict(net=params, scale=jnp.float32(y_std), shift=jnp.float32(y_mean))
    return score, head, float(losses[-100:].mean())


class ClosedLoop(NamedTuple):
    """What a closed-loop check needs: the diagnosed critic (score(scorer, s, a) -> Q, its params stacked over the
    first k seeds with the proposing policy's), the proposing policy (propose(actor, s) -> its (mean, std) before
    tanh), the eval env's play(policy, params) -> per-seed scores, and the proposing policy's own scores."""
    params: tuple  # (proposing actors, scorers), stacked over seeds[:k]
    score: Callable
    what: str
    propose: Callable
    seeds: list
    k: int
    data: cvl.Data
    state: Any  # the diagnosed run's train state (its critics, and for a cvl.py run its actors)
    cfg: Any
    nets: Any
    source: str
    play: Callable
    own: np.ndarray  # per seed, the score of the proposing policy's own action tanh(mean)


def closed_loop(args) -> ClosedLoop:
    """The diagnosed run's critic and the policy of --candidates (default the diagnosed run), seed i's critic with
    seed i's policy."""
    source = args.candidates or args.run
    if is_td3bc_run(source):
        raise SystemExit(f"diagnose_critic: --candidates {source} is a bench/td3_bc.py run; the closed loop needs a "
                         "cvl.py run's policy")
    if is_td3bc_run(args.run):
        _, cfg, data, (env_id, ref_min, ref_max), nets, seeds, state, norm = load_td3bc_run(args.run)
        scorers, score, what = td3bc_scorer(nets, state, norm)
    else:
        _, cfg, data, (env_id, ref_min, ref_max), nets, seeds, state = load_cvl_run(args.run)
        scorers, score, what = cvl_scorer(nets, cfg, state, data, args.select_goals, jax.random.key(args.seed))
    if source == args.run:  # the diagnosed cvl.py run proposes its own candidates
        p_cfg, p_nets, p_seeds, p_state = cfg, nets, seeds, state
    else:
        _, p_cfg, _, _, p_nets, p_seeds, p_state = load_cvl_run(source)
    k = min(len(seeds), len(p_seeds), args.seeds or len(seeds))
    params = jax.tree.map(lambda x: x[:k], (p_state.actor, scorers))

    def propose(actor, s):
        return cvl.actor_dist(p_nets, actor, s, p_cfg)

    def play(policy, stacked=params):
        returns = cvl.evaluate(cvl.seeds_policy(cvl.env_policy(policy, env_id)), stacked, env_id, seeds[:k],
                               args.episodes).mean(axis=1)
        return returns if ref_min is None else cvl.normalized_score(returns, ref_min, ref_max)
    own = play(lambda prm, s: cvl.eval_action(p_nets, prm[0], s))
    return ClosedLoop(params, score, what, propose, seeds, k, data, state, cfg, nets, source, play, own)


def select_in_closed_loop(args, loop: ClosedLoop) -> list[dict]:
    """--select N: at every step of --episodes evaluation episodes per seed, N candidate actions from the policy of
    --candidates (a cvl.py run; default the diagnosed run), and the agent acts with the one the diagnosed run's
    critic rates highest, or with a uniformly random one of the same candidates, or with the policy's own action.
    best - random is what the critic's ranking of those actions is worth in the simulator (a critic that knows
    nothing about them scores random's level). Seed i's critic picks among seed i's candidates. With --select-head
    STEPS (a cvl.py run), also the best by a one-step head fitted to seed i's critic (fit_onestep_head), V(s') read
    out at seed i's own policy's action. Prints a line per seed; the scores are D4RL-normalised (raw returns for an
    env without reference returns)."""
    params, score, propose, seeds, k, play = loop.params, loop.score, loop.propose, loop.seeds, loop.k, loop.play
    n, spread = args.select, args.select_spread
    best = play(selecting_policy(propose, score, n, spread, "best"))
    rand = play(selecting_policy(propose, score, n, spread, "random"))
    own = loop.own
    heads = None
    if args.select_head:
        fitted = []  # per seed, --select-heads fits
        for i in range(k):
            critic_i, actor_i = jax.tree.map(lambda x: x[i], (params[1], loop.state.actor))
            value = jax.jit(lambda s, c=critic_i, pi=actor_i: score(c, s, cvl.eval_action(loop.nets, pi, s)))
            fitted.append([fit_onestep_head(loop.cfg, loop.data, value, args.select_head,
                                            jax.random.fold_in(jax.random.key(args.seed + i), h))
                           for h in range(args.select_heads)])
        stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
        heads = play(picking_policy(propose, fitted[0][0][0], n, spread, args.select_margin),
                     (params[0], stack([stack([f[1] for f in per_seed]) for per_seed in fitted])))
    print(f"  closed loop, {args.episodes} episodes per seed, {n} candidates per step (the policy's action and "
          f"{n - 1} samples, std x{spread:g}) from the policy of {loop.source}, picked by {loop.what}:")
    out = []
    for i in range(k):
        out.append(dict(best=float(best[i]), random=float(rand[i]), policy=float(own[i]),
                        gain=float(best[i] - rand[i])))
        head = ""
        if heads is not None:
            mse = float(np.mean([f[2] for f in fitted[i]]))
            out[-1].update(head_best=float(heads[i]), head_gain=float(heads[i] - rand[i]), head_mse=mse)
            which = ("the one-step head's best" if args.select_heads == 1 and args.select_margin == 0 else
                     f"the pick of {args.select_heads} one-step heads (margin {args.select_margin:g})")
            head = (f"; {which} {heads[i]:.1f} (gain {heads[i] - rand[i]:+.1f}; fitted to mse {mse:.3f} of the "
                    f"targets' variance)")
        print(f"  seed {seeds[i]}: the critic's best {best[i]:.1f}, a random one {rand[i]:.1f} (gain "
              f"{best[i] - rand[i]:+.1f}); the policy's own action {own[i]:.1f}{head}")
    return out


def mean_slope(propose, score, proposer, scorer, s):
    """(the policy's mean before tanh, dQ/dmean at a = tanh(mean)) per row: each row's Q depends on its own action
    alone, so the gradient of the sum is every row's."""
    mean, _ = propose(proposer, s)
    return mean, jax.grad(lambda m: score(scorer, s, jnp.tanh(m)).sum())(mean)


def pushing_policy(propose, score, beta: float):
    """policy((proposer params, scorer params, c), s) for cvl.evaluate: tanh(mean + beta g / c), g = dQ/dmean at
    the policy's own action and c its rms over data states (push_scale): the training push's step (cvl.py's
    actor_loss_awr_push), taken at test time."""
    def policy(params, s):
        proposer, scorer, c = params
        mean, g = mean_slope(propose, score, proposer, scorer, s)
        return jnp.tanh(mean + beta * g / c)
    return policy


def push_scale(propose, score, proposer, scorer, s):
    """rms over rows and action dims of dQ/dmean at the policy's own actions on states s."""
    return jnp.sqrt(jnp.mean(mean_slope(propose, score, proposer, scorer, s)[1] ** 2))


def push_in_closed_loop(args, loop: ClosedLoop) -> list[dict]:
    """--push-steps BETA...: per seed, --episodes episodes of the policy of --candidates (default the diagnosed
    run) acting with its mean moved BETA along the diagnosed critic's dQ/dmean (pushing_policy; c from 2,048 data
    states drawn with --seed), and with its own action (BETA 0). Whether a step along the critic's slope helps the
    policy in the simulator, step by step; with a bench/td3_bc.py run diagnosed, whether TD3+BC's critic's slope
    helps a CVL policy where the CVL critic's does not."""
    states = np.asarray(loop.data.observations)
    states = jnp.asarray(states[np.random.default_rng(args.seed).choice(len(states), min(2048, len(states)),
                                                                         replace=False)])
    actors, scorers = loop.params
    scales = jnp.stack([push_scale(loop.propose, loop.score, *jax.tree.map(lambda x: x[i], (actors, scorers)),
                                   states) for i in range(loop.k)])
    own = loop.own
    pushed = {beta: loop.play(pushing_policy(loop.propose, loop.score, beta), (actors, scorers, scales))
              for beta in args.push_steps}
    print(f"  closed loop, {args.episodes} episodes per seed: the policy of {loop.source}, its mean moved BETA along "
          f"dQ/dmean of {loop.what} / its rms on data states:")
    out = []
    for i in range(loop.k):
        out.append(dict(policy=float(own[i]), scale=float(scales[i]),
                        steps={beta: float(score[i]) for beta, score in pushed.items()}))
        steps = ", ".join(f"{beta:g}: {score[i]:.1f}" for beta, score in pushed.items())
        print(f"  seed {loop.seeds[i]}: the policy's own action {own[i]:.1f}; pushed {steps} (rms dQ/dmean "
              f"{scales[i]:.3g})")
    return out


def restore(env, obs: np.ndarray) -> bool:
    """Put a MuJoCo locomotion env in the state an observation shows (qpos without x, then qvel); whether the
    observation round-trips."""
    u = env.unwrapped
    nq = u.model.nq
    u.set_state(np.concatenate([[0.0], obs[:nq - 1]]), obs[nq - 1:])
    return bool(np.allclose(u._get_obs(), obs, atol=1e-4))


def simulated_returns(env_id: str, states: np.ndarray, first_actions: np.ndarray, policy, gamma: float,
                      horizon: int) -> np.ndarray:
    """For each first action (len(states) * k of them, state i % len(states)): sum_{t < horizon} gamma^t r_t from
    that state, the first action at t = 0 and policy(obs) after, with 0 after a termination; NaN for a state that
    cannot be restored. All rollouts step in lockstep, so the policy runs once per step on every observation."""
    import gymnasium as gym

    n = len(first_actions)
    with cvl.quiet_env_creation():
        envs = [gym.make(env_id) for _ in range(n)]
    obs = np.asarray(states, np.float64)[np.arange(n) % len(states)]
    alive = np.ones(n, bool)
    for i, env in enumerate(envs):
        env.reset(seed=i)
        alive[i] = restore(env, obs[i])
    ret = np.where(alive, 0.0, np.nan)
    actions = np.asarray(first_actions, np.float64)
    for t in range(horizon):
        for i in np.flatnonzero(alive):
            obs[i], reward, terminated, _, _ = envs[i].unwrapped.step(actions[i])
            ret[i] += gamma ** t * reward
            alive[i] = not terminated
        if not alive.any():
            break
        actions = np.asarray(policy(jnp.asarray(obs, jnp.float32)), np.float64)
    for env in envs:
        env.close()
    return ret


def correlations(x, y) -> tuple[float, float]:
    """(Pearson, Spearman)."""
    return float(np.corrcoef(x, y)[0, 1]), float(np.corrcoef(rank(x), rank(y))[0, 1])


def show(c: tuple[float, float]) -> str:
    return f"pearson {c[0]:+.3f} spearman {c[1]:+.3f}"


def actor_gradient_ratio(nets, critic, actor, data, cfg, key) -> float:
    """|grad of (1 - bc) * Q term| / |grad of bc * BC term| of cvl.actor_loss_q on one training batch: the loss at
    bc_coef 0 (alpha 0) is -Q alone and at bc_coef 1 the BC NLL alone."""
    k_batch, k_actor = jax.random.split(key)
    batch = cvl.sample_batch(data, k_batch, cfg.batch_size, cfg.gamma, cfg.goal_reward)
    psi = cvl.goal_features(nets, critic, batch.goals, batch.absorbing)

    def grad_norm(bc_coef):
        grads = jax.grad(lambda p: cvl.actor_loss_q(p, critic, psi, nets, batch, k_actor, 0.0,
                                                    dataclasses.replace(cfg, bc_coef=bc_coef))[0])(actor)
        return float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(grads))))

    return (1 - cfg.bc_coef) * grad_norm(0.0) / max(cfg.bc_coef * grad_norm(1.0), 1e-30)


if __name__ == "__main__":
    main()
