"""Contrastive Value Learning (CVL) in one pure-JAX file.

Mazoure, Eysenbach, Nachum, Tompson (2022), "Contrastive Value Learning: Implicit Models for Simple Offline RL",
arXiv:2211.02100.

CVL learns an implicit multi-step model f(s, a, g) = phi(s, a) . psi(g) by contrasting each state-action with a
state g from its own trajectory's discounted future (positive) against the futures of other transitions in the
batch (negatives). exp(f) then estimates p(g | s, a) / p(g), so rewards of future states weighted by it give
Q(s, a) without TD learning and without a reward model. A tanh-Gaussian actor maximises that Q estimate with a
behaviour-cloning term (the paper's actor). By default, on states standardised by the dataset's statistics, the
critic is instead trained by contrastive TD (the original code's use_td): the positives are the next state and the
goals the target critic expects after it under the learned policy, so Q is the learned policy's rather than the
data's; and the policy is advantage-weighted regression on the data's actions with the one-step TD advantage plus a
small push of its mean up the critic's action gradient.

    python cvl.py --env halfcheetah-medium-v2            # the paper's offline setting (GPU recommended)
    python cvl.py --env hopper-medium-v2 --preset cpu    # a small, quick setting for a laptop
    python cvl.py --help                                 # every flag

The file reads top to bottom: config, data, goal sampling, networks, losses, update, evaluation, logging, main.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import errno
import functools
import json
import math
import os
import re
import shutil
import signal
import socket
import stat
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Sequence

if Path(sys.argv[0]).name in ("cvl.py", "td3_bc.py"):  # a command line: a stop while the libraries below load is
    for _sig in (signal.SIGINT, signal.SIGTERM):        # one line, not a traceback (then guard_stops takes over)
        signal.signal(_sig, lambda n, _: (print(f"{Path(sys.argv[0]).stem}: stopped by {signal.Signals(n).name}; "
                                                f"nothing was written", file=sys.stderr, flush=True),
                                          os._exit(128 + n)))

import flax.linen as nn  # noqa: E402
import flax.serialization  # noqa: E402
import flax.struct  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


# ======================================================================================================== config
def _flag(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class RunConfig:
    """The flags every algorithm's run shares: its data, size, seeds, evaluation, logs and checkpoints. CVL's Config
    adds its own below; bench/td3_bc.py's TD3+BC config adds TD3+BC's, so both scripts take the same flags for the
    same things (from parse_args) and run in one training loop (run_training)."""

    # --- data
    env: str = _flag("halfcheetah-medium-v2", "D4RL dataset name, e.g. hopper-medium-replay-v2, or a Minari dataset "
                     "id, e.g. mujoco/hopper/medium-v0 (see README Data).")
    dataset: str = _flag("", "Path to a D4RL-layout .hdf5/.npz file; overrides --env as the data source.")
    eval_env: str = _flag("", "Gymnasium env id for evaluation; inferred from the dataset name when empty.")
    d4rl_url: str = _flag("", "Base URL of D4RL's files (a mirror); default $CVL_D4RL_URL, else D4RL's own host.")
    # --- size and optimisation
    steps: int = _flag(1_000_000, "Gradient steps (each updates critic and actor once).")
    batch_size: int = _flag(1024, "Transitions per batch B; the critic contrasts B x B pairs.")
    hidden: tuple[int, ...] = _flag((1024, 1024), "Hidden layer widths of every MLP, e.g. --hidden 256 256.")
    lr: float = _flag(3e-4, "Adam learning rate for critic and actor.")
    # --- seeds, evaluation, logging, checkpoints
    seed: int = _flag(0, "Seed for init, data sampling and evaluation envs (seeds seed..seed+K-1 with --num-seeds).")
    num_seeds: int = _flag(1, "Train K independent agents in one compiled program (vmap); report mean +- std.")
    updates_per_call: int = _flag(1000, "Updates run by one jitted call (lax.scan); also the logging interval.")
    eval_every: int = _flag(10_000, "Evaluate every N steps (and at the end).")
    eval_episodes: int = _flag(10, "Episodes per evaluation, run as one vectorised env.")
    out: str = _flag("runs", "Root folder for run directories <out>/<env>__s<seed>__<time>/.")
    checkpoint_every: int = _flag(50_000, "Write a checkpoint every N steps (also on SIGINT/SIGTERM and at the end).")
    resume: str = _flag("", "Continue the run in this run directory or checkpoint file (its config is reused).")
    progress: bool = _flag(True, "Show a tqdm progress bar.")
    wandb: bool = _flag(False, "Also log to Weights & Biases (imported only when set).")
    wandb_project: str = _flag("cvl", "W&B project name.")


@dataclass(frozen=True)
class Config(RunConfig):
    """Every knob of a run. Defaults are the paper's offline setting (the `paper` preset) except three things (README
    Results): states are standardised by the dataset's mean and std, as TD3+BC does (the paper and the original code
    feed raw states: --no-normalize-states); the critic is contrastive TD with normalised bootstrap weights, the
    learned policy's future (the paper's binary NCE on the data's futures: --critic-loss nce; the original code's
    raw weights: --td-weights raw); and the policy step is AWR on the one-step TD advantage plus a push of
    the policy's mean up the critic's action gradient, the same size at every state (--actor-objective awr-push).
    The paper's actor, raw Q plus 0.05 BC, collapsed on hopper (--actor-objective q); AWR alone stays at behaviour
    cloning's level on halfcheetah (--actor-objective awr); TD3+BC's DDPG+BC step and its variants (--actor-objective
    ddpg, awr-ddpg) gain there as the push does but lose on a medium/random mix, where AWR and the push hold. Under
    that step the TD critic ties the NCE critic at 300k on both medium datasets, reaches that level by 30k rather
    than 300k on halfcheetah, and leads on the mix."""

    # --- algorithm
    repr_dim: int = _flag(16, "Size of the representations phi(s, a) and psi(g).")
    adam_eps: float = _flag(1e-7, "Adam epsilon.")
    gamma: float = _flag(0.99, "Discount: goals are s_{t+k} with P(k) proportional to gamma^(k-1).")
    critic_loss: str = _flag("td", "td: contrastive TD (the original code's use_td), the learned policy's future by "
                             "bootstrapping from s' with a target critic; nce: binary NCE (sigmoid) on B x B logits "
                             "against goals from the data's own futures (the paper's).", choices=("td", "nce"))
    repr_norm: str = _flag("none", "none: f = phi . psi as the original code; unit: the paper's unit-norm phi and psi, "
                           "f = scale * cos(phi, psi) + bias with a learned scale and bias (as SigLIP's sigmoid loss), "
                           "so an action can move Q only by where phi points, not by how long it is.",
                           choices=("none", "unit"))
    critics: int = _flag(1, "Independent critics trained side by side on the same batches; Q is the minimum of their "
                         "estimates, which penalises actions they disagree on (the original code's twin_q: 2).")
    action_negatives: int = _flag(0, "M: per row, M other actions a' at the same state s_i are scored against the "
                                  "row's own goal g_i, and a softmax over the data's action and the M others must "
                                  "pick the one that led to g_i, so the action, not only the state, has to carry the "
                                  "signal (Lu et al. 2023's contrastive energy prediction). 0: off, the paper's "
                                  "critic.")
    action_coef: float = _flag(1.0, "With --action-negatives: weight of that action loss beside the goal loss.")
    action_sampler: str = _flag("bc", "With --action-negatives: where a' comes from. bc: a behaviour-cloning policy "
                                "trained beside the critic, so the optimum stays f = log p(g|s,a)/p(g) up to a "
                                "function of (s, g) and Q keeps its meaning; uniform: U[-1, 1], which adds "
                                "log pi_beta(a|s) to f (an ablation: a biased critic).", choices=("bc", "uniform"))
    layer_norm: bool = _flag(False, "LayerNorm after every hidden layer of phi and psi (as ReBRAC and Zheng et al. "
                             "2023's stable contrastive RL).")
    normalize_states: bool = _flag(True, "Standardise states (the networks' state and goal inputs) by the dataset's "
                                   "per-dimension mean and std, as TD3+BC does; the statistics are saved with the "
                                   "parameters and the policy applies them to the env's observations. "
                                   "--no-normalize-states: raw states, as the paper and the original code.")
    tau: float = _flag(0.005, "With --critic-loss td: Polyak step of the target critic.")
    td_max_weight: float = _flag(20.0, "With --critic-loss td: clip the bootstrap weights exp(f_target) here.")
    td_weights: str = _flag("normalized", "With --critic-loss td: normalized: the bootstrap weights exp(f_target(s', "
                            "a', g_j)) divided by their mean over the batch's goals, so each row's bootstrapped "
                            "future keeps total mass 1 (a density ratio averages 1 over p(g)); raw: at face value "
                            "(the original code), which on raw states lost the mass of the one-step positive s' and "
                            "shrank every step.", choices=("normalized", "raw"))
    q_estimator: str = _flag("normalized", "normalized: sum_j softmax_j(f(s,a,g_j)) r_j over the batch's other rows' "
                             "goals, an estimate of (1 - gamma) Q; diag: exp(f(s,a,g_i)) r_i, row i's own goal "
                             "(original code); marginal: mean_j exp(f(s,a,g_j)) r_j over the other rows' goals.",
                             choices=("normalized", "diag", "marginal"))
    goal_reward: str = _flag("arrival", "r(g) for goal s_{t+k}: arrival: rewards[t+k-1], the reward of the step into "
                             "s_{t+k}, for which E[r(g)] / (1 - gamma) is exactly Q(s_t, a_t); goal: rewards[t+k], "
                             "the reward logged at the goal row (original code).", choices=("arrival", "goal"))
    actor_objective: str = _flag("awr-push", "awr-push: awr plus a push of the policy's mean up the critic's action "
                                 "gradient, the same size at every state (see --awr-push); awr: advantage-weighted "
                                 "regression on the dataset's actions (one-step offline RL), weights exp(awr_beta * A "
                                 "/ std(A)); q: maximise the Q estimate at the policy's reparameterised actions plus a "
                                 "BC term (the paper; see --bc-coef); ddpg: TD3+BC's normalised DDPG+BC, lambda Q(s, "
                                 "pi(s)) - (pi(s) - a)^2 with lambda = ddpg_alpha / mean|Q| (see --ddpg-lambda); "
                                 "awr-ddpg: ddpg with each row's BC term weighted by AWR's weights (divided by their "
                                 "batch mean).",
                                 choices=("awr-push", "awr", "q", "ddpg", "awr-ddpg"))
    bc_coef: float = _flag(0.05, "With --actor-objective q: weight of the behaviour-cloning term; 1.0 is pure "
                           "behaviour cloning.")
    awr_beta: float = _flag(0.5, "With --actor-objective awr, awr-ddpg or awr-push: inverse temperature on the "
                            "batch-standardised advantage (0: behaviour cloning).")
    awr_max_weight: float = _flag(100.0, "With --actor-objective awr, awr-ddpg or awr-push: clip the weights exp(beta "
                                  "A) at this value.")
    awr_advantage: str = _flag("td", "With --actor-objective awr, awr-ddpg or awr-push: td: A = (1 - gamma) r + "
                               "gamma V(s') - V(s) on the data's transition, which needs only the critic's ranking of "
                               "states; q: A = Q(s, a_data) - V(s), the critic's own action ranking. V(s) = mean Q(s, "
                               "a~pi).",
                               choices=("td", "q"))
    awr_push: float = _flag(0.05, "With --actor-objective awr-push: how far the push moves the policy's mean (before "
                            "tanh) up dQ/dmean, rms over the batch, against the weighted likelihood's pull.")
    ddpg_alpha: float = _flag(2.5, "With --ddpg-lambda q: the Q term's weight relative to the BC term, as "
                              "TD3+BC's alpha (its 2.5).")
    ddpg_lambda: str = _flag("q", "With --actor-objective ddpg or awr-ddpg: how the Q term is scaled. q: lambda = "
                             "ddpg_alpha / mean|Q| (TD3+BC); grad: lambda = ddpg_push / rms(dQ/da), so the Q term "
                             "pulls the action equally hard on every dataset however steep the critic is there.",
                             choices=("q", "grad"))
    ddpg_push: float = _flag(0.025, "With --ddpg-lambda grad: lambda times the batch's rms dQ/da (TD3+BC's 2.5 / "
                             "mean|Q| gave 0.026 on halfcheetah-medium-local and 0.07 on a medium/random mix).")
    alpha: float = _flag(0.0, "Entropy coefficient (0: no entropy bonus, as in the paper's offline setting).")
    auto_alpha: bool = _flag(False, "Tune alpha SAC-style towards entropy -|A| instead of a fixed --alpha.")
    actor_min_std: float = _flag(1e-6, "Lower bound of the std of the actor's Gaussian before tanh.")
    actor_max_std: float = _flag(math.exp(2.0), "Upper bound of that std (SAC-style actors clip log std at 2).")
    # --- execution
    devices: int = _flag(0, "Use this many devices for data parallelism (0: all).")
    distributed: bool = _flag(False, "Multi-host: call jax.distributed.initialize() (flags below or cluster env).")
    coordinator_address: str = _flag("", "With --distributed: host:port of process 0 (empty: from the cluster).")
    num_processes: int = _flag(0, "With --distributed: number of processes (0: from the cluster).")
    process_id: int = _flag(-1, "With --distributed: this process's index (-1: from the cluster).")
    # --- other modes
    evaluate: str = _flag("", "Only evaluate the policy in this run directory or checkpoint file; no training.")
    inspect: bool = _flag(False, "Only look at the dataset: print its episodes, how they end, return quartiles, "
                          "ranges and eval env, and write a histogram of episode returns to <out>/<data>_returns.png.")
    video: str = _flag("", "With --evaluate: write one episode to this .mp4 or .gif (offscreen MuJoCo).")
    video_steps: int = _flag(0, "With --video: record at most this many env steps (0: the whole episode).")
    preset: str = _flag("paper", "Named settings applied before explicit flags (listed at the end of --help).",
                        choices=("paper", "cpu"))


# Presets only set fields; an explicit flag always wins. `paper` is the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "cpu": dict(batch_size=256, hidden=(256, 256), steps=200_000, updates_per_call=500, eval_every=10_000,
                checkpoint_every=20_000),
}


def make_config(preset: str = "paper", **overrides) -> Config:
    """Config of a named preset with explicit overrides on top, e.g. make_config("cpu", steps=300)."""
    if preset not in PRESETS:
        raise CVLError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return Config(**{**PRESETS[preset], **overrides, "preset": preset})


class CVLError(Exception):
    """A problem with the user's input, reported as one line naming the problem and the fix."""


class Diverged(CVLError):
    """A loss or parameter became NaN/inf during training."""


class Stopped(SystemExit):
    """Training stopped by Ctrl-C or SIGTERM after saving its last finished step; exit code 128 + the signal."""


class WriteError(CVLError):
    """A file or folder could not be written (disk full, read-only, no permission)."""


def write_file(path: Path, write, what: str) -> Path:
    """Every file cvl.py writes goes through here. write(tmp) fills a temp file beside `path` (same suffix, for
    writers that go by the extension; named by this process, so two processes writing one file never share it),
    which is fsynced, then renamed over `path`. On any failure (disk full, read-only, no permission) the temp file
    is removed, a previous `path` is left intact, and one line names the file and the reason."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}{path.suffix}")
    PROCESS["writing"] += 1  # a signal now waits for this write (stop_process)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except Exception as e:  # OSError mostly; plotting and video libraries wrap it in their own types
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
        raise WriteError(f"cannot write {what} {path} ({reason})") from None
    finally:
        PROCESS["writing"] -= 1
        if not PROCESS["writing"] and "pending" in PROCESS:
            stop_process(*PROCESS.pop("pending"))
    return path


def make_dir(path: Path, what: str, fix: str = "choose a writable location") -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise WriteError(f"cannot create {what} {path} ({e.strerror or e}); {fix}") from None
    return path


# Flags that act only with one variant: flag -> (the flag that picks the variant, the values it acts with; None:
# any value above 0). Given with another variant, such a flag is an error, not silently ignored.
AWR_WEIGHTED = ("awr", "awr-ddpg", "awr-push")  # the actor objectives that weight rows by AWR's weights
DDPG_STEPS = ("ddpg", "awr-ddpg")  # the actor objectives that push a deterministic pi(s) up lambda Q (ddpg_bc)
ENTROPY_TERM = ("awr", "awr-push", "q")  # the actor objectives whose loss has the entropy term alpha log pi
VARIANT_FLAGS = {
    "tau": ("critic_loss", ("td",)), "td_max_weight": ("critic_loss", ("td",)),
    "td_weights": ("critic_loss", ("td",)),
    "action_coef": ("action_negatives", None), "action_sampler": ("action_negatives", None),
    "bc_coef": ("actor_objective", ("q",)), "ddpg_alpha": ("ddpg_lambda", ("q",)),
    "ddpg_lambda": ("actor_objective", DDPG_STEPS), "ddpg_push": ("ddpg_lambda", ("grad",)),
    "awr_beta": ("actor_objective", AWR_WEIGHTED), "awr_max_weight": ("actor_objective", AWR_WEIGHTED),
    "awr_advantage": ("actor_objective", AWR_WEIGHTED),
    "awr_push": ("actor_objective", ("awr-push",)),
    "alpha": ("actor_objective", ENTROPY_TERM), "auto_alpha": ("actor_objective", ENTROPY_TERM),
}


def idle_switches(cfg, name: str) -> list[tuple[str, tuple | None]]:
    """The switches on the variant flag `name`'s chain that are off under cfg, as (switch, the values it acts with);
    empty if the flag acts (--ddpg-push needs --ddpg-lambda grad, which needs --actor-objective ddpg or awr-ddpg)."""
    off = []
    while name in VARIANT_FLAGS:
        switch, acts_with = VARIANT_FLAGS[name]
        now = getattr(cfg, switch)
        if not (now > 0 if acts_with is None else now in acts_with):
            off.append((switch, acts_with))
        name = switch
    return off


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: batch_size -> --batch-size."""
    return "--" + field_name.replace("_", "-")


def check_ranges(cfg, positive=(), at_least_0=(), below_1=(), up_to_1=()) -> None:
    """One line for the first flag out of range: > 0, >= 0, in (0, 1), in (0, 1]."""
    for names, ok, what in ((positive, lambda x: x > 0, "be positive"), (at_least_0, lambda x: x >= 0, "be >= 0"),
                            (below_1, lambda x: 0 < x < 1, "be in (0, 1)"), (up_to_1, lambda x: 0 < x <= 1,
                                                                             "be in (0, 1]")):
        for name in names:
            if not ok(getattr(cfg, name)):
                raise CVLError(f"{flag_name(name)} must {what}, got {getattr(cfg, name)}")


def check_run_flags(cfg) -> None:
    """The checks every algorithm's config shares (the data, network size, run and evaluation flags)."""
    check_ranges(cfg, positive=("steps", "batch_size", "lr", "num_seeds", "updates_per_call", "eval_every",
                                "eval_episodes", "checkpoint_every"), at_least_0=("seed",))
    if not cfg.hidden or min(cfg.hidden) <= 0:
        raise CVLError(f"--hidden needs one or more positive widths, got {cfg.hidden}")
    if not cfg.dataset and not getattr(cfg, "evaluate", "") and not is_minari_id(cfg.env):  # a bad name or mirror
        d4rl_urls(cfg.env, cfg.d4rl_url)  # fails here, before anything else


def check_config(cfg: Config) -> None:
    """Range-check every flag, on every path (train, --resume, --evaluate, --inspect); one line per problem."""
    check_run_flags(cfg)
    check_ranges(cfg, positive=("repr_dim", "critics", "adam_eps", "actor_min_std", "awr_max_weight", "td_max_weight",
                                "ddpg_alpha", "ddpg_push", "awr_push"),
                 at_least_0=("devices", "alpha", "awr_beta", "video_steps", "num_processes", "action_negatives",
                             "action_coef"), below_1=("gamma",), up_to_1=("tau",))
    if cfg.process_id < -1:
        raise CVLError(f"--process-id must be >= 0 (or -1: from the cluster), got {cfg.process_id}")
    if not cfg.actor_max_std > cfg.actor_min_std:
        raise CVLError(f"--actor-max-std must be above --actor-min-std, got {cfg.actor_max_std} <= "
                       f"{cfg.actor_min_std}")
    if not 0.0 <= cfg.bc_coef <= 1.0:
        raise CVLError(f"--bc-coef must be in [0, 1], got {cfg.bc_coef}")
    if not cfg.resume:  # a resumed run keeps the settings it ran under
        for name in VARIANT_FLAGS:
            value, off = getattr(cfg, name), idle_switches(cfg, name)
            if value != getattr(Config, name) and off:
                now = " ".join(f"{flag_name(switch)} {getattr(cfg, switch)}" for switch, _ in off)
                needs = " and ".join(f"{flag_name(switch)} " + ("M (M > 0)" if acts_with is None else
                                                                 " or ".join(acts_with)) for switch, acts_with in off)
                raise CVLError(f"{flag_name(name)} {value} does nothing with {now}: add {needs}, or drop the flag")
    if cfg.batch_size < 2:
        raise CVLError(f"--batch-size {cfg.batch_size} leaves the critic no negatives (the other rows' goals); use "
                       f"2 or more (256 or 1024 as the presets)")
    if cfg.actor_objective in AWR_WEIGHTED and cfg.awr_advantage == "td" and cfg.goal_reward == "goal":
        raise CVLError("--goal-reward goal leaves r_t out of Q, so the TD advantage (1 - gamma) r_t + gamma V(s') - "
                       "V(s) would count it where V does not; use --goal-reward arrival (the default) with it, or "
                       "--awr-advantage q, or another --actor-objective")
    if cfg.actor_objective in AWR_WEIGHTED and cfg.awr_advantage == "td" and cfg.q_estimator != "normalized":
        raise CVLError(f"--awr-advantage td adds r to Q, so Q must be in the reward's units, which --q-estimator "
                       f"{cfg.q_estimator} is not; use --q-estimator normalized (the default) or the paper's actor "
                       f"(--actor-objective q)")


# ========================================================================================================== data
D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
# family -> (gymnasium eval env, D4RL reference min return, reference max return), from D4RL's infos.py.
D4RL_ENVS = {
    "halfcheetah": ("HalfCheetah-v4", -280.178953, 12135.0),
    "hopper": ("Hopper-v4", -20.272305, 3234.3),
    "walker2d": ("Walker2d-v4", 1.629008, 4592.3),
}
D4RL_KINDS = ("random", "medium", "medium-replay", "medium-expert", "expert", "full-replay")
D4RL_NAMES = [f"{env}-{kind}-v2" for env in D4RL_ENVS for kind in D4RL_KINDS]
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def d4rl_file(name: str) -> str:
    """D4RL's file name for a dataset name, e.g. halfcheetah-medium-v2 -> halfcheetah_medium-v2.hdf5."""
    env, kind = name[: -len("-v2")].split("-", 1)
    return f"{env}_{kind.replace('-', '_')}-v2.hdf5"


def d4rl_urls(name: str, base: str = "") -> list[str]:
    """Where D4RL's file for a dataset name may be, in the order tried, e.g. halfcheetah-medium-v2 ->
    [BASE/gym_mujoco_v2/halfcheetah_medium-v2.hdf5] on D4RL's host. A mirror BASE is tried in D4RL's layout, then
    flat (BASE/halfcheetah_medium-v2.hdf5, as e.g. a Hugging Face dataset repo keeps them); a BASE containing
    {file} is used as given, with the file name put in its place."""
    if name not in D4RL_NAMES:
        close = difflib.get_close_matches(name, D4RL_NAMES, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(D4RL_NAMES[:5])}, ..."
        raise CVLError(f"unknown D4RL env {name!r}: {hint} (or pass --dataset PATH, or a Minari id)")
    file = d4rl_file(name)
    source = "--d4rl-url" if base else "CVL_D4RL_URL"
    mirror = base or os.environ.get("CVL_D4RL_URL", "")
    base = (mirror or D4RL_URL).rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https", "file"):
        raise CVLError(f"{source} {base!r} is not an http(s):// or file:// URL; give the mirror's base URL, e.g. "
                       f"https://example.org/d4rl")
    if "{file}" in base:
        return [base.replace("{file}", file)]
    return [f"{base}/gym_mujoco_v2/{file}"] + ([f"{base}/{file}"] if mirror else [])


def d4rl_cache_dir() -> Path:
    """D4RL's own cache, so files a user already has are found: $D4RL_DATASET_DIR or ~/.d4rl/datasets."""
    return Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


class NotFound(CVLError):
    """The server answered 404."""


def download(urls: str | list[str], path: Path) -> Path:
    """Download from the first of `urls` that exists (404: try the next)."""
    urls = [urls] if isinstance(urls, str) else urls
    for url in urls:
        try:
            return download_from(url, path)
        except NotFound:
            continue
    raise CVLError(f"{' and '.join(urls)} do not exist (HTTP 404); check --d4rl-url (a mirror's base URL, or a URL "
                   f"with {{file}} in place of the file name), or download the file yourself and place it at {path}")


def download_from(url: str, path: Path, chunk: int = 1 << 20) -> Path:
    """Stream url into path + '.part' (resuming a previous partial download), verify, then rename to path.

    The final name only ever holds a complete, verified file; an interrupted transfer keeps only the .part file,
    which the next call resumes with an HTTP Range request.
    """
    make_dir(path.parent, "the D4RL dataset folder", "set D4RL_DATASET_DIR to a writable folder")
    part = path.with_name(path.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    by_hand = f"use a mirror with --d4rl-url, or download it yourself from {url} and place it at {path}"
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # the server ignored Range: start again
                have = 0
            total = response.headers.get("Content-Length")
            total = int(total) + have if total is not None else None
            with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=f"download {path.name}"
            ) as bar:
                while block := response.read(chunk):
                    f.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as e:  # HTTPError is a URLError
        if isinstance(e, urllib.error.HTTPError) and e.code == 404:
            raise NotFound(url) from None
        raise CVLError(f"download of {url} failed ({e}); run again to resume, or {by_hand}") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise CVLError(f"download of {url} stopped at {size} of {total} bytes; run again to resume, or {by_hand}")
    try:
        read_dataset_file(part, name_for_errors=url, fix="the server sent something else")
    except CVLError as e:
        part.unlink()
        raise CVLError(f"downloaded file from {url} is not a valid D4RL dataset ({e}); {by_hand}") from None
    os.replace(part, path)
    return path


def resolved_dataset(path) -> Path:
    """The absolute path of a --dataset, with a symbolic link loop a one-line error."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # a loop: RuntimeError before Python 3.13, OSError (ELOOP) after
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise
        raise CVLError(f"dataset {path} is a symbolic link loop; point --dataset at the file itself") from None


def read_dataset_file(path: Path, name_for_errors: str | None = None,
                      fix: str = "check that it is a complete .hdf5 or .npz file") -> dict[str, np.ndarray]:
    """Read a D4RL-layout .hdf5 or .npz file into numpy arrays (required keys plus optional next_observations).
    `fix` is the advice when the file cannot be read (for a downloaded file: delete it and download it again)."""
    where = name_for_errors or str(path)
    path = Path(path)
    try:
        kind = resolved_dataset(path).stat().st_mode
    except OSError:
        raise CVLError(f"dataset file {where} does not exist; check the path or pass --env NAME to download one") \
            from None
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
        raise CVLError(f"dataset {where} is not a regular file (a pipe, socket or device); pass a .hdf5 or .npz "
                       f"file")
    if path.is_dir():
        raise CVLError(f"dataset {where} is a directory; pass the .hdf5 or .npz file inside it")
    if not os.access(path, os.R_OK):
        raise CVLError(f"dataset file {where} cannot be read (permission denied); check its permissions")
    keys = REQUIRED_KEYS + ("next_observations",)
    try:
        if str(path).endswith(".npz"):
            with np.load(path) as f:
                raw = {k: np.asarray(f[k]) for k in keys if k in f}
        else:
            import h5py

            with h5py.File(path, "r") as f:
                raw = {k: np.asarray(f[k]) for k in keys if k in f}
    except Exception as e:  # h5py/zipfile raise many types for a damaged file
        raise CVLError(f"dataset file {where} cannot be read ({type(e).__name__}: {e}); {fix}") from None
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise CVLError(f"dataset file {where} lacks key(s) {', '.join(missing)}; D4RL layout needs "
                       f"{', '.join(REQUIRED_KEYS)}")
    return raw


def resolve_dataset(cfg: Config) -> Path:
    """The dataset file for this config: --dataset, else the D4RL cache, downloading if needed."""
    if cfg.dataset:
        return Path(cfg.dataset).expanduser()
    urls = d4rl_urls(cfg.env, cfg.d4rl_url)  # checks the name first
    path = d4rl_cache_dir() / d4rl_file(cfg.env)
    return path if path.exists() else download(urls, path)


# Minari (Farama's maintained home of offline RL data): an id is namespace/name-vN, e.g. mujoco/hopper/medium-v0.
MINARI_VERSION = "0.5.4"


def is_minari_id(name: str) -> bool:
    return "/" in name and re.fullmatch(r"[\w.-]+(/[\w.-]+)+-v\d+", name) is not None


def minari_dir() -> Path:
    """Minari's own dataset folder: $MINARI_DATASETS_PATH or ~/.minari/datasets."""
    return Path(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")).expanduser()


def minari_dataset(name: str):
    """The Minari dataset `name`, from minari_dir() when there, else downloaded by the minari package itself."""
    try:
        import minari
    except ImportError:
        raise CVLError(f"Minari ids need the minari package: pip install 'minari[hf]=={MINARI_VERSION}'") from None
    local = minari.list_local_datasets()
    if name not in local:
        where = minari_dir() / name
        try:
            remote = minari.list_remote_datasets(prefix=name.split("/")[0])
        except Exception as e:  # no network: minari's HTTP clients raise their own types
            raise CVLError(f"Minari dataset {name!r} is not in {minari_dir()} and Minari's server cannot be reached "
                           f"({type(e).__name__}); on a machine with internet run `minari download {name}` and copy "
                           f"the folder to {where} (or set MINARI_DATASETS_PATH)") from None
        if name not in remote:
            close = difflib.get_close_matches(name, sorted({*local, *remote}), n=3, cutoff=0.5)
            raise CVLError(f"unknown Minari dataset {name!r}: "
                           + (f"did you mean {', '.join(close)}?" if close else "no local or remote id is close")
                           + f" (local ones are in {minari_dir()})")
        try:
            minari.download_dataset(name)
        except Exception as e:
            raise CVLError(f"download of Minari dataset {name!r} failed ({type(e).__name__}: {e}); run again, or "
                           f"download it elsewhere and copy it to {where}") from None
    try:
        return minari.load_dataset(name)
    except Exception as e:
        raise CVLError(f"Minari dataset {name!r} in {minari_dir()} cannot be read ({type(e).__name__}: {e}); "
                       f"delete {minari_dir() / name} and run again to download it again") from None


def minari_arrays(dataset) -> dict[str, np.ndarray]:
    """Minari's episodes flattened into D4RL's arrays. An episode stores T + 1 observations and T of the rest, so
    row t is (observations[t], actions[t], rewards[t], observations[t + 1]); terminations are D4RL's terminals and
    truncations its timeouts. A terminated episode's last transition is kept, with its reward."""
    parts: dict[str, list] = {k: [] for k in (*REQUIRED_KEYS, "next_observations")}
    try:
        episodes = list(dataset.iterate_episodes())
    except Exception as e:  # a damaged data file: h5py and minari raise many types
        name = dataset.spec.dataset_id
        raise CVLError(f"Minari dataset {name!r}'s data cannot be read ({type(e).__name__}: {e}); delete "
                       f"{minari_dir() / name} and run again to download it again") from None
    for ep in episodes:
        if isinstance(ep.observations, dict) or isinstance(ep.actions, dict):
            raise CVLError(f"Minari dataset {dataset.spec.dataset_id!r} has dict observations or actions; CVL needs "
                           f"flat Box spaces")
        obs = np.asarray(ep.observations, np.float32)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions, np.float32))
        parts["rewards"].append(np.asarray(ep.rewards, np.float32))
        parts["terminals"].append(np.asarray(ep.terminations, bool))
        parts["timeouts"].append(np.asarray(ep.truncations, bool))
    if not parts["observations"]:
        raise CVLError(f"Minari dataset {dataset.spec.dataset_id!r} has no episodes")
    return {k: np.concatenate(v) for k, v in parts.items()}


def minari_eval_spec(dataset, eval_env: str = "") -> tuple[str, float | None, float | None]:
    """Eval env from the dataset's own env spec; normalised scores from its ref_min_score / ref_max_score (x 100,
    to read like D4RL's)."""
    meta = dataset.storage.metadata
    spec = meta.get("eval_env_spec") or meta.get("env_spec")  # JSON of a gymnasium EnvSpec
    if not eval_env and not spec:
        raise CVLError(f"Minari dataset {dataset.spec.dataset_id!r} records no env; pass --eval-env")
    lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
    return eval_env or json.loads(spec)["id"], None if lo is None else float(lo), None if hi is None else float(hi)


def run_label(cfg: Config) -> str:
    """Name of the data in logs and run folders: the D4RL or Minari name, or the dataset file's stem."""
    return Path(cfg.dataset).stem.replace("_", "-") if cfg.dataset else cfg.env.replace("/", "-")


def eval_env_spec(cfg: Config) -> tuple[str, float | None, float | None]:
    """(gymnasium env id, reference min return, reference max return) for evaluation and normalised scores."""
    if not cfg.dataset and is_minari_id(cfg.env):
        return minari_eval_spec(minari_dataset(cfg.env), cfg.eval_env)
    family = run_label(cfg).split("-")[0].lower()
    if cfg.eval_env:
        by_env = {v[0].split("-")[0].lower(): v for v in D4RL_ENVS.values()}
        _, lo, hi = by_env.get(cfg.eval_env.split("-")[0].lower(), (None, None, None))
        return cfg.eval_env, lo, hi
    if family not in D4RL_ENVS:
        raise CVLError(f"cannot infer the evaluation env from {run_label(cfg)!r}; pass --eval-env, e.g. Hopper-v4")
    return D4RL_ENVS[family]


def split_episodes(raw: dict[str, np.ndarray]) -> np.ndarray:
    """For every row t, the index of the last row of t's episode.

    An episode ends at terminals | timeouts, where next_observations[t] != observations[t+1], and at the end.
    """
    n = len(raw["observations"])
    done = raw["terminals"].astype(bool) | raw["timeouts"].astype(bool)
    if "next_observations" in raw:
        done[:-1] |= np.any(raw["next_observations"][:-1] != raw["observations"][1:], axis=-1)
    done[-1] = True
    ends = np.flatnonzero(done)
    return ends[np.searchsorted(ends, np.arange(n))]


MAX_OBSERVATION = 1e6  # |observation| above this overflows float32 arithmetic in the networks' first layers


def validate_dataset(raw: dict[str, np.ndarray], where: str, obs_dim: int, act_dim: int,
                     act_low: float = -1.0, act_high: float = 1.0, clip_tol: float = 1e-3) -> dict[str, np.ndarray]:
    """Check a dataset against the eval env; each problem is one line naming the file, key and row."""
    for key, x in raw.items():
        if x.ndim == 0 or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise CVLError(f"{where}: key {key!r} holds {'a scalar' if x.ndim == 0 else x.dtype} values, not one "
                           f"number (or vector) per row; store it as a numeric array with one row per transition")
    n = len(raw["observations"])
    if n == 0:
        raise CVLError(f"{where}: the dataset has no rows; it needs transitions in every key")
    # D4RL's files store (N,) scalars; (N, 1) is a common variant of the same thing
    raw = {k: x[:, 0] if k in ("rewards", "terminals", "timeouts") and x.shape[1:] == (1,) else x
           for k, x in raw.items()}
    for key in raw:
        if len(raw[key]) != n:
            raise CVLError(f"{where}: key {key!r} has {len(raw[key])} rows but observations has {n}; "
                           f"all keys must have one row per transition")
    for key, dim in (("observations", obs_dim), ("actions", act_dim), ("next_observations", obs_dim)):
        if key in raw and (raw[key].ndim != 2 or raw[key].shape[1] != dim):
            raise CVLError(f"{where}: key {key!r} has shape {raw[key].shape} but the eval env needs (N, {dim}); "
                           f"pass the matching --eval-env")
    for key in ("rewards", "terminals", "timeouts"):
        if raw[key].ndim != 1:
            raise CVLError(f"{where}: key {key!r} has shape {raw[key].shape}; expected (N,), one value per row")
    for key in ("terminals", "timeouts"):
        flag_ok = (raw[key] == 0) | (raw[key] == 1)
        if not flag_ok.all():
            row = int(np.argmin(flag_ok))
            raise CVLError(f"{where}: key {key!r} row {row} is {raw[key][row]}, not 0 or 1 (True or False); store "
                           f"{key} as booleans")
    for key in ("observations", "actions", "rewards", "next_observations"):
        if key in raw:
            bad = ~np.isfinite(raw[key].reshape(n, -1)).all(axis=1)
            if bad.any():
                raise CVLError(f"{where}: key {key!r} row {int(np.argmax(bad))} is NaN or inf "
                               f"({int(bad.sum())} such rows); fix or drop those rows")
    for key in ("observations", "next_observations"):
        big = np.abs(raw[key]).max(axis=1) > MAX_OBSERVATION if key in raw else np.zeros(0, bool)
        if big.any():
            row = int(np.argmax(big))
            raise CVLError(f"{where}: key {key!r} row {row} holds {np.abs(raw[key][row]).max():.3g}, too large for "
                           f"the networks' float32 arithmetic; rescale the observations (e.g. standardise each "
                           f"dimension, or divide by a constant) to below {MAX_OBSERVATION:.0e}")
    actions = raw["actions"]
    excess = np.maximum(actions - act_high, act_low - actions).max(axis=1)
    if excess.max() > clip_tol:
        row = int(np.argmax(excess))
        bounds = (f"[{np.min(act_low):g}, {np.max(act_high):g}]" if np.ndim(act_low) == 0 or
                  (np.all(act_low == np.min(act_low)) and np.all(act_high == np.max(act_high))) else
                  f"{np.asarray(act_low).tolist()} to {np.asarray(act_high).tolist()}")
        raise CVLError(f"{where}: key 'actions' row {row} is outside the env's bounds {bounds} "
                       f"by {excess[row]:.3g}; rescale the actions to the env's action space")
    if excess.max() > 0:
        warnings.warn(f"{where}: {int((excess > 0).sum())} actions exceed the bounds by at most "
                      f"{excess.max():.2g}; clipped", stacklevel=2)
        raw = {**raw, "actions": np.clip(actions, act_low, act_high)}
    if not len(rows_with_future(*goal_ranges(raw))):
        raise CVLError(f"{where}: no episode has more than one step or ends by a termination, so no transition "
                       f"has a future goal; check the terminals and timeouts keys")
    return raw


class Data(NamedTuple):
    """The whole dataset as device arrays; goal sampling indexes into it inside the jitted step.

    Row j holds (s_j, a_j, r_j, s_{j+1}). A goal k steps after row t is the state s_{t+k} = next_observations[j]
    with j = t + k - 1, and the reward earned on arriving there is rewards[j].
    """

    observations: jax.Array  # [N, obs_dim] s_j
    actions: jax.Array  # [N, act_dim] a_j
    rewards: jax.Array  # [N] r_j, paid for the step s_j -> s_{j+1}
    next_observations: jax.Array  # [N, obs_dim] s_{j+1}: the file's, else the next row's (see known_end)
    episode_end: jax.Array  # [N] last row e of each row's episode
    known_end: jax.Array  # [N] last row of the episode whose next state is known: e, or e - 1 if not stored
    terminal: jax.Array  # [N] bool: the row's episode ends by a true termination (terminals[e])
    anchors: jax.Array  # [M] rows that have a future: the only rows drawn


def goal_ranges(raw: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: (last row of its episode, last row whose next state is known, episode ends by a termination)."""
    episode_end = split_episodes(raw)
    known_end = episode_end if "next_observations" in raw else episode_end - 1  # D4RL files may omit s_{e+1}
    return episode_end, known_end, raw["terminals"].astype(bool)[episode_end]


def rows_with_future(episode_end, known_end, terminal) -> np.ndarray:
    """A terminated episode's rows always have a future (the absorbing state at least); a cut episode's rows
    need a known next state."""
    return np.flatnonzero(terminal | (known_end >= np.arange(len(episode_end))))


def make_data(raw: dict[str, np.ndarray]) -> Data:
    episode_end, known_end, terminal = goal_ranges(raw)
    obs = raw["observations"].astype(np.float32)
    # s_{j+1}: the file's, else the next row (a placeholder at the episode's last row, never drawn: see known_end)
    next_obs = raw["next_observations"] if "next_observations" in raw else np.concatenate([obs[1:], obs[-1:]])
    return Data(
        observations=obs,
        actions=raw["actions"].astype(np.float32),
        rewards=raw["rewards"].astype(np.float32),
        next_observations=next_obs.astype(np.float32),
        episode_end=episode_end.astype(np.int32),
        known_end=known_end.astype(np.int32),
        terminal=terminal,
        anchors=rows_with_future(episode_end, known_end, terminal).astype(np.int32),
    )


# ================================================================================================ goal sampling
class Batch(NamedTuple):
    observations: jax.Array  # s_t
    actions: jax.Array  # a_t
    goals: jax.Array  # s_{t+k} (any valid state where absorbing)
    absorbing: jax.Array  # the goal is the absorbing state after a termination
    goal_rewards: jax.Array  # r(g): rewards[t+k-1] ("arrival") or rewards[t+k] ("goal"); 0 once absorbed
    next_observations: jax.Array  # s_{t+1} (contrastive TD's positive goal)
    next_absorbing: jax.Array  # s_{t+1} is not stored and the episode fell there: the absorbing state stands in
    done: jax.Array  # row t ends its episode by a true termination: nothing but the absorbing state follows
    rewards: jax.Array  # r_t, paid for the step s_t -> s_{t+1} (the TD advantage of --awr-advantage td)


def sample_future_offset(key: jax.Array, horizon: jax.Array, gamma: float) -> jax.Array:
    """k in {1..horizon} with P(k) proportional to gamma^(k-1), by inverting the truncated geometric CDF.

    CDF(k) = (1 - gamma^k) / (1 - gamma^horizon), so k = ceil(log(1 - u (1 - gamma^horizon)) / log gamma).
    A huge horizon (gamma^horizon = 0) gives the untruncated geometric.
    """
    u = jax.random.uniform(key, horizon.shape)
    k = jnp.ceil(jnp.log1p(-u * (1.0 - gamma ** horizon.astype(jnp.float32))) / math.log(gamma))
    return jnp.clip(k.astype(jnp.int32), 1, horizon)


NO_TRUNCATION = 2 ** 30  # a horizon whose gamma^horizon is 0 in float32


def sample_goals(data: Data, key: jax.Array, t: jax.Array, gamma: float, reward_kind: str):
    """For rows t, a goal from the discounted future of (s_t, a_t): (goal states, absorbing, goal rewards).

    The future puts mass (1 - gamma) gamma^(k-1) on s_{t+k}.
    - Episode ended by a true termination at row e: the agent then stays in an absorbing state with reward 0 for
      ever, so k is the untruncated geometric, and every k past the last state s_{e+1} lands there. The fall
      itself, s_{e+1} = next_observations[e], is an ordinary goal whose arrival reward is the last reward r_e.
    - Episode cut by a time limit (or the data's end): what follows is unknown, so the geometric is truncated to
      the known states and renormalised.
    Hence E[r(g)] = (1 - gamma) sum_k gamma^k r_{t+k} with zeros after a fall, and the renormalised truncated sum
    after a timeout, for arrival rewards (see goal_reward_at).
    """
    terminal, known_end, end = data.terminal[t], data.known_end[t], data.episode_end[t]
    k = sample_future_offset(key, jnp.where(terminal, NO_TRUNCATION, known_end - t + 1), gamma)
    j = t + k - 1  # row whose next state is the goal
    absorbing = j > known_end  # only reachable when terminal (a terminal row without a stored s_{e+1} too)
    goals = data.next_observations[jnp.clip(j, 0, known_end)]
    return goals, absorbing, goal_reward_at(data, j, end, reward_kind)


def goal_reward_at(data: Data, j: jax.Array, end: jax.Array, kind: str) -> jax.Array:
    """r(g) for the goal g = s_{j+1}, reached from row j, in an episode whose last row is `end`.

    D4RL's rewards[j] pays for the step s_j -> s_{j+1}, so the reward earned on reaching g is rewards[j]
    ("arrival"): with P(k) ~ gamma^(k-1), sum_k P(k) rewards[t+k-1] = (1 - gamma) Q(s_t, a_t). The original code
    uses the reward logged at the goal row, rewards[j + 1] ("goal"), which leaves out r_t, the reward a_t earns
    itself. Rows past the episode's end (the absorbing state) earn 0."""
    row = j if kind == "arrival" else j + 1
    return jnp.where(row <= end, data.rewards[jnp.minimum(row, end)], 0.0)


def sample_batch(data: Data, key: jax.Array, batch_size: int, gamma: float, reward_kind: str) -> Batch:
    """B transitions uniformly among rows with a future, each with a goal from its own episode's future."""
    k_row, k_offset = jax.random.split(key)
    t = data.anchors[jax.random.randint(k_row, (batch_size,), 0, data.anchors.shape[0])]
    return batch_at(data, k_offset, t, gamma, reward_kind)


def batch_at(data: Data, key: jax.Array, t: jax.Array, gamma: float, reward_kind: str) -> Batch:
    """The transitions of rows t (rows with a future), each with a goal from its own episode's future."""
    goals, absorbing, goal_rewards = sample_goals(data, key, t, gamma, reward_kind)
    return Batch(data.observations[t], data.actions[t], goals, absorbing, goal_rewards, data.next_observations[t],
                 t > data.known_end[t], data.terminal[t] & (t == data.episode_end[t]), data.rewards[t])


# ===================================================================================================== networks
class MLP(nn.Module):
    hidden: Sequence[int]
    out: int
    kernel_init: Any = nn.initializers.lecun_normal()
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.Dense(width, kernel_init=self.kernel_init)(x)
            x = nn.relu(nn.LayerNorm()(x) if self.layer_norm else x)
        return nn.Dense(self.out, kernel_init=self.kernel_init)(x)


class Networks(NamedTuple):
    phi: MLP  # (s, a) -> repr_dim
    psi: MLP  # g -> repr_dim
    actor: MLP  # s -> (mean, pre-softplus std) of the Gaussian before tanh


def make_networks(cfg: Config, act_dim: int) -> Networks:
    encoder = partial(MLP, cfg.hidden, cfg.repr_dim, nn.initializers.glorot_uniform(),  # as the original code
                      layer_norm=cfg.layer_norm)
    return Networks(phi=encoder(), psi=encoder(), actor=MLP(cfg.hidden, 2 * act_dim, nn.initializers.lecun_uniform()))


def unit(x):
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


def is_unit_norm(critic: dict) -> bool:
    """With --repr-norm unit the critic carries a learned logit scale and bias."""
    return "log_scale" in critic


def state_normalizer(observations: np.ndarray) -> dict:
    """--normalize-states: the dataset's per-dimension mean and std (+ 1e-3, as TD3+BC's), stored as params["obs"]
    of the critic and the actor."""
    return {"mean": observations.mean(axis=0).astype(np.float32),
            "std": (observations.std(axis=0) + 1e-3).astype(np.float32)}


def standardize(params: dict, s):
    """A state in the units its network sees: (s - mean) / std with --normalize-states, s itself without. The
    statistics are never trained (no gradient reaches them, so Adam leaves them exactly as they were)."""
    if "obs" not in params:
        return s
    norm = jax.lax.stop_gradient(params["obs"])
    return (s - norm["mean"]) / norm["std"]


def sa_features(nets: Networks, critic: dict, s, a):
    """phi(s, a); with --repr-norm unit, scale * phi / |phi|.

    Why unit norm (the paper's choice): with f = phi . psi the length of phi scales every logit of a row, so it
    sets how sharply the softmax over goals picks the high-reward ones, and an action the data never took is free
    to get a long phi (on halfcheetah-medium-local at 50k steps a uniformly random action had the longer phi 73-81%
    of the time). Unit vectors leave the action only the direction of phi. It did not make the critic rank
    actions better there (README Results, screen part 2): the length amplified a wrong direction."""
    phi = nets.phi.apply(critic["phi"], jnp.concatenate([standardize(critic, s), a], axis=-1))
    return jnp.exp(critic["log_scale"]) * unit(phi) if is_unit_norm(critic) else phi


def logit_bias(critic: dict):
    """The learned bias of every logit with --repr-norm unit; 0 otherwise."""
    return critic["bias"] if is_unit_norm(critic) else 0.0


def pair_logits(critic: dict, phi, psi):
    """f(s_i, a_i, g_j) = phi_i . psi_j (+ the bias) for all pairs."""
    return phi @ psi.T + logit_bias(critic)


def goal_features(nets: Networks, critic: dict, g, absorbing):
    """psi(g), with one learned vector for the absorbing state (unit vectors with --repr-norm unit).

    Every episode that ends in a fall ends in the same absorbing state (reward 0 for ever), so it is one point of
    the goal space, not a function of the last observation: a single vector lets the critic learn
    p(absorbed | s, a) / p(absorbed), and it cannot be confused with any real state. (The fall itself, s_{e+1},
    stays an ordinary goal.)
    """
    if is_ensemble(critic):
        return jax.vmap(goal_features, in_axes=(None, 0, None, None))(nets, critic, g, absorbing)
    psi = jnp.where(absorbing[:, None], critic["absorbing"], nets.psi.apply(critic["psi"], standardize(critic, g)))
    return unit(psi) if is_unit_norm(critic) else psi


def is_ensemble(critic: dict) -> bool:
    """With --critics > 1 every leaf of the critic has a leading ensemble axis."""
    return critic["absorbing"].ndim == 2


def critic_logits(nets: Networks, critic: dict, s, a, g, absorbing):
    """f(s_i, a_i, g_j) = phi(s_i, a_i) . psi(g_j) for all pairs: [B, B], plus psi(g) for reuse."""
    psi = goal_features(nets, critic, g, absorbing)
    return pair_logits(critic, sa_features(nets, critic, s, a), psi), psi


def actor_dist(nets: Networks, actor, s, cfg: Config):
    """Mean and std of the Gaussian before tanh. The std is clipped to [actor_min_std, actor_max_std], i.e. log std
    to a fixed range as SAC-style actors do, so no data (e.g. actions at the bounds) can drive it to 0 or infinity."""
    mean, pre_std = jnp.split(nets.actor.apply(actor, standardize(actor, s)), 2, axis=-1)
    return mean, jnp.clip(jax.nn.softplus(pre_std), cfg.actor_min_std, cfg.actor_max_std)


def policy_action(nets: Networks, actor, s, key, cfg: Config):
    """One action a ~ pi(. | s) per row: tanh of a sample of the Gaussian."""
    mean, std = actor_dist(nets, actor, s, cfg)
    return jnp.tanh(mean + std * jax.random.normal(key, mean.shape))


def tanh_gaussian_log_density(mean, std, u):
    """Per dimension, log density of tanh(u) for u ~ N(mean, std): Gaussian log density minus log|d tanh(u)/du|."""
    gauss = -0.5 * ((u - mean) / std) ** 2 - jnp.log(std) - 0.5 * math.log(2 * math.pi)
    log_det = 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))  # = log(1 - tanh(u)^2), stable
    return gauss - log_det


def tanh_gaussian_log_prob(mean, std, u):
    """log pi(tanh(u)) for u ~ N(mean, std), summed over dims."""
    return jnp.sum(tanh_gaussian_log_density(mean, std, u), axis=-1)


def eval_action(nets: Networks, actor, s):
    """Deterministic action tanh(mean)."""
    return jnp.tanh(jnp.split(nets.actor.apply(actor, standardize(actor, s)), 2, axis=-1)[0])


# ======================================================================================================= losses
# Critic losses. Each maps (critic params, train state, batch) to (loss, (metrics, psi of the batch's goals)); the
# batch's goals g_j double as the negatives: samples of the marginal p(g).
def contrastive_metrics(loss, logits):
    """Diagnostics of a B x B logit matrix whose diagonal holds the positives."""
    diag = jnp.diagonal(logits)
    return dict(
        critic_loss=loss,
        binary_accuracy=jnp.mean((logits > 0) == jnp.eye(logits.shape[0], dtype=bool)),
        categorical_accuracy=jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0])),
        logits_pos=diag.mean(),
        logits_neg=(logits.sum() - diag.sum()) / (logits.size - diag.size),
        logsumexp=jax.nn.logsumexp(logits, axis=1).mean(),
    )


def critic_loss_nce(critic, state, batch: Batch, key, cfg: Config, nets: Networks, shard):
    """Binary NCE (the paper's): each (s_i, a_i) against its own future goal g_i (label 1) and the batch's other
    goals (label 0), a sigmoid cross-entropy on every entry of the B x B logits."""
    logits, psi = critic_logits(nets, critic, batch.observations, batch.actions, batch.goals, batch.absorbing)
    logits = shard(logits, "data", None)  # each device holds its (B/n) x B block: all B-1 negatives per sample
    loss = optax.sigmoid_binary_cross_entropy(logits, jnp.eye(logits.shape[0], dtype=logits.dtype)).mean()
    return loss, (contrastive_metrics(loss, logits), psi)


def critic_loss_td(critic, state, batch: Batch, key, cfg: Config, nets: Networks, shard):
    """Contrastive TD (the original code's use_td): the future of the *learned* policy, by bootstrapping.

    The discounted future of (s, a) under pi is (1 - gamma) delta(s') + gamma E_{a' ~ pi(s')} [future of (s', a')].
    Binary NCE against marginal goals g_j then has positives s' with weight 1 - gamma, and each marginal goal g_j as
    a positive with weight gamma w_ij, where w_ij = exp(f_target(s'_i, a'_i, g_j)) (the target critic's density
    ratio, C / (1 - C) of its sigmoid) clipped at td_max_weight, besides its usual weight 1 as a negative. After a
    fall only the absorbing state follows: w is then 1 / P(absorbing) on absorbing goals and 0 on the others.
    """
    phi = sa_features(nets, critic, batch.observations, batch.actions)
    psi = goal_features(nets, critic, batch.goals, batch.absorbing)
    psi_next = goal_features(nets, critic, batch.next_observations, batch.next_absorbing)
    pos = jnp.sum(phi * psi_next, axis=-1) + logit_bias(critic)  # f(s_i, a_i, s'_i), row by row
    logits = shard(pair_logits(critic, phi, psi), "data", None)  # f(s_i, a_i, g_j)

    next_a = policy_action(nets, state.actor, batch.next_observations, key, cfg)
    f_next = target_logits(nets, state.critic_target, batch.next_observations, next_a, batch.goals, batch.absorbing)
    p_absorbing = jnp.maximum(batch.absorbing.mean(), 1.0 / batch.absorbing.shape[0])
    w = jnp.where(batch.done[:, None], batch.absorbing[None, :] / p_absorbing, TD_WEIGHTS[cfg.td_weights](f_next))
    w = jax.lax.stop_gradient(jnp.minimum(w, cfg.td_max_weight))

    off = 1.0 - jnp.eye(logits.shape[0], dtype=logits.dtype)  # g_i is from row i's own future: not a marginal sample
    bce = optax.sigmoid_binary_cross_entropy
    neg = (cfg.gamma * w * bce(logits, 1.0) + bce(logits, 0.0)) * off
    loss = jnp.mean((1 - cfg.gamma) * bce(pos, 1.0) + neg.sum(axis=1) / off.sum(axis=1))
    metrics = contrastive_metrics(loss, logits - jnp.diag(jnp.diagonal(logits) - pos))  # positives s' on the diagonal
    return loss, ({**metrics, "td_weight_mean": (w * off).sum() / off.sum()}, psi)


def target_logits(nets: Networks, target: dict, s, a, g, absorbing):
    """f_target(s_i, a_i, g_j) for all pairs; with --critics > 1 the minimum over the target twins, so every member
    bootstraps from the same pessimistic density ratio (the original code's twin_q)."""
    if is_ensemble(target):
        each = jax.vmap(target_logits, in_axes=(None, 0, None, None, None, None))(nets, target, s, a, g, absorbing)
        return each.min(axis=0)
    return pair_logits(target, sa_features(nets, target, s, a), goal_features(nets, target, g, absorbing))


def td_weights_raw(f_next):
    """The original code: w_ij = exp(f_target(s'_i, a'_i, g_j)), the target's density ratio at face value."""
    return jnp.exp(f_next)


def td_weights_normalized(f_next):
    """w_ij = exp(f_ij) / mean_{k != i} exp(f_ik): a density ratio p(g | s', a') / p(g) averages 1 over the marginal
    goals, so this keeps each row's bootstrapped future a distribution. Raw weights do not stay there: the positive
    s' puts mass (1 - gamma) on one point that no marginal goal g_j lands on, so the target's mean exp(f) over the
    batch's goals comes out near gamma times the previous one, and the multi-step part of the future fades until the
    critic is a one-step model (measured, --critics 2, cpu preset: the mean weight fell from 0.79 to 0.28 on
    halfcheetah-medium-local and from 0.50 to 0.15 on hopper-medium-local between steps 5k and 30k)."""
    n = f_next.shape[1] - 1
    return n * jax.nn.softmax(off_diagonal(f_next), axis=1)  # the diagonal (row i's own goal) gets 0; it is masked


CRITIC_LOSSES = {"nce": critic_loss_nce, "td": critic_loss_td}
TD_WEIGHTS = {"raw": td_weights_raw, "normalized": td_weights_normalized}


# Contrasting actions at the same state (--action-negatives M). With the batch's other goals as negatives the critic
# learns log p(g|s,a)/p(g), and at gamma 0.99 almost all of that is the state: it ranks states, not actions. Here
# row i's own goal g_i is scored against its data action a_i and M actions a'_m at the same state s_i, and a softmax
# over the M + 1 must pick a_i. Why a' must come from the behaviour policy: given g_i, the posterior that candidate
# m produced it is p(g_i|s,a_m) pi_beta(a_m|s) / mu(a_m|s) normalised over the candidates (a_i ~ pi_beta, the
# others ~ mu), so the loss's optimum is f(s,a,g) = log p(g|s,a) + log pi_beta(a|s)/mu(a|s) + c(s,g). With mu =
# pi_beta it is log p(g|s,a) + c(s,g), of which the goal loss's optimum log p(g|s,a)/p(g) - log(B-1) is one
# member: both losses agree and Q keeps its meaning. With mu uniform, f also learns log pi_beta(a|s): a bias
# towards the data's actions. So mu is a behaviour-cloning policy trained beside the critic (its parameters are
# critic["behavior"]; its NLL is part of the critic's loss, which no other term shares).
def action_candidates(critic, batch: Batch, key, cfg: Config, nets: Networks):
    """M actions a' per row from --action-sampler ([M, B, |A|], no gradient), and the behaviour model's NLL of the
    data's actions (its training loss; 0 for the uniform sampler)."""
    shape = (cfg.action_negatives, *batch.actions.shape)
    if cfg.action_sampler == "uniform":
        return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0), jnp.zeros(())
    mean, std = actor_dist(nets, critic["behavior"], batch.observations, cfg)
    u = jax.lax.stop_gradient(mean + std * jax.random.normal(key, shape))
    return jnp.tanh(u), bc_nll(mean, std, batch.actions).mean()


def action_contrast(critic, batch: Batch, key, psi, cfg: Config, nets: Networks):
    """Softmax cross-entropy over [a_i, a'_1..a'_M] at s_i against g_i: which action led to the goal."""
    others, behavior_nll = action_candidates(critic, batch, key, cfg, nets)
    actions = jnp.concatenate([batch.actions[None], others])  # [M + 1, B, |A|], the data's action first
    phi = jax.vmap(lambda a: sa_features(nets, critic, batch.observations, a))(actions)  # [M + 1, B, d]
    logits = jnp.sum(phi * psi[None], axis=-1).T  # [B, M + 1]: f(s_i, a_m, g_i); a shared bias cancels
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.zeros(logits.shape[0], jnp.int32)).mean()
    return loss, behavior_nll, dict(action_loss=loss, action_accuracy=jnp.mean(jnp.argmax(logits, axis=1) == 0),
                                    behavior_nll=behavior_nll)


def with_action_contrast(loss_fn, critic, state, batch, key, cfg, nets, shard):
    """loss_fn's loss plus --action-coef times action_contrast's, plus the behaviour model's own NLL."""
    loss, (metrics, psi) = loss_fn(critic, state, batch, key, cfg, nets, shard)
    action_loss, behavior_nll, action_metrics = action_contrast(critic, batch, jax.random.fold_in(key, 11), psi, cfg,
                                                                nets)
    return loss + cfg.action_coef * action_loss + behavior_nll, ({**metrics, **action_metrics}, psi)


# Q estimators. Each maps the logits f[i, j] = f(s_i, a_i, g_j) of B state-actions against the batch's B goals, and
# the goals' rewards r_j, to an estimate of Q(s_i, a_i). Goal g_i was drawn from p(g | s_i, a_i), not from p(g):
# the estimators that average over the batch's goals as samples of p(g) leave it out of row i's average.
def off_diagonal(f):
    """f with its diagonal at -inf: exp(f) there is 0, so row i sums over the other rows' goals only."""
    return jnp.where(jnp.eye(f.shape[0], f.shape[1], dtype=bool), -jnp.inf, f)


def q_normalized(f, r):
    """Self-normalised: sum_{j != i} softmax_j(f_ij) r_j. exp(f) is the density ratio only up to a factor Z(s, a)
    that neither NCE nor InfoNCE pins down; dividing by the batch's estimate of Z = mean_j exp(f_ij) removes it. The
    result estimates E_{p(g|s,a)}[r(g)] = (1 - gamma) Q(s, a), the scale the original code's exp(f) r has for an
    exact density ratio, so --bc-coef keeps its meaning."""
    return jax.nn.softmax(off_diagonal(f), axis=-1) @ r


def q_marginal(f, r):
    """The density-ratio identity at face value: mean_{j != i} exp(f_ij) r_j."""
    return jnp.exp(off_diagonal(f)) @ r / (f.shape[1] - 1)


def q_diag(f, r):
    """The original code: each row's own goal only, exp(f_ii) r_i."""
    return jnp.exp(jnp.diagonal(f)) * r


Q_ESTIMATORS = {"normalized": q_normalized, "marginal": q_marginal, "diag": q_diag}


def q_estimate(nets: Networks, critic, s, a, psi, goal_rewards, cfg: Config):
    """Q(s, a) without TD: exp(f) estimates p(g | s, a) / p(g), so it re-weights the rewards of future states.
    With several critics (psi then has their axis too), the minimum of their estimates."""
    if is_ensemble(critic):
        q = jax.vmap(lambda c, p: q_estimate(nets, c, s, a, p, goal_rewards, cfg))(critic, psi)
        return q.min(axis=0)
    return Q_ESTIMATORS[cfg.q_estimator](pair_logits(critic, sa_features(nets, critic, s, a), psi), goal_rewards)


# Actor objectives. Each maps (actor params, frozen critic, the batch's goal features psi) to (loss, metrics).
BOUND = 0.999  # |a| >= BOUND: an action at the edge of the action space, as clipped data has many of


def bc_nll(mean, std, actions):
    """-log pi(a | s) of dataset actions under the tanh-Gaussian, with actions at the edges treated as censored.

    Data collected with clipping holds many actions of exactly +-1 (a quarter of hopper-medium-local's), whose
    pre-tanh value is +-infinity: clipped to 1 - 1e-6 it is +-7.25, which drags the mean far out and the std
    up. As the original code's tanh distribution does, an action beyond the bound gets instead the probability
    that the policy puts beyond it, P(tanh(u) >= BOUND), spread over the edge's width 1 - BOUND, so its pull stops
    once the policy saturates there.
    """
    inside = tanh_gaussian_log_density(mean, std, jnp.arctanh(jnp.clip(actions, -BOUND, BOUND)))
    side = jnp.sign(actions)
    beyond = jax.scipy.special.log_ndtr(side * (mean - side * math.atanh(BOUND)) / std) - math.log(1 - BOUND)
    return -jnp.sum(jnp.where(jnp.abs(actions) >= BOUND, beyond, inside), axis=-1)


def actor_loss_q(actor, critic, psi, nets: Networks, batch: Batch, key, alpha, cfg: Config):
    """The paper: bc_coef * (-log pi(a_data|s)) + (1 - bc_coef) * (alpha log pi(a~|s) - Q(s, a~)), a~ ~ pi
    reparameterised, so the policy follows the critic's gradient in the action."""
    mean, std = actor_dist(nets, actor, batch.observations, cfg)
    u = mean + std * jax.random.normal(key, mean.shape)
    log_prob = tanh_gaussian_log_prob(mean, std, u)
    q = q_estimate(nets, critic, batch.observations, jnp.tanh(u), psi, batch.goal_rewards, cfg)
    bc = bc_nll(mean, std, batch.actions)
    loss = jnp.mean(cfg.bc_coef * bc + (1 - cfg.bc_coef) * (alpha * log_prob - q))
    return loss, dict(actor_loss=loss, q_mean=q.mean(), bc_nll=bc.mean(), entropy=-log_prob.mean())


def state_value(q_of, s, mean, std, key):
    """V(s) = mean of Q(s, a~) over a few a~ ~ pi(.|s), drawn from the actor's (mean, std) at s and held fixed."""
    u = jax.lax.stop_gradient(mean + std * jax.random.normal(key, (4, *mean.shape)))
    return jax.vmap(lambda x: q_of(s, jnp.tanh(x)))(u).mean(axis=0)


# AWR advantages. Each gets q_of(s, a) (the critic's Q estimate, (1 - gamma) times the return's scale), dist_of(s)
# (the actor's (mean, std) at states s, held fixed), the batch and a key, and returns A(s_t, a_t) for the batch's
# dataset actions and V(s_t).
def advantage_q(q_of, dist_of, batch: Batch, key, cfg: Config):
    """A = Q(s, a_data) - V(s): asks the critic which action is better."""
    v_now = state_value(q_of, batch.observations, *dist_of(batch.observations), key)
    return q_of(batch.observations, batch.actions) - v_now, v_now


def advantage_td(q_of, dist_of, batch: Batch, key, cfg: Config):
    """A = (1 - gamma) r_t + gamma V(s_{t+1}) - V(s_t), with V(s_{t+1}) = 0 after a fall: the one-step TD advantage
    in the critic's units. The action's effect comes from the data's own reward and next state, so the critic only
    has to rank states, which it does far better than actions (README Results)."""
    k_now, k_next = jax.random.split(key)
    s_next = batch.next_observations
    v_next = jnp.where(batch.done, 0.0, state_value(q_of, s_next, *dist_of(s_next), k_next))
    v_now = state_value(q_of, batch.observations, *dist_of(batch.observations), k_now)
    return (1 - cfg.gamma) * batch.rewards + cfg.gamma * v_next - v_now, v_now


ADVANTAGES = {"q": advantage_q, "td": advantage_td}


def awr_advantage(nets: Networks, critic, actor, psi, batch: Batch, key, cfg: Config):
    """The --awr-advantage A of the batch's dataset actions, and V(s) (no gradient to the actor: V uses its current
    policy)."""
    q_of = partial(q_estimate, nets, critic, psi=psi, goal_rewards=batch.goal_rewards, cfg=cfg)
    return ADVANTAGES[cfg.awr_advantage](q_of, lambda s: jax.lax.stop_gradient(actor_dist(nets, actor, s, cfg)),
                                         batch, key, cfg)


def awr_weights(adv, cfg: Config):
    """AWR's weights min(exp(beta A / std(A)), max_weight), held fixed, and their effective sample size as a
    fraction of the batch, (sum w)^2 / (B sum w^2): 1 for equal weights, 1/B when one row has them all."""
    w = jax.lax.stop_gradient(jnp.minimum(jnp.exp(cfg.awr_beta * adv / (adv.std() + 1e-8)), cfg.awr_max_weight))
    return w, w.sum() ** 2 / (w.shape[0] * jnp.sum(w ** 2))


def actor_loss_awr(actor, critic, psi, nets: Networks, batch: Batch, key, alpha, cfg: Config):
    """Advantage-weighted regression (one-step offline RL): -mean_i w_i log pi(a_i | s_i) on the dataset's actions,
    w = min(exp(beta A / std(A)), max_weight), A from --awr-advantage. The critic is asked about states and dataset
    actions, where it was trained, and never differentiated in the action; the batch's std of A makes beta free of
    the reward scale, so one beta serves every dataset."""
    return awr_at(*actor_dist(nets, actor, batch.observations, cfg), actor, critic, psi, nets, batch, key, alpha, cfg)


def awr_at(mean, std, actor, critic, psi, nets: Networks, batch: Batch, key, alpha, cfg: Config):
    """actor_loss_awr given the actor's (mean, std) at the batch's states."""
    u = mean + std * jax.random.normal(key, mean.shape)
    log_prob = tanh_gaussian_log_prob(mean, std, u)
    adv, v = awr_advantage(nets, critic, actor, psi, batch, jax.random.fold_in(key, 1), cfg)
    w, ess = awr_weights(adv, cfg)
    bc = bc_nll(mean, std, batch.actions)
    loss = jnp.mean(w * bc + alpha * log_prob)
    return loss, dict(actor_loss=loss, q_mean=v.mean(), bc_nll=bc.mean(), entropy=-log_prob.mean(),
                      awr_weight_max=w.max(), awr_weight_mean=w.mean(), awr_adv_std=adv.std(), awr_ess=ess)


def q_and_slope(nets: Networks, critic, psi, batch: Batch, a, cfg: Config):
    """The batch's Q at actions a (one per row) and dQ/da: row i's Q depends on a_i alone, so one vector-Jacobian
    product with ones gives every row's gradient."""
    q, pullback = jax.vjp(lambda x: q_estimate(nets, critic, batch.observations, x, psi, batch.goal_rewards, cfg), a)
    return q, pullback(jnp.ones_like(q))[0]


# DDPG+BC's lambda (--ddpg-lambda), held fixed: each gets the batch's Q at the policy's actions and its gradient in
# those actions, and returns lambda.
def ddpg_lambda_q(q, dq_da, cfg: Config):
    """TD3+BC: ddpg_alpha / mean|Q|, free of Q's scale. The pull on the action is then alpha times the critic's
    relative steepness rms(dQ/da) / mean|Q|, which differs between datasets (e.g. 2.7-fold between
    halfcheetah-medium-local and a medium/random mix, whose random half halves mean|Q|)."""
    return cfg.ddpg_alpha / (jnp.abs(q).mean() + 1e-8)


def ddpg_lambda_grad(q, dq_da, cfg: Config):
    """ddpg_push / rms over the batch and action dims of dQ/da at the policy's actions: the Q term's gradient in the
    action has rms ddpg_push on every dataset, against the BC term's 2 (a - a_data) / |A|."""
    return cfg.ddpg_push / (jnp.sqrt(jnp.mean(dq_da ** 2)) + 1e-8)


DDPG_LAMBDAS = {"q": ddpg_lambda_q, "grad": ddpg_lambda_grad}


def ddpg_bc(actor, critic, psi, nets: Networks, batch: Batch, bc_weights, cfg: Config):
    """-lambda Q(s, pi(s)) + bc_weights * mean over dims of (pi(s) - a_data)^2 with pi(s) = tanh(mean) and lambda
    from --ddpg-lambda held fixed; the std fitted by (unweighted) BC with the mean held fixed."""
    mean, std = actor_dist(nets, actor, batch.observations, cfg)
    a = jnp.tanh(mean)
    q, dq_da = q_and_slope(nets, critic, psi, batch, a, cfg)  # dq_da unused (and compiled away) with lambda q
    lmbda = jax.lax.stop_gradient(DDPG_LAMBDAS[cfg.ddpg_lambda](q, dq_da, cfg))
    mse = jnp.mean((a - batch.actions) ** 2, axis=-1)
    std_nll = bc_nll(jax.lax.stop_gradient(mean), std, batch.actions)
    loss = jnp.mean(-lmbda * q + bc_weights * mse) + std_nll.mean()
    return loss, dict(actor_loss=loss, q_mean=q.mean(), bc_mse=mse.mean(), bc_nll=std_nll.mean(), lmbda=lmbda)


def actor_loss_ddpg(actor, critic, psi, nets: Networks, batch: Batch, key, alpha, cfg: Config):
    """TD3+BC's normalised DDPG+BC (Fujimoto & Gu 2021), which Park et al. (2024) found extracts a policy from a
    critic far better than AWR: -lambda Q(s, pi(s)) + mean over dims of (pi(s) - a_data)^2 with pi(s) = tanh(mean)
    and lambda from --ddpg-lambda held fixed (TD3+BC's: ddpg_alpha / mean_batch |Q|). The std is not in that
    objective; it is fitted by BC alone (the mean held fixed), so the policy's spread stays the data's where a
    sample of pi is needed (V(s) of the TD advantage, contrastive TD's next action)."""
    return ddpg_bc(actor, critic, psi, nets, batch, 1.0, cfg)


def actor_loss_awr_ddpg(actor, critic, psi, nets: Networks, batch: Batch, key, alpha, cfg: Config):
    """DDPG+BC whose BC term is weighted row by row with AWR's weights (--awr-advantage, --awr-beta), divided by
    their batch mean so the BC term keeps DDPG+BC's scale against lambda Q. On data that mixes a good and a bad
    policy, plain BC pulls the deterministic pi(s) to the mean of both; the weights pull it to the better one (as
    AWR does) and leave the Q term to push beyond it."""
    adv, _ = awr_advantage(nets, critic, actor, psi, batch, jax.random.fold_in(key, 1), cfg)
    w, ess = awr_weights(adv, cfg)
    bc_weights = w / w.mean()
    loss, metrics = ddpg_bc(actor, critic, psi, nets, batch, bc_weights, cfg)
    return loss, dict(metrics, bc_weight_max=bc_weights.max(), awr_adv_std=adv.std(), awr_ess=ess)


def actor_loss_awr_push(actor, critic, psi, nets: Networks, batch: Batch, key, alpha, cfg: Config):
    """AWR (actor_loss_awr, as is) plus a push of the policy's mean (before tanh) up the critic: row i's mean
    gets the extra gradient -step_i / std_i^2, step = awr_push mean(w) dQ/dmean / rms(dQ/dmean) held fixed. The
    weighted likelihood pulls the mean back by w_i (mean_i - u_i) / std_i^2, so at the balance the mean sits at the
    data's weighted mean plus step_i / w_i: the same offset, about awr_push, at every state, as DDPG+BC's push gives
    a deterministic policy, while the likelihood keeps fitting narrow states hardest (a squared-error BC term, as in
    awr-ddpg, weighs a noisy state's rows as much and falls well under AWR on a medium/random mix; a push scaled by
    the std moves noisy states far more; docs/experiments.md). The logged actor_loss is AWR's; the push has no
    value of its own, only that gradient (a linear term in the mean). Also logged: q_pi, the mean Q at tanh(mean),
    and push_max, the largest |step| in the batch (awr_push mean(w) max|dQ/dmean| / rms(dQ/dmean))."""
    mean, std = actor_dist(nets, actor, batch.observations, cfg)
    awr_loss, metrics = awr_at(mean, std, actor, critic, psi, nets, batch, key, alpha, cfg)
    a = jnp.tanh(mean)
    q, dq_da = q_and_slope(nets, critic, psi, batch, a, cfg)
    dq_dmean = dq_da * (1 - a ** 2)
    step = cfg.awr_push * metrics["awr_weight_mean"] * dq_dmean / (jnp.sqrt(jnp.mean(dq_dmean ** 2)) + 1e-12)
    push = jax.lax.stop_gradient(step / std ** 2)
    loss = awr_loss - jnp.mean(jnp.sum(push * mean, axis=-1))
    return loss, dict(metrics, q_pi=q.mean(), push_max=jnp.abs(step).max())


ACTOR_OBJECTIVES = {"q": actor_loss_q, "awr": actor_loss_awr, "ddpg": actor_loss_ddpg, "awr-ddpg": actor_loss_awr_ddpg,
                    "awr-push": actor_loss_awr_push}


# ======================================================================================================= update
class TrainState(flax.struct.PyTreeNode):
    critic: dict  # {"phi": ..., "psi": ..., "absorbing": ...}
    critic_target: dict  # Polyak average of critic (used by --critic-loss td)
    actor: Any
    log_alpha: jax.Array
    critic_opt: Any
    actor_opt: Any
    alpha_opt: Any
    key: jax.Array  # typed PRNG key: data sampling and the actor's noise
    step: jax.Array


def make_optimizer(cfg: Config):
    return optax.adam(cfg.lr, eps=cfg.adam_eps)


def with_normalizer(params: dict, cfg: Config, obs_norm: dict | None, obs_dim: int) -> dict:
    """params with the state statistics as params["obs"] under --normalize-states (a placeholder for a template
    that a checkpoint fills); params unchanged without."""
    if not cfg.normalize_states:
        return params
    norm = obs_norm or {"mean": np.zeros(obs_dim, np.float32), "std": np.ones(obs_dim, np.float32)}
    return {**params, "obs": jax.tree.map(jnp.asarray, norm)}


def init_critic(k_phi, k_psi, cfg: Config, nets: Networks, obs_dim: int, act_dim: int, obs_norm=None) -> dict:
    critic = {"phi": nets.phi.init(k_phi, jnp.zeros((1, obs_dim + act_dim))),
              "psi": nets.psi.init(k_psi, jnp.zeros((1, obs_dim))), "absorbing": jnp.zeros(cfg.repr_dim)}
    if cfg.action_negatives > 0 and cfg.action_sampler == "bc":  # the behaviour model, the actor's architecture
        critic["behavior"] = with_normalizer(nets.actor.init(jax.random.fold_in(k_phi, 2), jnp.zeros((1, obs_dim))),
                                             cfg, obs_norm, obs_dim)
    if cfg.repr_norm == "unit":  # SigLIP's start: scale 10, and a bias at the log-odds of a positive, 1 / (B - 1)
        critic.update(absorbing=jax.random.normal(jax.random.fold_in(k_psi, 1), (cfg.repr_dim,)),
                      log_scale=jnp.asarray(math.log(10.0)), bias=jnp.asarray(-math.log(cfg.batch_size - 1)))
    return with_normalizer(critic, cfg, obs_norm, obs_dim)


def init_state(key: jax.Array, cfg: Config, nets: Networks, obs_dim: int, act_dim: int,
               obs_norm: dict | None = None) -> TrainState:
    """obs_norm: state_normalizer(the dataset's states) with --normalize-states (None: a placeholder)."""
    k_phi, k_psi, k_actor, key = jax.random.split(key, 4)
    if cfg.critics == 1:
        critic = init_critic(k_phi, k_psi, cfg, nets, obs_dim, act_dim, obs_norm)
    else:  # an ensemble: parameters stacked on a leading axis
        keys = (jax.random.split(k, cfg.critics) for k in (k_phi, k_psi))
        critic = jax.vmap(lambda a, b: init_critic(a, b, cfg, nets, obs_dim, act_dim, obs_norm))(*keys)
    actor = with_normalizer(nets.actor.init(k_actor, jnp.zeros((1, obs_dim))), cfg, obs_norm, obs_dim)
    log_alpha = jnp.asarray(math.log(cfg.alpha) if cfg.alpha > 0 else 0.0, jnp.float32)
    opt = make_optimizer(cfg)
    return TrainState(critic, critic, actor, log_alpha, opt.init(critic), opt.init(actor), opt.init(log_alpha), key,
                      jnp.zeros((), jnp.int32))


def init_states(cfg: Config, nets: Networks, seeds: Sequence[int], obs_dim: int, act_dim: int,
                obs_norm: dict | None = None) -> TrainState:
    """One independent train state per seed, stacked on a leading seed axis."""
    return init_seeds(lambda key: init_state(key, cfg, nets, obs_dim, act_dim, obs_norm), seeds)


def init_seeds(init_one, seeds: Sequence[int]):
    """init_one(key) for each seed's key, stacked on a leading seed axis."""
    return jax.vmap(init_one)(jnp.stack([jax.random.key(s) for s in seeds]))


def update_step(state: TrainState, data: Data, cfg: Config, nets: Networks, shard) -> tuple[TrainState, dict]:
    """One gradient step: sample a batch with goals on device, then learn from it."""
    key, k_batch, k_actor = jax.random.split(state.key, 3)
    batch = sample_batch(data, k_batch, cfg.batch_size, cfg.gamma, cfg.goal_reward)
    batch = jax.tree.map(lambda x: shard(x, "data"), batch)
    return learn_from_batch(state.replace(key=key), batch, k_actor, cfg, nets, shard)


def critic_loss(critic, state: TrainState, batch: Batch, key, cfg: Config, nets: Networks, shard):
    """The --critic-loss of the critic, or with --critics > 1 the sum of each critic's on the same batch (contrastive
    TD: each against the minimum of the target twins), with their metrics averaged and their goal features psi
    stacked."""
    loss_fn = CRITIC_LOSSES[cfg.critic_loss]
    if cfg.action_negatives > 0:
        loss_fn = partial(with_action_contrast, loss_fn)
    if not is_ensemble(critic):
        return loss_fn(critic, state, batch, key, cfg, nets, shard)
    losses, (metrics, psi) = jax.vmap(lambda c: loss_fn(c, state, batch, key, cfg, nets, shard))(critic)
    return losses.sum(), (jax.tree.map(jnp.mean, metrics), psi)


def learn_from_batch(state: TrainState, batch: Batch, k_actor, cfg: Config, nets: Networks, shard):
    """Update critic and actor (and alpha), both from the parameters before the step."""
    opt = make_optimizer(cfg)

    (_, (metrics, psi)), critic_grads = jax.value_and_grad(critic_loss, has_aux=True)(
        state.critic, state, batch, jax.random.fold_in(k_actor, 1), cfg, nets, shard)
    # The actor reuses the critic's goal representations psi(g); neither psi nor the critic moves with the actor.
    alpha = jnp.exp(state.log_alpha) if cfg.auto_alpha else cfg.alpha
    (_, actor_metrics), actor_grads = jax.value_and_grad(ACTOR_OBJECTIVES[cfg.actor_objective], has_aux=True)(
        state.actor, jax.lax.stop_gradient(state.critic), jax.lax.stop_gradient(psi), nets, batch, k_actor, alpha,
        cfg)
    metrics.update(actor_metrics)
    if is_unit_norm(state.critic):  # the learned inverse temperature of the logits
        metrics["logit_scale"] = jnp.exp(state.critic["log_scale"]).mean()

    critic_updates, critic_opt = opt.update(critic_grads, state.critic_opt)
    actor_updates, actor_opt = opt.update(actor_grads, state.actor_opt)
    log_alpha, alpha_opt = state.log_alpha, state.alpha_opt
    if cfg.auto_alpha:  # SAC: raise alpha while entropy is below the target -|A|
        target_entropy = -batch.actions.shape[-1]
        alpha_grad = actor_metrics["entropy"] - target_entropy  # d/dlog_alpha of -log_alpha * (log_pi + target)
        alpha_updates, alpha_opt = opt.update(alpha_grad, state.alpha_opt)
        log_alpha = optax.apply_updates(log_alpha, alpha_updates)
        metrics["alpha"] = jnp.exp(log_alpha)
    critic = optax.apply_updates(state.critic, critic_updates)
    new_state = state.replace(
        critic=critic, critic_target=optax.incremental_update(critic, state.critic_target, cfg.tau),
        actor=optax.apply_updates(state.actor, actor_updates), log_alpha=log_alpha, critic_opt=critic_opt,
        actor_opt=actor_opt, alpha_opt=alpha_opt, step=state.step + 1)
    return new_state, metrics


def make_mesh(cfg: Config) -> jax.sharding.Mesh:
    n = cfg.devices or jax.device_count()
    if n > jax.device_count():
        raise CVLError(f"--devices {n} but only {jax.device_count()} device(s) are visible")
    if cfg.batch_size % n:
        raise CVLError(f"--batch-size {cfg.batch_size} must be divisible by the {n} devices; change one of them")
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))


def make_train_fn(cfg: Config, nets: Networks, mesh: jax.sharding.Mesh):
    """jit(scan(vmap(update_step))): n updates of K seeds in one call, batch sampling included.

    Data parallelism is `jax.jit` over a Mesh rather than pmap: the code stays the single-device maths, and
    sharding annotations split each batch over the mesh's "data" axis. XLA then all-gathers psi(g) so every device
    computes its (B/n) x B block of logits, and all-reduces the gradients, so the loss, gradients and metrics are
    those of the single-device global batch.
    """

    def shard(x, *spec):  # on one device a constraint means nothing, but it can slow XLA's CPU code down
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec))) if mesh.size > 1 else x

    return jit_chunks(partial(update_step, cfg=cfg, nets=nets, shard=shard), cfg.num_seeds)


def jit_chunks(update, num_seeds: int):
    """train_chunk(state, data, n) = jit(scan(vmap(update))): n updates of K seeds in one call, returning the state,
    the metrics {name: [n, K]} and whether each seed's critic and actor are finite [K]. One seed runs without the
    seed axis inside the step, since XLA's CPU matmuls are slower with a batch dim of 1."""
    update = jax.vmap(update, in_axes=(0, None)) if num_seeds > 1 else partial(without_seed_axis, update)

    def train_chunk(state, data, n):
        state, metrics = jax.lax.scan(lambda s, _: update(s, data), state, None, length=n)
        return state, metrics, all_finite((state.critic, state.actor))

    return jax.jit(train_chunk, static_argnums=2)


def all_finite(tree) -> jax.Array:
    """[K]: whether every parameter of each seed (leading axis) is finite."""
    return jnp.stack([jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim))) for x in jax.tree.leaves(tree)]).all(0)


def without_seed_axis(update, state, data):
    state, metrics = update(jax.tree.map(lambda x: x[0], state), data)
    return jax.tree.map(lambda x: x[None], (state, metrics))


def replicate(tree, mesh):
    """Put a host pytree on every device of the mesh (works across processes: each passes the same values)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                        tree)


def to_host(tree):
    """Numpy copy of a replicated pytree; reads the local copy, so it works on every process of a multi-host run
    (numpy leaves are taken as they are)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x), tree)


# =================================================================================================== evaluation
@contextlib.contextmanager
def quiet_env_creation():
    """Making a v4 MuJoCo env prints a C-level XML deprecation notice per env and gymnasium a v4-is-old warning;
    both are noise here (D4RL's data matches the v4 models), so hide them while envs are made."""
    sys.stderr.flush()
    saved = os.dup(2)
    PROCESS["stderr_fd"] = saved  # where a stop's line goes meanwhile (stop_process)
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        PROCESS.pop("stderr_fd", None)
        os.close(saved)


def eval_reset_seeds(seeds: Sequence[int], episodes: int) -> list[int]:
    """Env reset seeds for each training seed: reproducible and distinct across training seeds."""
    return [10_007 * s + j for s in seeds for j in range(episodes)]


def seeds_policy(policy):
    """policy(params, obs) -> action, compiled once for parameters stacked over K seeds and observations
    [K, episodes, obs]: make it once per run and pass it to every evaluate(). CVL's policy is
    partial(eval_action, nets)."""
    return jax.jit(jax.vmap(policy))


def evaluate(policy, actor_params, env_id: str, seeds: Sequence[int], episodes: int, stop=None) -> np.ndarray:
    """Returns [K, episodes] of returns of a seeds_policy(...), params stacked over K seeds; all K x episodes run as
    one vectorised env. The parameters go to the device once; each env step moves only observations and actions.
    A non-empty `stop` (the training loop's signal flag) ends it between steps with KeyboardInterrupt."""
    import gymnasium as gym

    k = len(seeds)
    actor_params = jax.device_put(to_host(actor_params), jax.local_devices()[0])
    with quiet_env_creation():
        envs = gym.make_vec(env_id, num_envs=k * episodes, vectorization_mode="sync")
    try:
        obs, _ = envs.reset(seed=eval_reset_seeds(seeds, episodes))
        returns = np.zeros(k * episodes)
        alive = np.ones(k * episodes, dtype=bool)
        while alive.any():
            if stop:
                raise KeyboardInterrupt
            actions = policy(actor_params, obs.reshape(k, episodes, -1).astype(np.float32))
            obs, reward, terminated, truncated, _ = envs.step(np.asarray(actions).reshape(k * episodes, -1))
            returns += reward * alive
            alive &= ~(terminated | truncated)
    finally:
        envs.close()
    return returns.reshape(k, episodes)


def normalized_score(returns, ref_min, ref_max):
    """D4RL's normalised score: 100 * (return - random) / (expert - random); NaN for unknown envs."""
    if ref_min is None:
        return np.full(np.shape(returns), np.nan)
    return 100.0 * (np.asarray(returns) - ref_min) / (ref_max - ref_min)


# ====================================================================================================== logging
def per_seed_columns(name: str, values: np.ndarray) -> dict[str, float]:
    """One column for one seed; with K seeds: name (mean), name_std and name_s<i> per seed."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return {name: float(values.reshape(()))}
    cols = {name: float(values.mean()), f"{name}_std": float(values.std())}
    cols.update({f"{name}_s{i}": float(v) for i, v in enumerate(values)})
    return cols


class MetricsLog:
    """metrics.csv: one row per jitted call (step, wall time, every metric), eval columns at eval steps.

    A row is appended in O(1); the file is rewritten only when a row brings a column the header lacks (the
    first evaluation's)."""

    def __init__(self, path: Path, rows: list[dict]):
        self.path, self.rows = path, list(rows)
        self._rewrite()

    def _rewrite(self):
        self.keys = list(dict.fromkeys(k for row in self.rows for k in row))

        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.keys, restval="")
                writer.writeheader()
                writer.writerows(self.rows)

        write_file(self.path, write, "metrics")

    def append(self, row: dict):
        self.rows.append(row)
        if not row.keys() <= set(self.keys):
            self._rewrite()
            return
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.keys, restval="").writerow(row)
        except OSError as e:
            raise WriteError(f"cannot write metrics {self.path} ({e.strerror or e})") from None


def plot_learning_curve(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score", "normalised score"), ("critic_loss", "critic loss"), ("actor_loss", "actor loss"),
              ("categorical_accuracy", "critic categorical accuracy")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
    for ax, (key, label) in zip(axes, panels):
        pts = [(r["step"], r[key], r.get(f"{key}_std", 0.0)) for r in rows if r.get(key) not in (None, "")]
        if pts:
            x, y, s = (np.array(v, dtype=float) for v in zip(*pts))
            ax.plot(x, y, marker="o" if key == "score" else None, ms=3)
            ax.fill_between(x, y - s, y + s, alpha=0.25)
        if key == "actor_loss":  # the untrained critic's huge exp(f) makes early values dwarf the rest
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel("gradient step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, path, "the learning curve")


def save_figure(fig, path: Path, what: str) -> None:
    """Lay out, write through write_file, and close a matplotlib figure (closed even when the write fails)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=110), what)
    finally:
        plt.close(fig)


def to_host_state(state: TrainState) -> TrainState:
    """Numpy copy of a train state, with the typed PRNG key as its raw uint32 data."""
    return to_host(state.replace(key=jax.random.key_data(state.key)))


def save_checkpoint(run_dir: Path, state, cfg, rows: list[dict], algorithm: str = "CVL", data_id: str = "") -> Path:
    """Atomic (write_file): a crash or a full disk mid-write leaves the previous checkpoint intact."""
    path = run_dir / "checkpoint.msgpack"
    host = to_host_state(state)
    payload = {"state": flax.serialization.to_state_dict(host), "step": int(np.max(host.step)),
               "config": json.dumps(dataclasses.asdict(cfg)), "rows": json.dumps(rows), "algorithm": algorithm,
               **({"data": data_id} if data_id else {})}
    return write_file(path, lambda tmp: tmp.write_bytes(flax.serialization.msgpack_serialize(payload)),
                      "the checkpoint")


SCRIPTS = {"CVL": "cvl.py", "TD3+BC": "bench/td3_bc.py"}  # the script that trains each algorithm's runs


def load_checkpoint(path: Path, config_cls=None, algorithm: str = "CVL") -> dict:
    """A run's checkpoint: its state dict, step, config (a config_cls, default Config) and metrics rows. A run of
    another algorithm is refused, naming the script that wrote it."""
    config_cls = config_cls or Config
    path = Path(path)
    if path.is_dir():
        if not (path / "checkpoint.msgpack").exists() and (path / "config.json").exists():
            raise CVLError(f"run {path} stopped before its first checkpoint, so there is nothing to resume or "
                           f"evaluate; start it again with the flags in its config.json")
        path = path / "checkpoint.msgpack"
    if not path.exists():
        raise CVLError(f"no checkpoint at {path}; pass a run directory written by cvl.py or its checkpoint file")
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise CVLError(f"checkpoint {path} cannot be read ({e.strerror or e}); check its permissions") from None
    if blob[:4] == b"\x89HDF" or blob[:2] == b"PK":
        raise CVLError(f"{path} is a dataset file, not a checkpoint; pass a run directory written by cvl.py (or "
                       f"its checkpoint.msgpack)")
    try:
        payload = flax.serialization.msgpack_restore(blob)
        # runs saved before checkpoints named their algorithm: TD3+BC's have a normaliser file beside them
        written_by = payload.get("algorithm") or ("TD3+BC" if (path.parent / "normalizer.npz").exists() else "CVL")
        if written_by != algorithm:
            raise CVLError(f"{path.parent} is a {written_by} run, not a {algorithm} one; resume or evaluate it with "
                           f"python {SCRIPTS.get(written_by, 'the script that wrote it')}")
        payload["config"] = config_from_dict(json.loads(payload["config"]), config_cls)
        payload["rows"] = json.loads(payload["rows"])
    except CVLError:
        raise
    except Exception as e:
        what = "it is damaged" if path.name == "checkpoint.msgpack" else "it is not a checkpoint written by cvl.py"
        raise CVLError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); {what}") from None
    missing = [f.name for f in dataclasses.fields(TrainState) if f.name not in payload["state"]]
    if algorithm == "CVL" and (missing or "absorbing" not in payload["state"]["critic"]):
        raise CVLError(f"checkpoint {path} was written by an older cvl.py (its train state has no "
                       f"{', '.join(missing) or 'absorbing-state goal'}); evaluate it with the cvl.py that wrote it, "
                       f"or start a new run")
    return payload


# Fields added after runs were saved, with the behaviour those runs had, so old runs resume unchanged.
ADDED_FIELDS = {"goal_reward": "goal", "actor_objective": "q", "awr_advantage": "q", "td_weights": "raw",
                "normalize_states": False}
# Variants removed (docs/experiments.md says why): field -> (the value that is today's behaviour, the last commit
# that had the others). A run saved with today's behaviour resumes; one that used the variant is refused.
REMOVED_FIELDS = {"conservative": (0.0, "d9bb3c9"), "density_ratio": ("raw", "d9bb3c9"),
                  "q_head": ("none", "354f436"), "pick_samples": (0, "3ce9a21"), "pick_heads": (3, "3ce9a21"),
                  "pick_spread": (1.0, "3ce9a21"), "pick_margin": (4.0, "3ce9a21"), "pick_coef": (1.0, "3ce9a21"),
                  "heads": (3, "b210ce3"), "head_margin": (1.0, "b210ce3"), "td_next_action": ("sample", "b259ba5"),
                  "push_critic": ("readout", "065fc00")}
REMOVED_VALUES = {("critic_loss", "infonce"): "d9bb3c9", ("actor_objective", "heads"): "b210ce3",
                  ("critic_loss", "td-infonce"): "03b0491"}


def config_from_dict(d: dict, config_cls=None):
    """A saved config (default: CVL's Config), with the fields added since it was saved filled in as those runs
    behaved, and a removed variant it used refused."""
    config_cls = config_cls or Config
    known = {f.name for f in dataclasses.fields(config_cls)}
    for name, (today, commit) in REMOVED_FIELDS.items() if config_cls is Config else ():
        if name in d and d.pop(name) != today:
            raise CVLError(f"this run used {flag_name(name)}, which was removed from cvl.py; resume it "
                           f"with the cvl.py of commit {commit}")
    for (name, value), commit in REMOVED_VALUES.items() if config_cls is Config else ():
        if d.get(name) == value:
            raise CVLError(f"this run used {flag_name(name)} {value}, which was removed from cvl.py; resume "
                           f"it with the cvl.py of commit {commit}")
    unknown = sorted(set(d) - known)
    if unknown:
        raise CVLError(f"saved config has unknown field(s) {unknown}; it was written by another version")
    if config_cls is Config:
        d = {**{k: v for k, v in ADDED_FIELDS.items() if k in known}, **d}
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def restore_state(template: TrainState, state_dict: dict) -> TrainState:
    state_dict = dict(state_dict)
    state_dict["key"] = jax.random.wrap_key_data(np.asarray(state_dict["key"]))
    state = flax.serialization.from_state_dict(template.replace(key=state_dict["key"]), state_dict)
    return jax.tree.map(jnp.asarray, state)


def new_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.out) / f"{run_label(cfg)}__s{cfg.seed}__{stamp}"
    run_dir, i = base, 1
    while run_dir.exists():
        run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    make_dir(Path(cfg.out), "the run folder --out", "pass a writable --out")
    try:
        run_dir.mkdir()
    except OSError as e:
        raise WriteError(f"cannot create the run directory {run_dir} ({e.strerror or e}); pass a writable --out") \
            from None
    return run_dir


def run_directory(path) -> Path:
    """The run directory that --resume PATH names: PATH itself, or the folder of the checkpoint file PATH."""
    path = Path(path)
    return path.parent if path.is_file() else path


@contextlib.contextmanager
def run_lock(run_dir: Path, script: str = "cvl.py"):
    """Hold an exclusive lock on run_dir while a run trains, so a second process on the same run (two --resume at
    once) stops at once with one line naming the holder, instead of both writing metrics.csv and checkpoints."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): runs are not locked
        yield
        return
    try:
        f = open(run_dir / "lock", "a+")
    except OSError as e:
        raise WriteError(f"cannot write the lock file in {run_dir} ({e.strerror or e})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CVLError(f"run {run_dir} is in use by {holder}; wait for it to finish (or stop it), then "
                           f"--resume it") from None
        f.seek(0)
        f.truncate()
        f.write(f"{script} (pid {os.getpid()} on {socket.gethostname()})")
        f.flush()
        yield  # closing the file releases the lock


# ========================================================================================================= main
def init_distributed(cfg: Config) -> None:
    if not cfg.distributed or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend collectives across processes
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address or None,
                               num_processes=cfg.num_processes or None,
                               process_id=cfg.process_id if cfg.process_id >= 0 else None)


@functools.lru_cache(maxsize=16)
def env_spaces(env_id: str) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(observation dim, action dim, action low, action high per dimension) of a gymnasium env."""
    import gymnasium as gym

    try:
        with quiet_env_creation():
            env = gym.make(env_id)
    except (gym.error.Error, ImportError) as e:  # an unknown id; a -v3 MuJoCo env asks for mujoco-py
        newer = re.sub(r"-v[0-3]$", "-v4", env_id)
        fix = (f"{newer} is the same model on the maintained mujoco: --eval-env {newer}" if newer != env_id and
               newer.split("-")[0].lower() in {v[0].split("-")[0].lower() for v in D4RL_ENVS.values()} else
               "pass a gymnasium id with --eval-env")
        raise CVLError(f"cannot make eval env {env_id!r} ({type(e).__name__}: {e}); {fix}") from None
    obs_space, act_space = env.observation_space, env.action_space
    env.close()
    if not (isinstance(obs_space, gym.spaces.Box) and isinstance(act_space, gym.spaces.Box)
            and len(obs_space.shape) == 1 and len(act_space.shape) == 1):
        raise CVLError(f"eval env {env_id!r} has observation space {obs_space} and action space {act_space}; CVL "
                       f"needs flat continuous (Box) spaces, e.g. --eval-env Hopper-v4")
    low, high = act_space.low.astype(np.float64), act_space.high.astype(np.float64)
    if not (np.isfinite(low).all() and np.isfinite(high).all() and (high > low).all()):
        raise CVLError(f"eval env {env_id!r} has action bounds {low} to {high}; the policy (a tanh, mapped to the "
                       f"bounds) needs finite ones")
    return obs_space.shape[0], act_space.shape[0], low, high


def load_raw(cfg: Config) -> tuple[dict[str, np.ndarray], str, tuple[str, float | None, float | None]]:
    """(arrays, where they came from, (eval env, reference min return, reference max return)), not yet validated."""
    if not cfg.dataset and is_minari_id(cfg.env):
        dataset = minari_dataset(cfg.env)
        return minari_arrays(dataset), f"Minari dataset {cfg.env}", minari_eval_spec(dataset, cfg.eval_env)
    spec = eval_env_spec(cfg)
    path = resolve_dataset(cfg)
    if cfg.dataset:
        return read_dataset_file(path), str(path), spec
    return read_dataset_file(path, fix="delete it and run again to download it again"), str(path), spec


def load_validated(cfg: Config):
    """(validated arrays, where they came from, eval env spec, obs dim, action dim): the dataset checked against
    its eval env, the same way for training and --inspect."""
    raw, where, spec = load_raw(cfg)
    obs_dim, act_dim, low, high = env_spaces(spec[0])
    return validate_dataset(raw, where, obs_dim, act_dim, low, high), where, spec, obs_dim, act_dim


def load_env_data(cfg: Config):
    """Dataset, eval env and dimensions, validated against each other; the actions mapped from the env's bounds to
    the policy's [-1, 1] (env_policy maps them back)."""
    raw, _, spec, obs_dim, act_dim = load_validated(cfg)
    _, _, low, high = env_spaces(spec[0])
    return make_data({**raw, "actions": 2 * (raw["actions"] - low) / (high - low) - 1}), spec, obs_dim, act_dim


def env_policy(policy, env_id: str):
    """policy(params, obs) in [-1, 1] (a tanh) mapped to the eval env's action bounds, as CleanRL's action scale
    and bias: Pendulum's [-2, 2], any custom Box. The identity for the usual [-1, 1]."""
    _, _, low, high = env_spaces(env_id)
    if np.all(low == -1.0) and np.all(high == 1.0):
        return policy
    scale, bias = jnp.asarray((high - low) / 2, jnp.float32), jnp.asarray((high + low) / 2, jnp.float32)
    return lambda params, s: policy(params, s) * scale + bias


def inspect_dataset(cfg: Config) -> dict:
    """--inspect: what the dataset holds, loaded and validated exactly as for training; no training."""
    raw, where, (env_id, ref_min, ref_max), obs_dim, act_dim = load_validated(cfg)
    ends = np.unique(split_episodes(raw))
    starts = np.r_[0, ends[:-1] + 1]
    lengths, returns = ends - starts + 1, np.add.reduceat(raw["rewards"].astype(np.float64), starts)
    fell = raw["terminals"][ends].astype(bool)
    timed_out = raw["timeouts"][ends].astype(bool) & ~fell
    quartiles = (0, 25, 50, 75, 100)

    def spread(x, fmt):
        return ", ".join(f"{name} {v:{fmt}}" for name, v in zip(("min", "25%", "median", "75%", "max"),
                                                                 np.percentile(x, quartiles)))

    obs, act = raw["observations"], raw["actions"]
    at_bound = np.mean(np.abs(act) >= BOUND)
    lines = [
        f"cvl: inspect {where}",
        f"  transitions     {len(obs):,} ({len(rows_with_future(*goal_ranges(raw))):,} with a future goal)",
        f"  episodes        {len(ends):,}: {fell.sum():,} end by termination, {timed_out.sum():,} by time limit, "
        f"{len(ends) - fell.sum() - timed_out.sum():,} otherwise (an observation break or the end of the file)",
        f"  length          {spread(lengths, ',.0f')}",
        f"  return          {spread(returns, ',.1f')}",
    ]
    if ref_min is not None:
        lines.append(f"  normalised      {spread(normalized_score(returns, ref_min, ref_max), '.1f')}")
    lines += [
        f"  observations    {obs_dim} dims, from {obs.min():.3g} (dim {int(obs.min(axis=0).argmin())}) to "
        f"{obs.max():.3g} (dim {int(obs.max(axis=0).argmax())})",
        f"  actions         {act_dim} dims, per dim " + " ".join(
            f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(act.min(axis=0), act.max(axis=0)))
        + f"; {100 * at_bound:.1f}% of entries at a bound (|a| >= {BOUND})",
        f"  eval env        {env_id}; " + (f"reference returns {ref_min:g} (score 0) and {ref_max:g} (score 100)"
                                           if ref_min is not None else "no reference returns: scores are NaN"),
    ]
    path = make_dir(Path(cfg.out), "the folder --out", "pass a writable --out") / f"{run_label(cfg)}_returns.png"
    plot_returns(returns, path, f"{run_label(cfg)}: {len(ends):,} episodes", ref_min, ref_max)
    lines.append(f"  wrote           {path}")
    print("\n".join(lines), flush=True)
    return dict(transitions=len(obs), episodes=len(ends), terminated=int(fell.sum()), timed_out=int(timed_out.sum()),
                lengths=lengths, returns=returns, eval_env=env_id, ref_min=ref_min, ref_max=ref_max, plot=str(path))


def plot_returns(returns, path: Path, title: str, ref_min, ref_max) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.hist(returns, bins=min(50, max(5, len(returns) // 5)), color="tab:blue", alpha=0.8)
    ax.set_xlabel("episode return")
    ax.set_ylabel("episodes")
    if ref_min is not None:
        top = ax.secondary_xaxis("top", functions=(lambda r: normalized_score(r, ref_min, ref_max),
                                                   lambda x: ref_min + np.asarray(x) * (ref_max - ref_min) / 100))
        top.set_xlabel("normalised score")
    ax.set_title(title)
    save_figure(fig, path, "the return histogram")


class Algorithm(NamedTuple):
    """What the training loop needs of an algorithm. CVL is one (train, below); bench/td3_bc.py's TD3+BC another."""
    name: str  # "CVL": plot titles, checkpoints (a run resumes only with its own algorithm)
    script: str  # "cvl.py": how the messages say to continue a run
    init: Any  # seeds -> train state stacked over seeds, with .step and .actor
    train_chunk: Any  # jitted (state, data, n) -> (state, metrics {name: [n, K]}, finite [K])
    policy: Any  # (actor params, observations) -> deterministic actions, for one seed
    data: Any  # on the device: what train_chunk samples from
    data_id: str  # data_fingerprint of the dataset: a resumed run refuses other data


def train(cfg: Config) -> dict:
    """Train (or resume) a run and return its final metrics. Usable from a notebook: train(make_config("cpu"))."""
    check_config(cfg)
    cfg = with_absolute_dataset(cfg)
    init_distributed(cfg)
    data, env, obs_dim, act_dim = load_env_data(cfg)
    mesh = make_mesh(cfg)
    check_fits(cfg, len(data.rewards), obs_dim, act_dim, mesh.devices.size)
    nets = make_networks(cfg, act_dim)
    obs_norm = state_normalizer(np.asarray(data.observations)) if cfg.normalize_states else None
    algo = Algorithm("CVL", "cvl.py", lambda seeds: init_states(cfg, nets, seeds, obs_dim, act_dim, obs_norm),
                     make_train_fn(cfg, nets, mesh), env_policy(partial(eval_action, nets), env[0]),
                     replicate(data, mesh), data_fingerprint(data))
    return run_training(algo, cfg, env, mesh, f"{len(data.anchors):,} transitions with a future")


def data_fingerprint(data: Data) -> str:
    """Rows and a hash of the dataset's arrays (about 0.2 s for a million rows), stored with each checkpoint."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    for x in (data.observations, data.actions, data.rewards, data.episode_end, data.terminal):
        h.update(np.ascontiguousarray(x).tobytes())
    return f"{len(data.rewards):,} rows, hash {h.hexdigest()}"


ENV_BYTES = 1.5e6  # host memory of one MuJoCo eval env (measured: 1.0-1.2 MB for Hopper-v4 and HalfCheetah-v4)


def check_fits(cfg, rows: int, obs_dim: int, act_dim: int, devices: int = 1) -> None:
    """Refuse, before anything is written, a run that cannot fit: B x B logits past int32 indexing, or a rough
    estimate of its memory (the B x B logits and their temporaries, activations, parameters with their optimiser
    states, the data on the device; the evaluation envs on the host) above what the device or host has. The message
    names the flag to lower."""
    b, k = cfg.batch_size, cfg.num_seeds
    if b * b >= 2 ** 31:
        raise CVLError(f"--batch-size {b} makes {b * b:,} logits per batch, past int32 indexing; use at most 46340")
    dims = [obs_dim + act_dim, *cfg.hidden, 2 * max(getattr(cfg, "repr_dim", 1), act_dim)]
    params = 4 * 4 * sum(a * c + c for a, c in zip(dims, dims[1:]))  # phi, psi, actor, behaviour model: bytes
    passes = 1 + getattr(cfg, "action_negatives", 0) + 10  # phi's passes: the data, a', V(s), V(s'), the actor
    per_seed = {"--batch-size": 4 * (16 * b * b + 3 * b * sum(cfg.hidden) * passes) / devices,
                "--hidden": params * 6 * max(1, getattr(cfg, "critics", 1))}  # with grads, Adam, a target
    data = 4 * rows * (2 * obs_dim + act_dim + 4)
    have, where = device_memory()
    room = 0.9 * have - data
    if k * sum(per_seed.values()) > room:
        fit = int(room // sum(per_seed.values()))
        fix = (f"lower --num-seeds (about {fit} fit)" if fit >= 1 else
               f"lower {max(per_seed, key=per_seed.get)} (--batch-size {b}, --hidden {' '.join(map(str, cfg.hidden))})")
        raise CVLError(f"this run needs about {(k * sum(per_seed.values()) + data) / 1e9:,.1f} GB, more than the "
                       f"{have / 1e9:,.1f} GB of {where}; {fix}")
    envs, host = k * cfg.eval_episodes * ENV_BYTES, host_memory()
    if envs > 0.5 * host:
        raise CVLError(f"evaluation runs --num-seeds x --eval-episodes = {k * cfg.eval_episodes:,} envs at once, "
                       f"about {envs / 1e9:,.0f} GB, more than half of this host's {host / 1e9:,.0f} GB; lower "
                       f"--eval-episodes")


def host_memory() -> float:
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_memory() -> tuple[float, str]:
    """Bytes of the first local device (an accelerator's own limit, else the host's memory) and what it is."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return float(stats["bytes_limit"]), f"the {device.device_kind}"
    return host_memory(), "this host (CPU)"


def with_absolute_dataset(cfg):
    """--dataset as an absolute path, so the run resumes from any folder."""
    return dataclasses.replace(cfg, dataset=str(resolved_dataset(cfg.dataset))) if cfg.dataset else cfg


def run_training(algo: Algorithm, cfg, env, mesh, about: str, on_new_run=None) -> dict:
    """A new run directory (or cfg.resume's), its lock, config.json and a step-0 checkpoint, then the loop.
    on_new_run(run_dir) writes an algorithm's own files into a new run."""
    lead = jax.process_index() == 0
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    state = algo.init(seeds)
    fresh = not cfg.resume
    if cfg.resume:
        run_dir = run_directory(cfg.resume)
    else:
        run_dir = new_run_dir(cfg) if lead else Path(cfg.out)
    if lead:  # what a stop before the loop keeps: a new run without a checkpoint is removed, a resumed one kept
        PROCESS.update(run_dir=run_dir, script=algo.script, fresh=fresh, saved_step=None, phase="start",
                       acknowledged=False)
    with contextlib.ExitStack() as cleanup:
        if lead:
            cleanup.enter_context(run_lock(run_dir, algo.script))
        rows, elapsed = [], 0.0
        if cfg.resume:
            ckpt = load_checkpoint(run_dir, type(cfg), algo.name)
            if ckpt.get("data", algo.data_id) != algo.data_id:
                raise CVLError(f"the data changed since run {run_dir} was saved: it trained on {ckpt['data']}, "
                               f"{cfg.dataset or cfg.env} now holds {algo.data_id}; restore the data, or start a new "
                               f"run on the new data")
            if cfg.steps < ckpt["step"]:
                raise CVLError(f"--steps {cfg.steps} is below the {ckpt['step']} steps run {run_dir} has done; "
                               f"pass --steps {ckpt['step']} or more to extend it")
            state, rows = restore_state(state, ckpt["state"]), ckpt["rows"]
            PROCESS["saved_step"] = ckpt["step"]
            elapsed = rows[-1]["wall_time"] if rows else 0.0
        state = replicate(to_host_state(state), mesh)
        state = state.replace(key=jax.random.wrap_key_data(state.key))
        log = None
        if lead:
            try:
                write_file(run_dir / "config.json", lambda tmp: tmp.write_text(
                    json.dumps(dataclasses.asdict(cfg), indent=2)), "the run's config")
                log = MetricsLog(run_dir / "metrics.csv", rows)
                if fresh:  # so that a run stopped at any point can be resumed
                    if on_new_run is not None:
                        on_new_run(run_dir)
                    save_checkpoint(run_dir, state, cfg, log.rows, algo.name, algo.data_id)
                    PROCESS["saved_step"] = 0  # a new run starts at step 0
            except WriteError:
                if fresh:  # nothing to keep: leave no half-made run behind
                    cleanup.callback(shutil.rmtree, run_dir, ignore_errors=True)
                raise
            print(f"{script_name(algo)}: {run_label(cfg)}: {about}, eval on {env[0]}, {cfg.num_seeds} seed(s) on "
                  f"{mesh.devices.size} device(s) -> {run_dir}", flush=True)
        return train_loop(algo, state, elapsed, cfg=cfg, lead=lead, run_dir=run_dir, log=log, seeds=seeds, env=env)


def script_name(algo: Algorithm) -> str:
    """The prefix of an algorithm's messages: "cvl", "td3_bc"."""
    return Path(algo.script).stem


def train_loop(algo: Algorithm, state, elapsed, *, cfg, lead, run_dir, log, seeds, env) -> dict:
    """for each chunk: state = scan(update) on device; log, evaluate and checkpoint between chunks."""
    env_id, ref_min, ref_max = env
    me = script_name(algo)
    step = saved_step = int(np.max(to_host(state.step)))
    wandb_run = None
    if cfg.wandb and lead:
        import wandb

        wandb_run = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg), name=run_dir.name)

    def write_failed(e: WriteError) -> WriteError:  # what a full disk mid-run costs, and how to go on
        return WriteError(f"{e}; the last good checkpoint (step {saved_step}) in {run_dir} is kept: free space, "
                          f"then continue with: python {algo.script} --resume {run_dir}")

    def checkpoint(state, step):
        nonlocal saved_step
        try:
            save_checkpoint(run_dir, state, cfg, log.rows, algo.name, algo.data_id)
        except WriteError as e:
            raise write_failed(e) from None
        saved_step = PROCESS["saved_step"] = step

    stop = {}  # set by SIGINT/SIGTERM; the wait for a jitted call polls it
    handlers = catch_stop_signals(stop)
    PROCESS.update(phase="loop", saved_step=saved_step)
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and lead), desc=run_label(cfg),
               dynamic_ncols=True)
    last_score = None
    policy = seeds_policy(algo.policy)  # compiled at the first evaluation, reused by the others
    start = time.perf_counter() - elapsed
    try:
        while step < cfg.steps:
            n = min(cfg.updates_per_call, cfg.steps - step, cfg.eval_every - step % cfg.eval_every,
                    cfg.checkpoint_every - step % cfg.checkpoint_every)
            t0 = time.perf_counter()
            PROCESS["saved"] = saved_step == step  # a stop during this call's compile may end the process now
            new_state, metrics, finite = algo.train_chunk(state, algo.data, n)
            if not ready_unless_stopped((metrics, finite), stop):  # one XLA execution: new_state is ready with them
                raise KeyboardInterrupt  # `state`, from before this call, is complete: save it and exit now
            metrics, finite = to_host(metrics), to_host(finite)
            dt = time.perf_counter() - t0
            try:
                check_finite(metrics, finite, step, seeds, run_dir)
            except Diverged:
                if lead:  # the state before this call is the last good one: keep it
                    checkpoint(state, step)
                raise
            row = {"step": step + n, "wall_time": round(time.perf_counter() - start, 3), "updates_per_sec": n / dt}
            for name, values in metrics.items():
                row.update(per_seed_columns(name, values.mean(axis=0)))
            if (step + n) % cfg.eval_every == 0 or step + n == cfg.steps:
                t_eval = time.perf_counter()  # a stop during it keeps `state`, whose rows are all logged
                returns = evaluate(policy, new_state.actor, env_id, seeds, cfg.eval_episodes, stop)
                row["eval_seconds"] = round(time.perf_counter() - t_eval, 3)
                row.update(per_seed_columns("return_mean", returns.mean(axis=1)))
                row.update(per_seed_columns("return_std", returns.std(axis=1)))
                row.update(per_seed_columns("score", normalized_score(returns.mean(axis=1), ref_min, ref_max)))
                last_score = row["score"]
            state, step = new_state, step + n
            PROCESS["saved"] = False  # until the next checkpoint: a stop is the loop's to save
            if lead:
                try:
                    log.append(row)
                except WriteError as e:  # the rows after the last checkpoint are recomputed on resume
                    raise write_failed(e) from None
                if wandb_run is not None:
                    wandb_run.log(row, step=step)
            bar.update(n)
            shown = dict(critic="critic_loss", actor="actor_loss", acc="categorical_accuracy")
            bar.set_postfix(**{k: f"{row[name]:.3g}" for k, name in shown.items() if name in row},
                            ups=f"{n / dt:.0f}", score="-" if last_score is None else f"{last_score:.1f}")
            if lead and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                checkpoint(state, step)
            if stop:
                raise KeyboardInterrupt
    except KeyboardInterrupt:  # a signal, or Ctrl-C outside a jitted call: `state` is the last finished step
        PROCESS["acknowledged"] = True
        bar.close()
        if lead:
            if saved_step != step:
                checkpoint(state, step)
            print(f"{me}: interrupted at step {step}; checkpoint saved. Continue with: "
                  f"python {algo.script} --resume {run_dir}", file=sys.stderr, flush=True)
        raise Stopped(128 + stop.get("signal", signal.SIGINT)) from None
    finally:
        PROCESS["phase"] = "after the loop"
        bar.close()
        restore_signals(handlers)
        if wandb_run is not None:
            wandb_run.finish()

    final = dict(log.rows[-1]) if lead else {}
    if lead:
        try:
            plot_learning_curve(log.rows, run_dir / "learning_curve.png", f"{algo.name} on {run_label(cfg)}")
        except WriteError as e:  # the run itself is complete and saved
            print(f"{me}: warning: {e}; the run is complete, its metrics.csv and checkpoint are saved",
                  file=sys.stderr, flush=True)
        spread = f" +- {final['score_std']:.1f} over {len(seeds)} seeds" if "score_std" in final else ""
        print(f"{me}: done at step {step}: normalised score {final.get('score', float('nan')):.1f}{spread}, "
              f"return {final.get('return_mean', float('nan')):.1f}; results in {run_dir}", flush=True)
    final["run_dir"] = str(run_dir)
    return final


# Stopping at any moment (the command line, via command_line): SIGINT/SIGTERM outside the training loop's own
# polling, or while the main thread sits in a long C call (an XLA compile, where Python's handlers cannot run), end
# the process within about a second with one line. PROCESS says what there is to keep; no write is ever cut.
PROCESS: dict[str, Any] = {"writing": 0}


def guard_stops(prefix: str) -> None:
    """Handlers for the whole process, and a watcher thread woken by the C-level handler (set_wakeup_fd) that acts
    when the main thread cannot."""
    import threading

    r, w = os.pipe()
    os.set_blocking(w, False)
    signal.set_wakeup_fd(w)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _: stop_process(signum, prefix))

    def watch():
        signum = os.read(r, 1)[0]
        time.sleep(1.0)  # the main thread, or the training loop, usually acts first
        while PROCESS["writing"] or (PROCESS.get("phase") == "loop" and not PROCESS.get("saved")):
            time.sleep(0.05)  # never cut a write; a loop's unsaved step is the loop's to save
        if not PROCESS.get("acknowledged"):  # the loop saw the stop: it saves, says so and exits itself
            stop_process(signum, prefix)

    threading.Thread(target=watch, daemon=True).start()


def stop_process(signum: int, prefix: str) -> None:
    """One line and exit 128 + signum, keeping what was written: a new run directory without its first checkpoint
    is removed; a run with one says how to continue it. During a write, the stop waits for it (write_file)."""
    if PROCESS["writing"]:
        PROCESS["pending"] = (signum, prefix)
        return
    run_dir, step = PROCESS.get("run_dir"), PROCESS.get("saved_step")
    if run_dir is None:
        what = "nothing was written"
    elif step is None and PROCESS.get("fresh"):
        shutil.rmtree(run_dir, ignore_errors=True)
        what = f"the new run directory {run_dir} had no checkpoint yet and was removed"
    elif step is None:
        what = f"run {run_dir} is unchanged"
    else:
        what = f"run {run_dir} is saved at step {step}; continue with: python {PROCESS['script']} --resume {run_dir}"
    line = f"{prefix}: stopped by {signal.Signals(signum).name}; {what}\n"
    sys.stderr.flush()
    os.write(PROCESS.get("stderr_fd", 2), line.encode())  # the real stderr, also while an env is made (hidden)
    exit_now(128 + signum)


def catch_stop_signals(stop: dict) -> dict:
    """Make SIGINT/SIGTERM set stop["signal"] instead of ending the process, so a training loop can save its last
    finished step and exit. Returns the previous handlers, for restore_signals."""
    handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handlers[sig] = signal.signal(sig, lambda signum, _: stop.setdefault("signal", signum))
        except ValueError:  # not the main thread (e.g. some notebook runners): no graceful stop
            pass
    return handlers


def restore_signals(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def exit_now(code: int) -> None:
    """Exit at once after a stop whose last step is saved, rather than wait at shutdown for the jitted call still
    running (the __main__ of cvl.py and bench/td3_bc.py)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def ready_unless_stopped(outputs, stop: dict) -> bool:
    """Wait for a dispatched jitted call, polling so that Ctrl-C or SIGTERM is handled at once rather than after
    the call (minutes at the paper preset on a CPU). True once the outputs are ready, False if a signal came
    first."""
    leaves = jax.tree.leaves(outputs)
    while not stop:
        if all(x.is_ready() for x in leaves):
            return True
        time.sleep(0.005)
    PROCESS["acknowledged"] = True  # the loop handles this stop itself
    return False


def check_finite(metrics: dict, finite: np.ndarray, step: int, seeds: list[int], run_dir: Path) -> None:
    """Stop on the first NaN/inf loss or parameter, naming the step, the loss and the seed."""
    for name in ("critic_loss", "actor_loss"):
        bad = ~np.isfinite(metrics[name])  # [n, K]
        if bad.any():
            i, k = np.argwhere(bad)[0]
            raise Diverged(f"non-finite {name} at step {step + i + 1} (seed {seeds[k]}); training stopped, the "
                           f"last good checkpoint in {run_dir} is kept: lower --lr or check the data")
    if not finite.all():
        raise Diverged(f"non-finite parameters after step {step} (seed {seeds[int(np.argmin(finite))]}); training "
                       f"stopped, the last good checkpoint in {run_dir} is kept")


def evaluate_checkpoint(path: str, episodes: int, video: str = "", video_steps: int = 0) -> dict:
    """--evaluate: load a saved policy, report returns and normalised score, optionally write a video."""
    ckpt = load_checkpoint(Path(path))
    cfg = ckpt["config"]
    env_id, ref_min, ref_max = eval_env_spec(cfg)
    obs_dim, act_dim, _, _ = env_spaces(env_id)
    nets = make_networks(cfg, act_dim)
    seeds = [cfg.seed + i for i in range(cfg.num_seeds)]
    state = restore_state(init_states(cfg, nets, seeds, obs_dim, act_dim), ckpt["state"])
    policy = env_policy(partial(eval_action, nets), env_id)
    returns = evaluate(seeds_policy(policy), state.actor, env_id, seeds, episodes)
    scores = normalized_score(returns.mean(axis=1), ref_min, ref_max)
    result = {"step": ckpt["step"], **per_seed_columns("return_mean", returns.mean(axis=1)),
              **per_seed_columns("score", scores)}
    print(f"cvl: {run_label(cfg)} step {ckpt['step']}: return {returns.mean():.1f} +- {returns.std():.1f} over "
          f"{returns.size} episodes, normalised score {np.mean(scores):.1f}", flush=True)
    if video:
        frames = record_episode(jax.tree.map(lambda x: x[0], to_host(state.actor)), policy, env_id, seeds[0],
                                max_steps=video_steps)
        if frames is not None:
            write_video(frames, Path(video))
            result["video"] = video
            print(f"cvl: wrote {len(frames)} frames to {video}", flush=True)
    return result


def record_episode(actor, policy, env_id: str, seed: int, size=(480, 360), max_steps: int = 0):
    """One episode of policy(actor, obs) rendered offscreen; None (with a message) where no GL backend exists."""
    import gymnasium as gym

    try:
        with quiet_env_creation():
            env = gym.make(env_id, render_mode="rgb_array", width=size[0], height=size[1])
        obs, _ = env.reset(seed=eval_reset_seeds([seed], 1)[0])
        frames = [env.render()]
    except Exception as e:  # no EGL/OSMesa/GLFW: mujoco raises various errors
        print(f"cvl: no video: offscreen rendering failed ({type(e).__name__}: {e}); install an OpenGL backend "
              f"(Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri) and set MUJOCO_GL=egl", file=sys.stderr)
        return None
    policy = jax.jit(policy)
    done = False
    while not done:
        obs, _, terminated, truncated, _ = env.step(np.asarray(policy(actor, obs.astype(np.float32))))
        frames.append(env.render())
        done = terminated or truncated or len(frames) > max_steps > 0
    env.close()
    return frames


def write_video(frames, path: Path, fps: int = 30) -> None:
    import imageio.v2 as imageio

    make_dir(path.parent, "the video's folder")
    if path.suffix.lower() == ".gif":
        write_file(path, lambda tmp: imageio.mimsave(tmp, frames, duration=1000 / fps, loop=0), "the video")
    else:
        write_file(path, lambda tmp: imageio.mimsave(tmp, frames, fps=fps, macro_block_size=1), "the video")


# ===================================================================================================== the CLI
def parse_args(argv: Sequence[str] | None = None, config_cls=None, prog: str = "cvl.py", description: str = "",
               epilog: str = ""):
    """Flags from the fields of a config dataclass (default: Config, with the presets in the epilog). Returns the
    explicitly given fields only, so presets and saved runs can fill the rest. A bad flag is a CVLError."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, as every other bad input, not argparse's usage block
            raise CVLError(f"{message} (see: python {prog} --help)")

    if config_cls is None:
        config_cls, description = Config, __doc__.split("\n\n")[0]
        presets = "; ".join(f"{name}: {values or 'the defaults shown above'}" for name, values in PRESETS.items())
        epilog = f"presets (explicit flags win): {presets}"
    parser = Parser(prog=prog, description=description, epilog=epilog,
                    formatter_class=argparse.RawDescriptionHelpFormatter if config_cls is not Config else
                    argparse.HelpFormatter)
    for f in dataclasses.fields(config_cls):
        name = flag_name(f.name)
        kw = dict(help=f.metadata["help"], default=argparse.SUPPRESS)
        if f.type == "bool":
            parser.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "hidden":
            parser.add_argument(name, type=int, nargs="+", **kw)
        else:
            parser.add_argument(name, type={"int": int, "float": float}.get(f.type, str),
                                choices=f.metadata.get("choices"), **kw)
        parser._option_string_actions[name].help += f" (default: {f.default})"
    args = vars(parser.parse_args(argv))
    if "hidden" in args:
        args["hidden"] = tuple(args["hidden"])
    return args


def resume_config(run_dir: str, config_cls=None, algorithm: str = "CVL", **given):
    """The saved config of run_dir (or of the run its checkpoint file is in); a given value that contradicts it is an
    error naming the flag."""
    run_dir = run_directory(run_dir)
    saved = load_checkpoint(run_dir, config_cls, algorithm)["config"]
    may_change = {"resume", "progress", "wandb", "wandb_project", "steps"}
    for name, value in given.items():
        same = getattr(saved, name) == value
        if name == "dataset":  # the same file, however it is spelled
            same = Path(value).expanduser().resolve() == Path(saved.dataset).expanduser().resolve()
        if name not in may_change and not same:
            raise CVLError(f"{flag_name(name)} {value} contradicts the run being resumed "
                           f"({getattr(saved, name)}); drop the flag or start a new run")
    return dataclasses.replace(saved, resume=str(run_dir), **{k: v for k, v in given.items() if k in may_change})


def main(argv: Sequence[str] | None = None) -> dict:
    given = parse_args(argv)
    modes = [f"--{m}" for m in ("resume", "evaluate", "inspect") if given.get(m)]
    if len(modes) > 1:
        raise CVLError(f"{' and '.join(modes)} exclude each other (train on, only evaluate, only look at the data); "
                       f"pick one")
    if given.get("video") and not given.get("evaluate"):
        raise CVLError("--video needs --evaluate RUN_DIR (videos are made from saved policies)")
    if given.get("evaluate"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco is imported
        cfg = make_config(given.get("preset", "paper"), **{k: v for k, v in given.items() if k != "preset"})
        check_config(cfg)
        if cfg.video:
            video = Path(cfg.video)
            if video.suffix.lower() not in (".mp4", ".gif"):
                raise CVLError(f"--video {video} must end in .mp4 or .gif")
            make_dir(video.parent, "the video's folder")  # before the evaluation, not after it
        return evaluate_checkpoint(cfg.evaluate, cfg.eval_episodes, cfg.video, cfg.video_steps)
    if given.get("inspect"):
        cfg = make_config(given.pop("preset", "paper"), **given)
        check_config(cfg)
        return inspect_dataset(cfg)
    if given.get("resume"):
        return train(resume_config(given.pop("resume"), **given))
    return train(make_config(given.pop("preset", "paper"), **given))


def command_line(main, prefix: str = "cvl") -> None:
    """Run a script's main(): bad input is one line "<prefix>: error: ..." and exit 2, a divergence exit 3, a saved
    stop 128 + the signal, a stop at any other moment too (guard_stops)."""
    guard_stops(prefix)
    try:
        main()
    except CVLError as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, Diverged) else 2)
    except Stopped as e:
        exit_now(e.code)


if __name__ == "__main__":
    command_line(main)
