"""Diffusion Tree Sampling (DTS) and Diffusion Tree Search (DTS*) (Jain et al. 2025).

docs/algorithms.md section 10. The base reverse chain x_{t_0} -> ... -> x_{t_T} (the kernel of
`reward.reward_smc`, from N(0, sigma_{t_0}^2 I)) is grown into a tree whose nodes hold a state and
a soft value V, an estimate of log E[exp(r(x_T) / alpha) | node] under the base chain. Nodes live
in arrays of a fixed size `max_nodes` (the static node budget), indexed in creation order, so a
parent always precedes its children. Depth 0 is a dummy root (before t_0), depth k + 1 a state at
times[k], depth T + 1 a terminal state. One iteration:

1. Selection: from the root, while the node has `branching` children, step to a child: DTS draws
   it with probability proportional to exp(V(child)), DTS* takes the largest V (children whose
   whole subtree is built out, "saturated", are skipped: nothing is left to add there).
2. Expansion: the node reached gets a new child from the base kernel (the root: N(0, sigma^2 I)).
3. Rollout: the new child is run down the base chain to t_T; every state becomes a node.
4. Backup: the terminal node gets V = r(x_T) / alpha; each ancestor, bottom-up, gets
   V = log((1 / |C|) sum_{c in C} exp(V(c))) over all its children C, and one more visit.

The backup averages children UNIFORMLY: the children of a node are independent draws from the
base kernel, so the mean of exp(V(c)) estimates E[exp(V_next) | node] whatever the selection rule
did (a visit-weighted mean would count the selection's preference twice); the selection rule
only decides where the tree grows. DTS* changes the selection rule only (the authors: "no
other code changes"), so it keeps the soft backup.

Sampling from the final tree: descending by exp(V) ends at terminal node l with probability
exp(V(l) - V(root)) / prod_{a ancestor of l} |C(a)| (`leaf_log_probs`; the product telescopes),
a tree-shaped self-normalised importance sampler of p_theta(x) exp(r(x) / alpha), where p_theta
is the law of the discretised base chain. `num_samples` independent descents are drawn from that
law directly. DTS* returns the terminal node of highest reward (`best`): a search, with no
distributional claim.

What is exact: the paper's asymptotic exactness, as the tree fills out (a complete tree, with
`branching` children everywhere, is a nested importance sampler over branching^(T + 1) paths).
Before that, the exp(V) selection biases the samples in a way that plain importance sampling is
not: a child whose first rollout came out poor gets a low V, is rarely selected again and keeps
its low estimate, while a lucky one is revisited and corrected (an optional-stopping bias).
Measured on the DAS ring toy (VP, Euler-Maruyama, T = 20, branching 3, 16 seeds): at 6400
evaluations the (0, 4) mode holds 0.55 of the mass against 0.77 under the chain's own tilted law
and the mean reward is -2.29 +- 0.09 against -1.40, no better than at 1600; choosing children
uniformly instead (no adaptivity) gives -1.41 +- 0.02 at the same budget. With T = 10 and
branching 2 (tests/test_dts.py: a thousand evaluations build half of the complete tree) DTS
reaches the tilted law within Monte Carlo error.

Differences from the paper: the stopping rule is a score-evaluation budget (`max_evaluations`)
and a node budget (`max_nodes`), both static; the iteration that would overspend either is not
run. The selection skips saturated subtrees (a full subtree has nothing left to add; without
this a small tree could select it forever). The exp(V) descent for samples is replaced by the
same law drawn over the terminal nodes at once.

Cost (`DTSResult.score_evaluations`, exact): each new node at depths 1..T takes one score
evaluation (its state's score, which the next step from it needs); terminal nodes take a reward
evaluation and no score. An iteration that expands a node of depth k spends T - k; the first
spends T, as much as one particle of `reward.reward_smc`.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from proposals import sde as sde_proposals
from smc.validation import check_count
from targets.diffusion import reward as reward_lib
from targets.diffusion import sde

Array = jax.Array
KERNELS = reward_lib.KERNELS


class Tree(NamedTuple):
    """The search tree, in arrays of `max_nodes` rows (M) filled in creation order.

    parent [M] int32 (-1: the root, unused rows); depth [M] int32 (0: the root, k + 1: a state at
    times[k], T + 1: terminal; -1: unused); x [M, d]; score [M, d] (score(x, times[depth - 1]) at
    depths 1..T, zeros elsewhere); value [M] (V, in units of r / alpha); reward [M] (r(x) at
    terminal nodes, -inf elsewhere); visits [M] int32 (backups through the node); children
    [M, branching] int32 (-1: none); num_children [M] int32; saturated [M] bool (terminal, or
    `branching` children all saturated); size [] int32 (rows in use).
    """

    parent: Array
    depth: Array
    x: Array
    score: Array
    value: Array
    reward: Array
    visits: Array
    children: Array
    num_children: Array
    saturated: Array
    size: Array


class DTSResult(NamedTuple):
    """samples [S, d]: terminal states drawn by exp(V) descent; sample_rewards [S]: r(samples);
    best [d], best_reward []: the terminal node of highest reward (DTS*'s answer);
    leaf_log_probs [M]: log-probability that a descent ends at each node (-inf off terminal
    nodes); score_evaluations [] int32 (exact, module doc); num_rollouts [] int32 (iterations
    run = terminal nodes = reward evaluations); tree: the final `Tree`."""

    samples: Array
    sample_rewards: Array
    best: Array
    best_reward: Array
    leaf_log_probs: Array
    score_evaluations: Array
    num_rollouts: Array
    tree: Tree


def sample(key: Array, score: sde.ScoreFn, reward: reward_lib.RewardFn, *, alpha: float,
           schedule: sde.Schedule, times, dim: int, max_evaluations: int, branching: int = 4,
           num_samples: int = 1, kernel: str = "euler_maruyama",
           max_nodes: int | None = None) -> DTSResult:
    """DTS: grow the tree with exp(V) selection, then draw `num_samples` terminal states.

    score(x [N, d], t) -> [N, d]; reward(x [N, d]) -> [N]; alpha > 0: the target is
    p_theta(x) exp(r(x) / alpha); schedule, times (decreasing grid), dim and kernel
    ("euler_maruyama" or "ancestral") as in `reward.reward_smc`. max_evaluations >= T: the score
    evaluations the search may spend; branching >= 1: most children per node; max_nodes: rows of
    the tree (default `default_max_nodes`, which the search cannot outgrow). Under vmap each
    iteration also selects over the whole tree (O(max_nodes)): for long searches over many
    keys, prefer `jax.lax.map`. Pure and jit-able in `key`
    (the other arguments are static); input errors raise before anything is traced.
    """
    return _run(key, score, reward, alpha=alpha, schedule=schedule, times=times, dim=dim,
                max_evaluations=max_evaluations, branching=branching, num_samples=num_samples,
                kernel=kernel, max_nodes=max_nodes, greedy=False)


def search(key: Array, score: sde.ScoreFn, reward: reward_lib.RewardFn, *, alpha: float,
           schedule: sde.Schedule, times, dim: int, max_evaluations: int, branching: int = 4,
           num_samples: int = 1, kernel: str = "euler_maruyama",
           max_nodes: int | None = None) -> DTSResult:
    """DTS*: the same tree grown by greedy selection (largest V); `best` is its answer. Arguments
    as in `sample` (alpha sets how soft the backed-up values are)."""
    return _run(key, score, reward, alpha=alpha, schedule=schedule, times=times, dim=dim,
                max_evaluations=max_evaluations, branching=branching, num_samples=num_samples,
                kernel=kernel, max_nodes=max_nodes, greedy=True)


def default_max_nodes(max_evaluations: int, branching: int, num_steps: int) -> int:
    """The most rows a search can fill: min(1 + (1 + branching) max_evaluations, the complete
    tree 1 + branching + ... + branching^(T + 1)). Every row but the root and the terminal ones
    costs an evaluation, and a scored row has at most `branching` terminal children."""
    complete = sum(branching**k for k in range(num_steps + 2))
    return min(1 + (1 + branching) * max_evaluations, complete)


# ---------------------------------------------------------------------------------------------


def _run(key, score, reward, *, alpha, schedule, times, dim, max_evaluations, branching,
         num_samples, kernel, max_nodes, greedy) -> DTSResult:
    alpha = reward_lib.check_alpha(alpha)
    times = sde.check_time_grid(times, schedule)
    num_steps = len(times) - 1
    dim = check_count("dim", dim, 1)
    branching = check_count("branching", branching, 1)
    num_samples = check_count("num_samples", num_samples, 1)
    max_evaluations = check_count("max_evaluations", max_evaluations, 0)
    if max_evaluations < num_steps:
        raise ValueError(f"max_evaluations must be >= the number of steps ({num_steps}, one "
                         f"rollout from the root), got {max_evaluations}")
    if max_nodes is None:
        max_nodes = default_max_nodes(max_evaluations, branching, num_steps)
    max_nodes = check_count("max_nodes", max_nodes, 0)
    if max_nodes < num_steps + 2:
        raise ValueError(f"max_nodes must be >= the number of steps + 2 ({num_steps + 2}: the "
                         f"root and one rollout), got {max_nodes}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    reward_lib.check_callables(score, reward, dim)

    key_tree, key_samples = jax.random.split(key)
    ts = jnp.asarray(times, jnp.float32)
    init_std = sde.sigma(schedule, ts[0])

    class Node(NamedTuple):
        """A row of the tree with what a step out of it needs, read once before the loops
        that write the tree (a loop that reads a row it writes makes XLA copy the arrays)."""

        row: Array
        depth: Array
        x: Array
        score: Array

    def child_state(key: Array, depth: Array, x: Array, s: Array) -> Array:
        """A draw from the base kernel out of a node at `depth` with state x and score s (the
        root, depth 0: N(0, sigma_{t_0}^2 I))."""
        k = jnp.maximum(depth - 1, 0)
        base = sde.reverse_kernel(schedule, kernel, x[None], s[None], ts[k], ts[k + 1])
        stepped = sde_proposals.sample(key, base)[0][0]
        fresh = init_std * jax.random.normal(key, (dim,), jnp.float32)
        return jnp.where(depth == 0, fresh, stepped)

    def select(key: Array, tree: Tree) -> tuple[Array, Array]:
        """The node to expand and its depth: descend while the node has all its children. A
        full node at depth T is saturated (its children are terminal), so T steps suffice."""
        def descend(_, carry):
            node, depth = carry
            children = tree.children[node]
            safe = jnp.maximum(children, 0)
            logits = jnp.where((children >= 0) & ~tree.saturated[safe], tree.value[safe],
                               -jnp.inf)
            if greedy:
                pick = jnp.argmax(logits)
            else:
                pick = jax.random.categorical(jax.random.fold_in(key, depth), logits)
            full = (tree.num_children[node] == branching) & ~tree.saturated[node]
            return jnp.where(full, children[pick], node), depth + full.astype(jnp.int32)

        return jax.lax.fori_loop(0, num_steps, descend, (jnp.int32(0), jnp.int32(0)))

    def rollout(key: Array, tree: Tree, node: Node, slot: Array) -> tuple[Tree, Array]:
        """A path from `node` down to t_T, attached as child number `slot` of `node`; returns the
        tree and the terminal row. The states are made by a loop whose carry is one path
        ([T, d]; cheap to carry under vmap), then written as rows size, size + 1, ... at once."""
        class Path(NamedTuple):
            length: Array
            depth: Array
            x: Array
            score: Array
            xs: Array
            scores: Array

        def scored_step(path: Path) -> Path:
            x = child_state(jax.random.fold_in(key, path.depth), path.depth, path.x, path.score)
            s = score(x[None], ts[path.depth])[0]            # the child's time: times[depth]
            return Path(path.length + 1, path.depth + 1, x, s, path.xs.at[path.length].set(x),
                        path.scores.at[path.length].set(s))

        empty = jnp.zeros((num_steps, dim), jnp.float32)
        path = jax.lax.while_loop(lambda path: path.depth < num_steps, scored_step,
                                  Path(jnp.int32(0), node.depth, node.x, node.score, empty, empty))
        x_end = child_state(jax.random.fold_in(key, num_steps), path.depth, path.x, path.score)
        r_end = reward(x_end[None])[0]

        # Rows size + i, i = 0..length: scored states, then the terminal one (i = length).
        i = jnp.arange(num_steps + 1)
        length = path.length
        rows = jnp.where(i <= length, tree.size + i, max_nodes)     # the rest is dropped
        is_end = i == length
        pad = jnp.concatenate([path.xs, x_end[None]])
        xs = jnp.where(is_end[:, None], x_end, pad)
        scores = jnp.where(is_end[:, None], 0.0, jnp.concatenate([path.scores, empty[:1]]))
        rewards = jnp.where(is_end, r_end, -jnp.inf)
        drop = {"mode": "drop"}
        tree = tree._replace(
            parent=tree.parent.at[rows].set(jnp.where(i == 0, node.row, tree.size + i - 1),
                                            **drop),
            depth=tree.depth.at[rows].set(node.depth + 1 + i, **drop),
            x=tree.x.at[rows].set(xs, **drop), score=tree.score.at[rows].set(scores, **drop),
            value=tree.value.at[rows].set(jnp.where(is_end, r_end / alpha, 0.0), **drop),
            reward=tree.reward.at[rows].set(rewards, **drop),
            visits=tree.visits.at[rows].set(is_end.astype(jnp.int32), **drop),
            children=tree.children.at[node.row, slot].set(tree.size).at[rows, 0].set(
                jnp.where(is_end, -1, tree.size + i + 1), **drop),
            num_children=tree.num_children.at[node.row].add(1).at[rows].set(
                jnp.where(is_end, 0, 1), **drop),
            saturated=tree.saturated.at[rows].set(is_end, **drop),
            size=tree.size + length + 1)
        return tree, tree.size - 1

    def backup(tree: Tree, leaf: Array) -> Tree:
        """V = log mean exp V(children) and one more visit for the T + 1 ancestors of `leaf`."""
        def one(_, carry):
            tree, node = carry
            children = tree.children[node]
            valid = children >= 0
            safe = jnp.maximum(children, 0)
            count = tree.num_children[node]
            value = (jax.nn.logsumexp(jnp.where(valid, tree.value[safe], -jnp.inf))
                     - jnp.log(count.astype(jnp.float32)))
            saturated = (count == branching) & jnp.all(~valid | tree.saturated[safe])
            tree = tree._replace(value=tree.value.at[node].set(value),
                                 saturated=tree.saturated.at[node].set(saturated),
                                 visits=tree.visits.at[node].add(1))
            return tree, tree.parent[node]

        return jax.lax.fori_loop(0, num_steps + 1, one, (tree, tree.parent[leaf]))[0]

    class Loop(NamedTuple):
        tree: Tree
        evaluations: Array
        rollouts: Array
        node: Node          # the next iteration's node to expand, selected ahead (the loop
        slot: Array         # body then reads no row it writes: XLA would copy the arrays),
        fits: Array         # its next child slot, and whether its rollout fits both budgets

    def plan(tree: Tree, evaluations: Array, rollouts: Array) -> tuple[Node, Array, Array]:
        row, depth = select(jax.random.split(jax.random.fold_in(key_tree, rollouts))[0], tree)
        fits = ((evaluations + num_steps - depth <= max_evaluations)
                & (tree.size + num_steps + 1 - depth <= max_nodes) & ~tree.saturated[row])
        return Node(row, depth, tree.x[row], tree.score[row]), tree.num_children[row], fits

    def iteration(loop: Loop) -> Loop:
        key_rollout = jax.random.split(jax.random.fold_in(key_tree, loop.rollouts))[1]
        tree, leaf = rollout(key_rollout, loop.tree, loop.node, loop.slot)
        tree = backup(tree, leaf)
        evaluations = loop.evaluations + num_steps - loop.node.depth
        rollouts = loop.rollouts + 1
        return Loop(tree, evaluations, rollouts, *plan(tree, evaluations, rollouts))

    tree = empty_tree(max_nodes, dim, branching)
    zero = jnp.int32(0)
    final = jax.lax.while_loop(lambda loop: loop.fits, iteration,
                               Loop(tree, zero, zero, *plan(tree, zero, zero)))
    tree = final.tree
    log_probs = leaf_log_probs(tree)
    picks = jax.random.categorical(key_samples, log_probs, shape=(num_samples,))
    best = jnp.argmax(tree.reward)
    return DTSResult(samples=tree.x[picks], sample_rewards=tree.reward[picks], best=tree.x[best],
                     best_reward=tree.reward[best], leaf_log_probs=log_probs,
                     score_evaluations=final.evaluations, num_rollouts=final.rollouts,
                     tree=tree)


def empty_tree(max_nodes: int, dim: int, branching: int) -> Tree:
    """A tree holding only the root (row 0, depth 0)."""
    m = max_nodes
    return Tree(parent=jnp.full((m,), -1, jnp.int32),
                depth=jnp.full((m,), -1, jnp.int32).at[0].set(0),
                x=jnp.zeros((m, dim), jnp.float32), score=jnp.zeros((m, dim), jnp.float32),
                value=jnp.zeros((m,), jnp.float32), reward=jnp.full((m,), -jnp.inf, jnp.float32),
                visits=jnp.zeros((m,), jnp.int32),
                children=jnp.full((m, branching), -1, jnp.int32),
                num_children=jnp.zeros((m,), jnp.int32), saturated=jnp.zeros((m,), bool),
                size=jnp.int32(1))


def leaf_log_probs(tree: Tree) -> Array:
    """[M]: the log-probability that a descent from the root, to child c of node a with
    probability exp(V(c)) / sum_{c' in C(a)} exp(V(c')), ends at each row (-inf off the terminal
    rows). After the soft backup this is exp(V(leaf) - V(root)) / prod |C(a)| over its
    ancestors. Rows are in creation order (parents first), so one pass per depth fills a level."""
    terminal = jnp.max(tree.depth)
    parent = jnp.maximum(tree.parent, 0)
    children = tree.children
    log_total = jax.nn.logsumexp(
        jnp.where(children >= 0, tree.value[jnp.maximum(children, 0)], -jnp.inf), axis=1)
    step = tree.value - log_total[parent]

    def level(depth, log_p):
        return jnp.where(tree.depth == depth, log_p[parent] + step, log_p)

    log_p = jax.lax.fori_loop(1, terminal + 1, level, jnp.where(tree.depth == 0, 0.0, -jnp.inf))
    return jnp.where(tree.depth == terminal, log_p, -jnp.inf)


def score_evaluations(tree: Tree) -> Array:
    """[] int32: the score evaluations that grew `tree`: one per row at depths 1..T."""
    return jnp.sum((tree.depth >= 1) & (tree.depth < jnp.max(tree.depth))).astype(jnp.int32)


def truncate(tree: Tree, max_evaluations) -> Tree:
    """The tree a search with the same key and a budget of `max_evaluations` would have grown
    (DTS is anytime: one search gives the answer at every smaller budget). Rows are in creation
    order, so that tree is the rows up to the last rollout whose running count of evaluations
    stays within the budget, with values, saturation and visits recomputed bottom-up. (A search
    stopped by its node budget instead has the same rows.)
    """
    terminal = jnp.max(tree.depth)
    is_terminal = tree.depth == terminal
    rows = jnp.arange(tree.parent.shape[0])
    spent = jnp.cumsum((tree.depth >= 1) & ~is_terminal)       # evaluations up to each row
    size = jnp.max(jnp.where(is_terminal & (spent <= max_evaluations), rows, -1)) + 1
    keep = rows < size
    children = jnp.where((tree.children >= 0) & (tree.children < size), tree.children, -1)
    branching = children.shape[1]
    tree = tree._replace(
        parent=jnp.where(keep, tree.parent, -1), depth=jnp.where(keep, tree.depth, -1),
        x=jnp.where(keep[:, None], tree.x, 0.0), score=jnp.where(keep[:, None], tree.score, 0.0),
        reward=jnp.where(keep, tree.reward, -jnp.inf), children=children,
        num_children=jnp.sum(children >= 0, axis=1).astype(jnp.int32),
        visits=jnp.where(keep & is_terminal, 1, 0).astype(jnp.int32),
        saturated=keep & is_terminal, size=size.astype(jnp.int32),
        value=jnp.where(keep & is_terminal, tree.value, 0.0))

    def level(k, tree):
        depth = terminal - 1 - k
        valid = tree.children >= 0
        safe = jnp.maximum(tree.children, 0)
        count = tree.num_children
        value = (jax.nn.logsumexp(jnp.where(valid, tree.value[safe], -jnp.inf), axis=1)
                 - jnp.log(jnp.maximum(count, 1).astype(jnp.float32)))
        saturated = (count == branching) & jnp.all(~valid | tree.saturated[safe], axis=1)
        visits = jnp.sum(jnp.where(valid, tree.visits[safe], 0), axis=1)
        here = tree.depth == depth
        return tree._replace(value=jnp.where(here, value, tree.value),
                             saturated=jnp.where(here, saturated, tree.saturated),
                             visits=jnp.where(here, visits, tree.visits))

    return jax.lax.fori_loop(0, terminal, level, tree)
