"""TD3+BC (Fujimoto & Gu, 2021, "A Minimalist Approach to Offline Reinforcement Learning"), the reference beside CVL.

    python bench/td3_bc.py --dataset ../shared/d4rl/hopper_medium-local.hdf5 --eval-env Hopper-v4 --num-seeds 3
    python bench/td3_bc.py --resume RUN_DIR --steps 600000      # continue or extend a run

Its published settings (TD3BCConfig). Only its networks, losses and update are here: flags, data, evaluation, seeds,
metrics, checkpoints and the training loop are cvl.py's own, so the two are compared like for like.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cvl  # noqa: E402  (first: a stop while the libraries load is then one line)
import flax.struct  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


@dataclass(frozen=True)
class TD3BCConfig(cvl.RunConfig):
    """TD3+BC's published settings beside the run flags it shares with cvl.py (cvl.RunConfig)."""
    steps: int = cvl._flag(300_000, "Gradient steps (critic steps; the actor steps every --policy-freq).")
    batch_size: int = cvl._flag(256, "Transitions per batch.")
    hidden: tuple[int, ...] = cvl._flag((256, 256), "Hidden layer widths of actor and critics.")
    updates_per_call: int = cvl._flag(500, "Updates run by one jitted call (lax.scan); also the logging interval.")
    discount: float = cvl._flag(0.99, "Discount.")
    tau: float = cvl._flag(0.005, "Polyak step of the target networks.")
    policy_noise: float = cvl._flag(0.2, "Std of the target policy's smoothing noise.")
    noise_clip: float = cvl._flag(0.5, "Clip of that noise.")
    policy_freq: int = cvl._flag(2, "Actor and target updates every N critic steps.")
    alpha: float = cvl._flag(2.5, "lambda = alpha / mean|Q|: the Q term's weight against the BC term.")
    normalize: bool = cvl._flag(True, "Normalise states by the dataset's mean and std.")


def check(cfg: TD3BCConfig) -> None:
    """Every flag in range before anything is written; one line each."""
    cvl.check_run_flags(cfg)
    cvl.check_ranges(cfg, positive=("alpha", "policy_freq"), at_least_0=("policy_noise", "noise_clip"),
                     below_1=("discount",), up_to_1=("tau",))


# ================================================================================================== data
class Transitions(NamedTuple):
    observations: jax.Array  # normalised s_j
    actions: jax.Array
    rewards: jax.Array
    next_observations: jax.Array  # normalised s_{j+1}
    dones: jax.Array  # 1 where row j ends its episode by a true termination
    rows: jax.Array  # rows with a usable target: next state known, or a termination (no bootstrap needed)


def normalizer(observations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TD3+BC's state normalisation, (mean, std + 1e-3) per dimension over the dataset's states: the statistics of
    cvl.py's --normalize-states (cvl.state_normalizer)."""
    norm = cvl.state_normalizer(observations)
    return norm["mean"], norm["std"]


def usable_rows(data: cvl.Data) -> tuple[np.ndarray, np.ndarray]:
    """(dones, rows): whether row j ends its episode by a true termination (nothing to bootstrap from after it), and
    the rows with a one-step target: next state known, or such a termination."""
    end, known_end = np.asarray(data.episode_end), np.asarray(data.known_end)
    j = np.arange(len(end))
    dones = np.asarray(data.terminal) & (j == end)
    return dones, np.flatnonzero((j <= known_end) | dones)


def make_transitions(data: cvl.Data, mean, std) -> Transitions:
    obs, next_obs = np.asarray(data.observations), np.asarray(data.next_observations)
    dones, rows = usable_rows(data)
    return Transitions(((obs - mean) / std).astype(np.float32), np.asarray(data.actions),
                       np.asarray(data.rewards), ((next_obs - mean) / std).astype(np.float32),
                       dones.astype(np.float32), rows.astype(np.int32))


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
    """jit(scan(vmap(update))) over seeds, as cvl.make_train_fn."""
    return cvl.jit_chunks(partial(update_step, cfg=cfg, nets=nets), cfg.num_seeds)


# ================================================================================================== main
def train(cfg: TD3BCConfig) -> dict:
    """Train (or resume) a TD3+BC run with cvl.py's training loop; its final metrics."""
    check(cfg)
    cfg = cvl.with_absolute_dataset(cfg)
    data, env, obs_dim, act_dim = cvl.load_env_data(cfg)
    cvl.check_fits(cfg, len(data.rewards), obs_dim, act_dim)
    mean, std = normalizer(np.asarray(data.observations)) if cfg.normalize else (np.zeros(obs_dim), np.ones(obs_dim))
    nets = Nets(actor=cvl.MLP(cfg.hidden, act_dim), critic=cvl.MLP(cfg.hidden, 1))

    init = partial(cvl.init_seeds, lambda key: init_state(key, cfg, nets, obs_dim, act_dim))
    def eval_policy(actor, s):  # the policy sees states normalised as in training; acts in the env's bounds
        return policy(nets, actor, (s - mean) / std)

    def save_normalizer(run_dir):  # for bench/diagnose_critic.py
        cvl.write_file(run_dir / "normalizer.npz", lambda tmp: np.savez(tmp, mean=mean, std=std), "the normaliser")

    transitions = jax.device_put(make_transitions(data, mean, std))
    algo = cvl.Algorithm("TD3+BC", "bench/td3_bc.py", init, make_train_fn(cfg, nets),
                         cvl.env_policy(eval_policy, env[0]), transitions,
                         cvl.data_fingerprint(data))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    return cvl.run_training(algo, cfg, env, mesh, f"{len(transitions.rows):,} transitions", save_normalizer)


def main(argv=None) -> dict:
    given = cvl.parse_args(argv, TD3BCConfig, "bench/td3_bc.py", __doc__.split("\n\n")[0])
    if given.get("resume"):
        return train(cvl.resume_config(given.pop("resume"), TD3BCConfig, "TD3+BC", **given))
    return train(TD3BCConfig(**given))


if __name__ == "__main__":
    cvl.command_line(main, "td3_bc")
