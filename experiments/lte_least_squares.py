"""LTE's motivating example (Huh et al., "Training Neural Networks from Scratch with Parallel
Low-Rank Adapters"): a full-rank linear least-squares target learnt through low-rank adapters,
with and without merging.

    python experiments/lte_least_squares.py [--dim 64] [--rank 8] [--steps 10000]
        [--merge_every 1,10,100,1000] [--lte_heads 4,8,16] [--lte_merge_every 10]
        [--out experiments/results/lte_least_squares]

The problem: inputs X [n, d] ~ N(0, 1) (n = `--rows`), a full-rank target W* [d, d] ~ N(0, 1/d),
loss L(W) = ||X W - X W*||^2 / (2 n), reported as L(W) / L(0) (W starts at 0). Every arm descends
the same loss by full-batch gradient descent (optax.sgd), for the same number of steps:

- full rank: W itself, at `--learning_rate` (the reference);
- LoRA: W frozen, W + s A B trained through A [d, r] and B [r, d] (models/linear.py's layout,
  x W with W [in, out]; LTE's orthogonal A, B zero; the product is `methods/lora.py`'s merge),
  no merging: W + s A B has rank r, so the loss cannot go below that of the best rank-r W;
- LoRA merged every T steps: after every T-th step `lora.merge_params` folds s A B into W, then
  B := 0 and A := a fresh orthogonal draw (merge and restart, as in ReLoRA: each interval
  explores a new r-dimensional subspace; plain gradient descent has no optimizer state to keep
  or reset). A reset-less merge would change nothing with one head (next item);
- LTE, N heads x rank r, merged every `--lte_merge_every` steps: the project's reset-less LTE
  (`training/lte.py`: `assemble` gives head n's W + s (A_n B_n - A'_n B'_n), `merge` and
  `main_params` the merge), head n trained on the n-th of N disjoint shares of X's rows, A_n and
  B_n never reset. The merges telescope, W = W_0 + s mean_n A_n B_n, so its rank is at most N r:
  with one head it is exactly LoRA without merging, and it can reach the full-rank solution only
  when N r >= d. The recorded loss is the merged model's (`lte.main_params`) on all rows.

A and B train at the rate that moves W + s A B, in A's subspace, as far as the full-rank step
moves W: A's r singular values are sqrt(d / r), so s A dB = -lr_ab s^2 (d / r) P G for a
projection P; lr_ab = lr r / (d s^2).

Writes `<out>.md` (per arm: the least loss any W of its update's rank can reach, the final loss,
steps to reach `--threshold`; and a Reading written from these numbers) and `<out>.png` (loss vs
step, log scale). Takes under a minute on a 2-core CPU (every arm is one `lax.scan`).
"""
import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_research import training
from llm_research.methods import lora
from llm_research.training import lte
from llm_research.models.linear import orthogonal_adapter_init
from report import header, write


class Problem:
  """X [n, d] and W* [d, d]; the loss of a weight W [d, d] on X or on a share of its rows,
  through their second moments (X^T X / n, [d, d]: the loss's Hessian)."""

  def __init__(self, dim: int, rows: int, seed: int):
    x_key, target_key = jax.random.split(jax.random.key(seed))
    self.dim = dim
    self.x = jax.random.normal(x_key, (rows, dim))  # [n, d]
    self.target = jax.random.normal(target_key, (dim, dim)) / np.sqrt(dim)  # W*, [d, d]
    self.hessian = self.second_moment(self.x)
    self.initial = self.loss(jnp.zeros((dim, dim)))

  @staticmethod
  def second_moment(rows):
    return rows.T @ rows / rows.shape[0]  # [d, d]

  def loss(self, weight, hessian=None):
    """||X W - X W*||^2 / (2 n) = tr(E^T H E) / 2, E = W - W*, H = X^T X / n over the rows
    whose second moment `hessian` is (default: all of X)."""
    error = weight - self.target  # [d, d]
    h = self.hessian if hessian is None else hessian
    return 0.5 * jnp.sum(error * (h @ error))

  def relative(self, weight):
    return self.loss(weight) / self.initial


def descend(problem, state, loss_of_trained, weight_of, steps, learning_rate, hooks=()):
  """`steps` of gradient descent on `state.params["trained"]` against
  `loss_of_trained(trained, frozen)`, each followed by the after-step `hooks`
  (training.AfterStepHook, as in training); [steps] relative losses of the weight
  `weight_of(params)` [d, d], recorded after each step and its hooks."""
  optimizer = optax.sgd(learning_rate)
  state = state.replace(opt_state=optimizer.init(state.params["trained"]))

  def step(state, _):
    grads = jax.grad(loss_of_trained)(state.params["trained"], state.params["frozen"])
    updates, opt_state = optimizer.update(grads, state.opt_state)
    params = {**state.params, "trained": optax.apply_updates(state.params["trained"], updates)}
    state = training.apply_hooks(state.replace(step=state.step + 1, params=params,
                                            opt_state=opt_state), hooks)
    return state, problem.relative(weight_of(state.params))

  return np.asarray(jax.lax.scan(step, state, length=steps)[1])


def start(trained, frozen, seed: int) -> training.TrainState:
  """A train state whose params are {"trained": ..., "frozen": ...}, its RNG from `seed`."""
  return training.TrainState(step=jnp.zeros((), jnp.int32),
                          params={"trained": trained, "frozen": frozen}, opt_state=None,
                          rng=jax.random.key_data(jax.random.key(seed)))


def full_rank(problem, args):
  state = start(jnp.zeros((problem.dim, problem.dim)), None, args.seed)
  return descend(problem, state, lambda w, _: problem.loss(w), lambda p: p["trained"],
                 args.steps, args.learning_rate)


def first_adapters(args, heads: int, dim: int):
  """A [N, d, r] (LTE's orthogonal init) and B [N, r, d] (zero); the same first head for
  every arm."""
  return {"lora_a": orthogonal_adapter_init(jax.random.key(args.seed + 1), (heads, dim,
                                                                            args.rank)),
          "lora_b": jnp.zeros((heads, args.rank, dim))}


def lora_run(problem, args, merge_every: int | None):
  """One LoRA of rank r on a frozen W = 0; merged (and restarted) every `merge_every` steps."""
  d, scale = problem.dim, args.alpha / args.rank
  layer = lambda p: {"kernel": p["frozen"], **p["trained"]}
  weight_of = lambda p: lora.merge_params(layer(p), scale)["kernel"]  # W + s A B, [d, d]

  def merge_and_restart(state):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    fresh = {"lora_a": orthogonal_adapter_init(key, (1, d, args.rank)),
             "lora_b": jnp.zeros((1, args.rank, d))}
    return state.replace(params={"frozen": weight_of(state.params), "trained": fresh})

  hooks = (training.AfterStepHook(merge_every, merge_and_restart),) if merge_every else ()
  state = start(first_adapters(args, 1, d), jnp.zeros((d, d)), args.seed)
  loss = lambda trained, frozen: problem.loss(weight_of({"trained": trained, "frozen": frozen}))
  return descend(problem, state, loss, weight_of, args.steps, adapter_learning_rate(args, d),
                 hooks)


def lte_run(problem, args, heads: int):
  """LTE (training/lte.py) with `heads` heads of rank r, each on its share of X's rows."""
  d = problem.dim
  adapters = {"w": first_adapters(args, heads, d)}
  initial = lte.LTEState(main={"w": {"kernel": jnp.zeros((d, d))}}, heads=adapters,
                         merged=adapters, master=None, scale=args.alpha / args.rank)
  shares = jax.vmap(problem.second_moment)(problem.x.reshape(heads, -1, d))  # [N, d, d]
  weight_of = lambda p: lte.main_params(p["frozen"].replace(heads=p["trained"]))["w"]["kernel"]

  def loss_of_heads(trained, frozen):  # the sum of every head's loss on its share
    def head_loss(head, merged, share_hessian):
      layer = lte.assemble(frozen.main, head, merged)["w"]  # 2 LoRA heads: [A, A'], [B, -B']
      return problem.loss(lora.merge_params(layer, frozen.scale)["kernel"], share_hessian)
    return jnp.sum(jax.vmap(head_loss)(trained, frozen.merged, shares))

  def merge(state):
    merged = lte.merge(state.params["frozen"].replace(heads=state.params["trained"]))
    return state.replace(params={"trained": merged.heads, "frozen": merged})

  hooks = (training.AfterStepHook(args.lte_merge_every, merge),)
  state = start(initial.heads, initial, args.seed)
  return descend(problem, state, loss_of_heads, weight_of, args.steps,
                 adapter_learning_rate(args, d), hooks)


def adapter_learning_rate(args, dim: int) -> float:
  """lr r / (d s^2): see the module docstring."""
  return args.learning_rate * args.rank / (dim * (args.alpha / args.rank) ** 2)


def rank_floor(problem, rank: int) -> float:
  """The least L(W) / L(0) of any W of rank <= `rank`: with H = C C^T, L(W) = ||C^T (W -
  W*)||^2 / 2, and C^T W is any matrix of that rank, so the floor is the tail of the singular
  values of C^T W* (Eckart-Young)."""
  cholesky = np.linalg.cholesky(np.asarray(problem.hessian, np.float64))
  singular = np.linalg.svd(cholesky.T @ np.asarray(problem.target, np.float64),
                           compute_uv=False)
  return float(np.sum(singular[rank:] ** 2) / np.sum(singular ** 2))


@dataclasses.dataclass
class Arm:
  name: str
  panel: str  # "lora" (one LoRA, merged or not), "lte", or "both" (the references)
  rank: str  # of the update W - W_0
  floor: float  # the best L / L(0) at that rank
  curve: np.ndarray  # [steps] L / L(0) after each step

  def steps_to(self, threshold: float) -> int | None:
    below = np.flatnonzero(self.curve <= threshold)
    return int(below[0]) + 1 if below.size else None


def reading(arms: dict, args) -> str:
  """What the run shows against the paper's claims, from its numbers."""
  threshold, r, d = args.threshold, args.rank, args.dim

  def reaches(arm):
    steps = arm.steps_to(threshold)
    return (f"reaches {threshold:g} in {steps} steps" if steps else
            f"does not reach {threshold:g} in {args.steps} steps (ends at {arm.curve[-1]:.1e})")

  def ordered(arms):  # each reaches the threshold no later than the next
    steps = [arm.steps_to(threshold) or np.inf for arm in arms]
    return all(a <= b for a, b in zip(steps, steps[1:]))

  no_merge, one_head = arms["LoRA, no merging"], arms[f"LTE 1 x {r}"]
  merged = [arm for name, arm in arms.items() if name.startswith("LoRA merged")]
  lte_arms = [arm for name, arm in arms.items() if name.startswith("LTE") and arm is not one_head]
  full_rank_lte = [arm for arm in lte_arms if arm.floor == 0.0]
  return (
      f"Without merging, LoRA plateaus at {no_merge.curve[-1]:.3f} of the initial loss (the "
      f"best rank-{r} W: {no_merge.floor:.3f}); LTE with one head follows it step for step "
      f"(largest difference {np.max(np.abs(one_head.curve - no_merge.curve)):.1e}): the "
      "reset-less merges telescope, W = W_0 + s A B. Merging and restarting recovers the "
      "full-rank solution: " + "; ".join(f"{arm.name.split('every ')[1]} {reaches(arm)}"
                                        for arm in merged)
      + f" (full rank {reaches(arms['full rank (gradient descent)'])}). "
      + ("So the more frequent the merges, the faster, as the paper reports: "
         if ordered(merged) else "Not monotone in T, against the paper's report. ")
      + "a restart draws a new subspace, and within one interval LoRA soon converges in its "
      "subspace, after which the interval's remaining steps gain little. LTE: "
      + "; ".join(f"{arm.name[4:]} (update rank <= {arm.rank.removeprefix('<= ')}, floor "
                  f"{arm.floor:.1e}) {reaches(arm)}" for arm in lte_arms)
      + f". Only heads x rank >= d = {d} reaches the full-rank solution, "
      + ("and more heads reach it sooner (more random subspaces cover the d directions more "
         "evenly). " if ordered(full_rank_lte[::-1]) else "but more heads are not faster here. ")
      + "One seed, plain gradient descent at one learning rate. LTE's B_n grow with N (the "
      "heads' mean, not their sum, makes up W*), and so does the curvature A_n sees: at d = 64 "
      "and lr 0.3, 32 heads of rank 4, or 16 of rank 8 on 1024 rows, diverged in trial runs.")


def plot(arms: dict, args):
  """The figure: loss vs step, log-log; one LoRA's arms left, LTE's right, the references in
  both."""
  import matplotlib.pyplot as plt

  d, r = args.dim, args.rank
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  steps = np.arange(1, args.steps + 1)
  for arm in arms.values():
    reference = arm.panel == "both"
    for ax in axes if reference else axes[arm.panel == "lte":][:1]:
      ax.plot(steps, np.maximum(arm.curve, 1e-12), label=arm.name,  # float32 ends near 1e-14
              linestyle="--" if reference else "-", zorder=3 if reference else 2,
              color=("black" if arm.rank == str(d) else "gray") if reference else None)
  titles = ["one LoRA, merged and restarted every T steps",
            f"LTE: N heads x rank {r}, merged every {args.lte_merge_every} steps (reset-less)"]
  for ax, title in zip(axes, titles):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(args.threshold, color="gray", linewidth=0.5, linestyle=":")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("L(W) / L(0) (clipped at 1e-12)")
  fig.suptitle(f"least squares, d = {d}, full-rank target, rank {r} adapters", fontsize=11)
  fig.tight_layout()
  return fig


def write_results(arms: dict, args, seconds: float) -> None:
  import matplotlib
  matplotlib.use("Agg")

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  d, r = args.dim, args.rank
  command = (f"python experiments/lte_least_squares.py --dim {d} --rank {r} "
             f"--steps {args.steps} --merge_every {args.merge_every} --lte_heads {args.lte_heads} "
             f"--lte_merge_every {args.lte_merge_every}")
  lines = [
      *header("LTE's least-squares example: a full-rank target through rank-r adapters", command,
              seconds),
      f"Problem: X [{args.rows}, {d}] ~ N(0, 1), W* [{d}, {d}] ~ N(0, 1/{d}) (full rank), "
      f"L(W) = `||XW - XW*||^2 / 2n` from W = 0; full-batch gradient descent (optax.sgd), lr "
      f"{args.learning_rate} for W, lr r / (d s^2) = {adapter_learning_rate(args, d):.3g} for "
      f"the adapters (s = alpha / r = {args.alpha / r:g}). Merged LoRA: W += s A B, then B := 0 "
      "and a fresh orthogonal A. LTE: training/lte.py's reset-less merge every "
      f"{args.lte_merge_every} steps (A_n, B_n kept), head n on the n-th share of the rows. "
      "Floor: the least loss of any W of the update's rank.",
      "",
      f"| arm | rank of W - W_0 | floor | final L / L(0) | steps to {args.threshold:g} |",
      "|---|---|---|---|---|",
  ]
  for arm in arms.values():
    lines.append(f"| {arm.name} | {arm.rank} | {arm.floor:.2e} | {arm.curve[-1]:.2e} | "
                 f"{arm.steps_to(args.threshold) or 'never'} |")
  lines += ["", "Reading: " + reading(arms, args)]
  write(args.out + ".md", lines)
  plot(arms, args).savefig(args.out + ".png", dpi=120)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--alpha", type=float, default=8.0, help="s = alpha / rank")
  parser.add_argument("--steps", type=int, default=10000)
  parser.add_argument("--rows", type=int, default=2048, help="n, the rows of X")
  parser.add_argument("--learning_rate", type=float, default=0.3)
  parser.add_argument("--merge_every", default="1,10,100,1000")
  parser.add_argument("--lte_heads", default="4,8,16", help="N of the LTE arms")
  parser.add_argument("--lte_merge_every", type=int, default=10)
  parser.add_argument("--threshold", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="experiments/results/lte_least_squares")
  return parser.parse_args(argv)


def run_arms(args) -> dict:
  """{name: Arm} of every arm, trained."""
  problem = Problem(args.dim, args.rows, args.seed)
  d, r = args.dim, args.rank
  floor = lambda rank: rank_floor(problem, min(rank, d))
  arms = [Arm("full rank (gradient descent)", "both", str(d), 0.0, full_rank(problem, args)),
          Arm("LoRA, no merging", "both", str(r), floor(r), lora_run(problem, args, None))]
  for t in (int(t) for t in args.merge_every.split(",")):
    arms.append(Arm(f"LoRA merged every T={t}", "lora", f"<= {r} per merge", 0.0,
                    lora_run(problem, args, t)))
  for heads in [1, *(int(n) for n in args.lte_heads.split(","))]:
    arms.append(Arm(f"LTE {heads} x {r}", "lte", f"<= {min(heads * r, d)}", floor(heads * r),
                    lte_run(problem, args, heads)))
  return {arm.name: arm for arm in arms}


def main():
  args = parse_args()
  begin = time.perf_counter()
  arms = run_arms(args)
  write_results(arms, args, time.perf_counter() - begin)


if __name__ == "__main__":
  main()
