"""Diffusion Tree Sampling (DTS) and Diffusion Tree Search (DTS*) (Jain et al., arXiv 2506.20701, Alg. 1-2).

A tree over partial denoising trajectories. The root is a dummy parent of the initial noise draws; a node at
level ``l`` holds a state at time index ``branch_steps[l]`` (the leaves, one level further, hold clean samples
``x0`` with their reward). Edges are multi-step stochastic denoising segments, so the tree branches only at the
chosen steps (the paper branches at 5 evenly spaced steps and saw little difference from branching every step).

Every node keeps a soft value ``v(x) ~ (1/lam) log E[exp(lam r(x0)) | x]`` and a visit count ``N``. One
iteration:

1. **Selection**: from the root, descend while a node is fully widened (``|children| >= C N^alpha``, progressive
   widening, defaults ``alpha = 0.8``, ``C = 2``): DTS picks a child with probability ``softmax(lam v)``, DTS*
   the UCT maximiser ``v + c_uct sqrt(log N(parent) / N(child))``.
2. **Expansion + rollout**: from the first node that may still widen, sample a new child with the model's
   stochastic kernel and denoise it to ``x0``; every branching-level state on the way is added to the tree.
3. **Backup**: ``v(leaf) = r(x0)``; up the path ``v(x) = (1/lam) log mean_children exp(lam v(child))`` (uniform
   weights: the children are draws of ``p_theta``), ``N(x) += 1``.

Iterations run in waves: a wave selects up to ``wave_size`` expansions, and their rollouts advance in lock step
(all particles at step i share the time ``t_i``, so one batched model call per step serves the whole wave).
Progressive widening decides where the budget goes. With the paper's image default (``C = 2, alpha = 0.8``,
meant for 10^3-10^5 NFE) the root may take a new child on each of its first ~35 visits, so below ~35 samples'
worth of NFE every rollout starts from fresh noise and DTS* is best-of-N. A narrower tree (``C = 1,
alpha = 0.5``) branches below the root from the first iterations (``benchmarks/steering_world.py`` compares both).

The tree is anytime: ``grow`` adds budget to the same tree; ``sample`` draws from a built tree without model
calls (DTS: softmax walks, converging to ``p_theta exp(lam r)`` as iterations grow, Prop. 1; DTS*: the greedy
``argmax v`` walk).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.steering.base import SteeringProblem, SteeringResult, aux_generator, log_mean_exp


@dataclass
class Node:
    """One tree node: a state at a branching level (``state`` None for the root)."""

    level: int
    parent: int
    state: Tensor | None = None
    value: float = 0.0
    visits: int = 1
    children: list[int] = field(default_factory=list)
    pending: int = 0


def default_branch_steps(num_steps: int, levels: int = 5) -> list[int]:
    """Branch at ``levels`` evenly spaced step indices, starting with 0 (the initial noise)."""
    every = max(1, num_steps // levels)
    return list(range(0, num_steps, every))[:levels]


class DiffusionTree:
    """DTS / DTS* over one ``SteeringProblem`` (module docstring).

    Args:
        problem: prompt, stochastic sampler, reward and inverse temperature ``lam``.
        search: False = DTS (Boltzmann selection, sampling), True = DTS* (UCT selection, greedy read-out).
        branch_steps: step indices where the tree branches (must start with 0); default 5 evenly spaced.
        alpha, widening: progressive widening ``|children| < widening * N^alpha`` allows a new child.
        c_uct: DTS* exploration constant (in reward units).
        wave_size: expansions rolled out together per batched wave.
        generator: noise for the rollouts; selection draws come from a separate generator derived from it.
    """

    def __init__(
        self,
        problem: SteeringProblem,
        *,
        search: bool = False,
        branch_steps: Sequence[int] | None = None,
        alpha: float = 0.8,
        widening: float = 2.0,
        c_uct: float = 1.0,
        wave_size: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        steps = default_branch_steps(problem.num_steps) if branch_steps is None else sorted(set(branch_steps))
        if not steps or steps[0] != 0 or steps[-1] >= problem.num_steps:
            raise ValueError(f"branch_steps must start at 0 and lie in [0, {problem.num_steps}), got {steps}")
        if not 0 < alpha <= 1 or widening <= 0:
            raise ValueError(f"progressive widening needs 0 < alpha <= 1 and widening > 0, got {alpha}, {widening}")
        if c_uct < 0 or wave_size < 1:
            raise ValueError(f"need c_uct >= 0 and wave_size >= 1, got {c_uct}, {wave_size}")
        self.problem = problem
        self.search = search
        self.lam = problem.inverse_temperature
        self.levels = [*steps, problem.num_steps]  # time index of each level; the last level holds the leaves
        self.alpha, self.widening, self.c_uct, self.wave_size = alpha, widening, c_uct, wave_size
        self.generator = generator
        self.select_gen = aux_generator(generator, 3, device="cpu")  # selection works on CPU tensors
        self.nodes: list[Node] = [Node(level=-1, parent=-1)]
        self.nfe = 0
        self.iterations = 0

    # ------------------------------------------------------------------------------------------------ structure
    @property
    def leaf_level(self) -> int:
        return len(self.levels) - 1

    @property
    def leaves(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.level == self.leaf_level]

    def rollout_cost(self, level: int) -> int:
        """NFE to roll out one new child of a node at ``level`` (-1 = the root) down to ``x0``."""
        start = self.levels[max(level, 0)]
        return (self.problem.num_steps - start) * self.problem.step_cost

    def _may_widen(self, node: Node) -> bool:
        limit = self.widening * node.visits**self.alpha
        return node.level < self.leaf_level and len(node.children) + node.pending < limit

    def _choose(self, node: Node) -> int:
        kids = node.children
        values = torch.tensor([self.nodes[c].value for c in kids], dtype=torch.float64)
        if self.search:
            visits = torch.tensor([self.nodes[c].visits for c in kids], dtype=torch.float64)
            bonus = self.c_uct * torch.sqrt(math.log(max(node.visits, 1)) / visits)
            return kids[int(torch.argmax(values + bonus))]
        probs = torch.softmax(self.lam * values, dim=0)
        return kids[int(torch.multinomial(probs, 1, generator=self.select_gen))]

    def _select(self) -> tuple[list[int], int | None]:
        """Descend from the root; returns the path and the node to expand (None if a leaf was reached)."""
        path, current = [0], self.nodes[0]
        while not self._may_widen(current):
            if current.level == self.leaf_level or not current.children:
                return path, None
            path.append(self._choose(current))
            current = self.nodes[path[-1]]
        return path, path[-1]

    # ------------------------------------------------------------------------------------------------ growth
    def grow(self, budget: int, progress: bool = False) -> int:
        """Run iterations until ``budget`` more NFE are spent (or no expansion fits); returns the NFE spent."""
        spent = 0
        bar = tqdm(total=budget, desc="tree", unit="nfe", disable=not progress, leave=False)
        while spent + self.rollout_cost(self.leaf_level - 1) <= budget:
            wave: list[tuple[list[int], int]] = []
            planned, over_budget = 0, False
            for _ in range(self.wave_size):
                path, expand = self._select()
                if expand is None:
                    # a walk that ends at a leaf only counts the visit; the raised counts widen the path later
                    self._backup(path[:-1], [])
                    self.iterations += 1
                    continue
                cost = self.rollout_cost(self.nodes[expand].level)
                if spent + planned + cost > budget:
                    over_budget = True
                    break
                self.nodes[expand].pending += 1
                wave.append((path, expand))
                planned += cost
            if over_budget and not wave:
                break  # the selected expansion no longer fits (DTS*'s deterministic selection would repeat it)
            if not wave:
                continue
            used = self._rollout_wave(wave)
            spent += used
            bar.update(used)
        bar.close()
        return spent

    @torch.no_grad()
    def _rollout_wave(self, wave: list[tuple[list[int], int]]) -> int:
        problem = self.problem
        nfe_start = problem.flow.nfe
        starts = [self.levels[max(self.nodes[e].level, 0)] for _, e in wave]
        root_kids = [k for k, (_, e) in enumerate(wave) if e == 0]
        x = torch.empty((len(wave), *problem.shape), device=problem.flow.device)
        for k, (_, e) in enumerate(wave):
            if e != 0:
                x[k] = self.nodes[e].state
        if root_kids:
            x[root_kids] = problem.initial_noise(len(root_kids), self.generator)
        # chains[k]: the new nodes of rollout k, created level by level
        chains: list[list[int]] = [[] for _ in wave]
        parents = [e for _, e in wave]

        def record(rows: list[int], level: int) -> None:
            for k in rows:
                node = Node(level=level, parent=parents[k], state=x[k].clone())
                self.nodes.append(node)
                self.nodes[parents[k]].children.append(len(self.nodes) - 1)
                chains[k].append(len(self.nodes) - 1)
                parents[k] = len(self.nodes) - 1

        record(root_kids, 0)
        for level, index in enumerate(self.levels[:-1]):
            # the rollouts that have started by this level advance through its segment [index, next level)
            active = [k for k in range(len(wave)) if starts[k] <= index]
            if not active:
                continue
            for i in range(index, self.levels[level + 1]):
                out, _ = problem.transition(x[active], i, self.generator)
                x[active] = out.x_next
            record(active, level + 1)
        rewards = problem.score(x, "DTS leaf reward")
        for k, (path, expand) in enumerate(wave):
            self.nodes[expand].pending -= 1
            leaf = chains[k][-1]
            self.nodes[leaf].value = float(rewards[k])
            for node_id in chains[k][:-1]:
                self.nodes[node_id].value = float(rewards[k])
            self._backup(path, chains[k])
            self.iterations += 1
        used = problem.flow.nfe - nfe_start
        self.nfe += used
        return used

    def _backup(self, path: list[int], chain: list[int]) -> None:
        """Soft-value backup (log-mean-exp over all children) and visit counts along ``path``."""
        for node_id in reversed(path):
            node = self.nodes[node_id]
            node.visits += 1
            if node.children:
                values = torch.tensor([self.nodes[c].value for c in node.children], dtype=torch.float64)
                node.value = float(log_mean_exp(self.lam * values) / self.lam)

    # ------------------------------------------------------------------------------------------------ read-out
    def sample(self, num_samples: int = 1, *, greedy: bool | None = None) -> tuple[Tensor, Tensor, list[int]]:
        """Draw from the built tree without model calls.

        Args:
            greedy: walk by ``argmax v`` (DTS*'s read-out) or by ``softmax(lam v)`` (DTS); default: DTS* greedy.

        Returns:
            ``(n, C, H, W)`` leaf latents, ``(n,)`` their rewards and the leaf node ids.
        """
        greedy = self.search if greedy is None else greedy
        if not self.nodes[0].children:
            raise ValueError("the tree is empty: grow it with a budget first")
        ids = []
        for _ in range(num_samples):
            node = self.nodes[0]
            while node.level < self.leaf_level:
                kids = node.children
                values = torch.tensor([self.nodes[c].value for c in kids], dtype=torch.float64)
                if greedy:
                    pick = kids[int(torch.argmax(values))]
                else:
                    probs = torch.softmax(self.lam * values, 0)
                    pick = kids[int(torch.multinomial(probs, 1, generator=self.select_gen))]
                node = self.nodes[pick]
            ids.append(pick)
        latents = torch.stack([self.nodes[i].state for i in ids])
        rewards = torch.tensor([self.nodes[i].value for i in ids], dtype=torch.float32)
        return latents, rewards, ids

    def leaf_probabilities(self) -> tuple[list[int], Tensor]:
        """The exact distribution of DTS's softmax read-out: leaf ids and ``(L,)`` probabilities (the product of
        ``softmax(lam v)`` choices along each leaf's path), computed without sampling."""
        ids, probs = [], []
        stack: list[tuple[int, float]] = [(0, 1.0)]
        while stack:
            node_id, mass = stack.pop()
            node = self.nodes[node_id]
            if node.level == self.leaf_level:
                ids.append(node_id)
                probs.append(mass)
                continue
            values = torch.tensor([self.nodes[c].value for c in node.children], dtype=torch.float64)
            for child, p in zip(node.children, torch.softmax(self.lam * values, 0).tolist(), strict=True):
                stack.append((child, mass * p))
        return ids, torch.tensor(probs, dtype=torch.float64)

    def best_leaf(self) -> tuple[Tensor, float]:
        """The highest-reward leaf found so far (latent ``(C, H, W)``, reward)."""
        leaves = self.leaves
        best = max(leaves, key=lambda i: self.nodes[i].value)
        return self.nodes[best].state, self.nodes[best].value


def tree_steering(
    problem: SteeringProblem,
    budget: int,
    *,
    search: bool = False,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **tree_args,
) -> SteeringResult:
    """Build a DTS (``search=False``) or DTS* (``search=True``) tree with ``budget`` NFE and read out samples.

    ``tree_args`` go to ``DiffusionTree`` (branch_steps, alpha, widening, c_uct, wave_size). The tree is returned
    in ``info["tree"]`` so more budget can refine it (``tree.grow``) and more samples be drawn (``tree.sample``).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    problem.check_budget(budget)
    tree = DiffusionTree(problem, search=search, generator=generator, **tree_args)
    tree.grow(budget, progress=progress)
    latents, rewards, _ = tree.sample(num_samples)
    return SteeringResult(
        latents=latents,
        rewards=rewards.to(latents.device),
        nfe=tree.nfe,
        method="dts_star" if search else "dts",
        info={
            "tree": tree,
            "iterations": tree.iterations,
            "leaves": len(tree.leaves),
            "best_reward": tree.best_leaf()[1],
        },
    )
