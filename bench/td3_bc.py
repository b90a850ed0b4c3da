"""TD3+BC (Fujimoto & Gu, 2021, "A Minimalist Approach to Offline Reinforcement Learning"), the reference beside CVL.

    python bench/td3_bc.py --dataset ../shared/d4rl/hopper_medium-local.hdf5 --eval-env Hopper-v4 --num-seeds 3
    python bench/td3_bc.py --resume RUN_DIR --steps 600000      # continue or extend a run

Its published settings: alpha 2.5, state normalisation, policy noise 0.2 clipped at 0.5, actor and target update
every 2 steps, tau 0.005, hidden (256, 256), batch 256, Adam 3e-4, discount 0.99. Data loading, validation,
evaluation, seeding, metrics and checkpoints are cvl.py's own functions, and training has cvl.py's shape:
jit(scan(vmap(update))) over seeds, an evaluation every --eval-every steps, so the two are compared like for like.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import flax.serialization
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cvl  # noqa: E402


@dataclass(frozen=True)
class TD3BCConfig:
    dataset: str = ""  # a D4RL-layout file; or env, a D4RL name, downloaded as cvl.py does
    env: str = "halfcheetah-medium-v2"
    eval_env: str = ""
    d4rl_url: str = ""
    steps: int = 300_000
    batch_size: int = 256
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    policy_freq: int = 2
    alpha: float = 2.5
    normalize: bool = True
    seed: int = 0
    num_seeds: int = 1
    updates_per_call: int = 500
    eval_every: int = 10_000
    eval_episodes: int = 10
    checkpoint_every: int = 50_000
    out: str = "runs"
    progress: bool = True

    def data_config(self) -> cvl.Config:
        """The cvl.py config whose data fields name the same dataset and eval env."""
        return cvl.make_config("cpu", env=self.env, dataset=self.dataset, eval_env=self.eval_env,
                               d4rl_url=self.d4rl_url, seed=self.seed, num_seeds=self.num_seeds, out=self.out)


# ================================================================================================== data
class Transitions(NamedTuple):
    observations: jax.Array  # normalised s_j
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array  # normalised s_{j+1}
    dones: jax.Array  # 1 where row j ends its episode by a true termination
    rows: jax.Array  # rows with a usable target: next state known, or a termination (no bootstrap needed)


def normalizer(observations: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """TD3+BC's state normalisation: per-dimension mean and std + eps over the dataset's states."""
    return observations.mean(axis=0), observations.std(axis=0) + eps


def make_transitions(data: cvl.Data, mean, std) -> Transitions:
    obs, next_obs = np.asarray(data.observations), np.asarray(data.next_observations)
    end, known_end = np.asarray(data.episode_end), np.asarray(data.known_end)
    j = np.arange(len(end))
    dones = np.asarray(data.terminal) & (j == end)
    return Transitions(((obs - mean) / std).astype(np.float32), np.asarray(data.actions),
                       np.asarray(data.rewards), ((next_obs - mean) / std).astype(np.float32),
                       dones.astype(np.float32), np.flatnonzero((j <= known_end) | dones).astype(np.int32))


# ============================================================================================== networks
class Nets(NamedTuple):
    actor: cvl.MLP  # s -> pre-tanh action
    critic: cvl.MLP  # (s, a) -> Q, applied with two parameter sets (twin critics)


def policy(nets: Nets, actor, s):
    return jnp.tanh(nets.actor.apply(actor, s))


def twin_q(nets: Nets, critic, s, a):
    """[2, B]: both critics (their parameters stacked on a leading axis)."""
    sa = jnp.concatenate([s, a], axis=-1)
    return jax.vmap(lambda p: nets.critic.apply(p, sa)[..., 0])(critic)


class TD3State(flax.struct.PyTreeNode):
    actor: Any
    critic: Any
    actor_target: Any
    critic_target: Any
    actor_opt: Any
    critic_opt: Any
    key: jax.Array
    step: jax.Array


def init_state(key, cfg: TD3BCConfig, nets: Nets, obs_dim: int, act_dim: int) -> TD3State:
    k_actor, k_critic, key = jax.random.split(key, 3)
    actor = nets.actor.init(k_actor, jnp.zeros((1, obs_dim)))
    critic = jax.vmap(lambda k: nets.critic.init(k, jnp.zeros((1, obs_dim + act_dim))))(jax.random.split(k_critic))
    opt = optax.adam(cfg.lr)
    return TD3State(actor, critic, actor, critic, opt.init(actor), opt.init(critic), key, jnp.zeros((), jnp.int32))


# ================================================================================================ losses
def critic_loss(critic, state: TD3State, batch: Transitions, key, cfg: TD3BCConfig, nets: Nets):
    """Both critics regress on r + discount (1 - done) min_i Q'_i(s', clip(pi'(s') + clipped noise))."""
    noise = jnp.clip(cfg.policy_noise * jax.random.normal(key, batch.actions.shape), -cfg.noise_clip, cfg.noise_clip)
    next_a = jnp.clip(policy(nets, state.actor_target, batch.next_observations) + noise, -1.0, 1.0)
    target_q = twin_q(nets, state.critic_target, batch.next_observations, next_a).min(axis=0)
    y = jax.lax.stop_gradient(batch.rewards + cfg.discount * (1.0 - batch.dones) * target_q)
    q = twin_q(nets, critic, batch.observations, batch.actions)
    loss = ((q - y) ** 2).mean(axis=1).sum()
    return loss, dict(critic_loss=loss, q_mean=q.mean())


def actor_loss(actor, critic, batch: Transitions, cfg: TD3BCConfig, nets: Nets):
    """-lambda Q_1(s, pi(s)) + (pi(s) - a)^2, lambda = alpha / mean |Q| (stopped), so alpha is free of the reward
    scale."""
    pi = policy(nets, actor, batch.observations)
    q = twin_q(nets, critic, batch.observations, pi)[0]
    lmbda = jax.lax.stop_gradient(cfg.alpha / jnp.abs(q).mean())
    bc = ((pi - batch.actions) ** 2).mean()
    loss = -lmbda * q.mean() + bc
    return loss, dict(actor_loss=loss, bc_mse=bc, lmbda=lmbda)


# ================================================================================================ update
def update_step(state: TD3State, data: Transitions, cfg: TD3BCConfig, nets: Nets):
    """One critic step; every policy_freq-th step also one actor step and a Polyak update of both targets."""
    opt = optax.adam(cfg.lr)
    key, k_rows, k_noise = jax.random.split(state.key, 3)
    rows = data.rows[jax.random.randint(k_rows, (cfg.batch_size,), 0, data.rows.shape[0])]
    batch = jax.tree.map(lambda x: x[rows], data._replace(rows=rows))
    (_, metrics), grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic, state, batch, k_noise, cfg,
                                                                        nets)
    updates, critic_opt = opt.update(grads, state.critic_opt)
    critic = optax.apply_updates(state.critic, updates)

    (_, actor_metrics), actor_grads = jax.value_and_grad(actor_loss, has_aux=True)(state.actor, critic, batch, cfg,
                                                                                   nets)
    actor_updates, actor_opt = opt.update(actor_grads, state.actor_opt)
    actor = optax.apply_updates(state.actor, actor_updates)
    polyak = partial(optax.incremental_update, step_size=cfg.tau)
    delayed = (state.step + 1) % cfg.policy_freq == 0  # TD3's delayed policy and target updates

    def pick(new, old):
        return jax.tree.map(lambda a, b: jnp.where(delayed, a, b), new, old)

    new_state = state.replace(
        critic=critic, critic_opt=critic_opt, actor=pick(actor, state.actor),
        actor_opt=pick(actor_opt, state.actor_opt),
        actor_target=pick(polyak(actor, state.actor_target), state.actor_target),
        critic_target=pick(polyak(critic, state.critic_target), state.critic_target), key=key, step=state.step + 1)
    return new_state, {**metrics, **actor_metrics}


def make_train_fn(cfg: TD3BCConfig, nets: Nets):
    """jit(scan(vmap(update))): n updates of K seeds in one call, as cvl.make_train_fn (and like it, one seed runs
    without the seed axis inside the step, which XLA's CPU matmuls are slower with)."""
    update = partial(update_step, cfg=cfg, nets=nets)
    update = jax.vmap(update, in_axes=(0, None)) if cfg.num_seeds > 1 else partial(cvl.without_seed_axis, update)

    def train_chunk(state, data, n):
        return jax.lax.scan(lambda s, _: update(s, data), state, None, length=n)

    return jax.jit(train_chunk, static_argnums=2)


# ================================================================================================== main
def save(run_dir: Path, state: TD3State, cfg: TD3BCConfig, rows: list[dict], stats) -> None:
    cvl.save_checkpoint(run_dir, state, cfg, rows)  # atomic; its "config" is this config
    cvl.write_file(run_dir / "normalizer.npz", lambda tmp: np.savez(tmp, mean=stats[0], std=stats[1]),
                   "the state normaliser")


def train(cfg: TD3BCConfig, resume: str = "") -> dict:
    if cfg.dataset:  # absolute, so the run resumes from any folder
        cfg = dataclasses.replace(cfg, dataset=str(Path(cfg.dataset).expanduser().resolve()))
    dcfg = cfg.data_config()
    cvl.check_config(dcfg)
    data, (env_id, ref_min, ref_max), obs_dim, act_dim = cvl.load_env_data(dcfg)
    mean, std = normalizer(np.asarray(data.observations)) if cfg.normalize else (0.0, 1.0)
    transitions = jax.device_put(make_transitions(data, mean, std))
    nets = Nets(actor=cvl.MLP(cfg.hidden, act_dim), critic=cvl.MLP(cfg.hidden, 1))
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    state = jax.vmap(lambda k: init_state(k, cfg, nets, obs_dim, act_dim))(
        jnp.stack([jax.random.key(s) for s in seeds]))
    rows = []
    if resume:
        run_dir = Path(resume)
        payload = flax.serialization.msgpack_restore((run_dir / "checkpoint.msgpack").read_bytes())
        state, rows = cvl.restore_state(state, payload["state"]), json.loads(payload["rows"])
    else:
        run_dir = cvl.new_run_dir(dcfg)
    cvl.write_file(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=2)),
                   "the run's config")
    log = cvl.MetricsLog(run_dir / "metrics.csv", rows)
    print(f"td3_bc: {cvl.run_label(dcfg)}: {len(transitions.rows):,} transitions, eval on {env_id}, "
          f"{len(seeds)} seed(s) -> {run_dir}", flush=True)

    @cvl.seeds_policy
    def eval_policy(actor, s):  # the policy sees states normalised as in training
        return policy(nets, actor, (s - mean) / std)

    train_chunk = make_train_fn(cfg, nets)
    step = int(np.max(np.asarray(state.step)))
    saved_step = step if resume else None
    start = time.perf_counter() - (rows[-1]["wall_time"] if rows else 0.0)
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, desc="td3_bc", dynamic_ncols=True)
    stop = {}  # SIGINT/SIGTERM: save the last finished step and exit, as cvl.py does
    handlers = cvl.catch_stop_signals(stop)
    try:
        while step < cfg.steps:
            n = min(cfg.updates_per_call, cfg.steps - step, cfg.eval_every - step % cfg.eval_every,
                    cfg.checkpoint_every - step % cfg.checkpoint_every)
            t0 = time.perf_counter()
            new_state, metrics = train_chunk(state, transitions, n)
            if not cvl.ready_unless_stopped(metrics, stop):  # `state`, from before this call, is complete
                raise KeyboardInterrupt
            state, metrics = new_state, jax.tree.map(np.asarray, metrics)
            dt, step = time.perf_counter() - t0, step + n
            row = {"step": step, "wall_time": round(time.perf_counter() - start, 3), "updates_per_sec": n / dt}
            for name, values in metrics.items():
                row.update(cvl.per_seed_columns(name, values.mean(axis=0)))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                returns = cvl.evaluate(eval_policy, state.actor, env_id, seeds, cfg.eval_episodes)
                row.update(cvl.per_seed_columns("return_mean", returns.mean(axis=1)))
                row.update(cvl.per_seed_columns("score", cvl.normalized_score(returns.mean(axis=1), ref_min,
                                                                                ref_max)))
            if not np.isfinite(row["critic_loss"]):
                raise cvl.Diverged(f"non-finite critic loss by step {step}; the last checkpoint in {run_dir} is kept")
            log.append(row)
            bar.update(n)
            bar.set_postfix(critic=f"{row['critic_loss']:.3g}", ups=f"{n / dt:.0f}",
                            score=f"{row.get('score', np.nan):.1f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save(run_dir, state, cfg, log.rows, (mean, std))
                saved_step = step
            if stop:
                raise KeyboardInterrupt
    except KeyboardInterrupt:  # a signal, or Ctrl-C outside a jitted call: `state` is the last finished step
        if saved_step != step:
            save(run_dir, state, cfg, log.rows, (mean, std))
        print(f"td3_bc: interrupted at step {step}; checkpoint saved. Continue with: python bench/td3_bc.py "
              f"--resume {run_dir}", file=sys.stderr, flush=True)
        raise cvl.Stopped(128 + stop.get("signal", signal.SIGINT)) from None
    finally:
        bar.close()
        cvl.restore_signals(handlers)
    cvl.plot_learning_curve(log.rows, run_dir / "learning_curve.png", f"TD3+BC on {cvl.run_label(dcfg)}")
    final = dict(log.rows[-1])
    print(f"td3_bc: done at step {step}: normalised score {final.get('score', float('nan')):.1f}; results in "
          f"{run_dir}", flush=True)
    return {**final, "run_dir": str(run_dir)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TD3BCConfig):
        name = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "hidden":
            parser.add_argument(name, type=int, nargs="+", default=f.default)
        else:
            parser.add_argument(name, type={"int": int, "float": float}.get(f.type, str), default=f.default,
                                help=f"(default: {f.default}"
                                + ("; with --resume, the run's own)" if f.name == "steps" else ")"))
    parser.add_argument("--resume", default="", help="continue (or extend with --steps) this run directory")
    parser.set_defaults(steps=None)  # with --resume, the run's own target unless --steps is given
    args = vars(parser.parse_args(argv))
    resume = args.pop("resume")
    args["hidden"] = tuple(args["hidden"])
    if resume:
        saved = json.loads((Path(resume) / "config.json").read_text())
        saved["hidden"] = tuple(saved["hidden"])
        args = {**saved, "steps": saved["steps"] if args["steps"] is None else args["steps"],
                "progress": args["progress"]}
    if args["steps"] is None:
        args["steps"] = TD3BCConfig.steps
    return train(TD3BCConfig(**args), resume)


if __name__ == "__main__":
    try:
        main()
    except cvl.CVLError as e:
        print(f"td3_bc: error: {e}", file=sys.stderr)
        sys.exit(2)
    except cvl.Stopped as e:
        cvl.exit_now(e.code)
