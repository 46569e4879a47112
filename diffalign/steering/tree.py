"""Diffusion Tree Sampling (DTS) and Diffusion Tree Search (DTS*) (Jain et al., arXiv 2506.20701, Alg. 1-2).

A tree over partial denoising trajectories. The root is a dummy parent of the initial noise draws; a node at
level ``l`` holds a state at time index ``branch_steps[l]`` and the leaves, one level further, hold clean samples
``x0`` with their reward. Edges are multi-step denoising segments of the problem's sampler (stochastic where
``sde.steps`` says so), so the tree branches only at the chosen steps (the paper branches at 5 evenly spaced steps
and saw little difference from branching every step). Each iteration picks a node, samples a new child of it with
the model's kernel and rolls it out to ``x0``, adding one node per level on the way; iterations run in waves whose
rollouts advance in lock step (one batched model call per step serves the whole wave). The tree is anytime:
``grow`` adds budget to the same tree and ``sample`` draws from it without model calls.

**The published DTS (``readout="paper"``) and why it is biased.** Every node keeps a soft value
``v(n) = (1/lam) log mean_{children c} exp(lam v(c))`` (``v = r`` at a leaf). Selection descends from the root
by ``softmax(lam v)`` over the children until a node may still widen (``|children| < C N^alpha``, progressive
widening, ``C = 2, alpha = 0.8``), which then gets the new child. The read-out walks the same softmax, so leaf
``l`` is returned with probability ``exp(lam r(l)) / (exp(lam v(root)) prod_{ancestors a} |C(a)|)``: each child
gets an equal share ``1 / |C(a)|`` of its parent's base mass. Those shares are right only when the number of
children does not depend on their values. Here it does: a node whose first rollout scored high is selected
again and widened, its later children regress to its true value and dilute the lucky one, while a node that
scored low keeps its single low leaf. The read-out is under-tilted, and the bias does not vanish with the
budget, because most nodes keep few children however large the tree grows.

**The consistent DTS (``readout="weighted"``, the default).** Each node carries an importance weight ``w`` fixed
when it is created, and the read-out returns leaf ``l`` with probability ``w(l) exp(lam r(l)) / sum_leaves w
exp(lam r)``: self-normalised importance sampling of ``p_theta exp(lam r)`` over the leaves. An iteration:

1. **Level**: choose the level ``m`` to widen (the root, or a branching level), by progressive widening counted
   per level: the root widens while its children number fewer than ``C N^alpha`` after ``N`` iterations, then
   level ``m`` while its expansions number fewer than ``C V_m^alpha`` after ``V_m`` walks reached it, and the
   deepest branching level takes the rest. The counts never depend on the values. The default ``C = 2,
   alpha = 0.9`` keeps the tree root-heavy: every rollout starts from fresh noise for the first ~1000
   iterations, then a growing share branches below the root, at the first branching level first (a tenth of
   3200 iterations). On the analytic mixtures (``docs/steering_analytic.md``) a branch trades an independent
   sample for one correlated with its sibling, which pays only at large budgets; a narrower setting
   (``C = 1, alpha = 0.5``) branches from the first iterations, for sharp rewards at small budgets.
2. **Node**: among all level-``m`` nodes draw ``s`` from ``q(s) = (1 - eps) pi(s) exp(lam v(s)) / Z + eps pi(s)``,
   where ``pi(s) = w(s) / sum_{level m} w`` is the tree's estimate of the base distribution at that level,
   ``v(s) = (1/lam) log(sum_{leaves below s} w exp(lam r) / sum_{leaves below s} w)`` is the weighted soft value
   and ``eps = defensive`` mixes in the base proportions (defensive importance sampling, so ``pi / q <= 1/eps``).
3. **Rollout**: sample the new child of ``s`` with the model's kernel and denoise it to ``x0``; every new node on
   the way gets ``w = pi(s) / q(s)`` (``w = 1`` for a rollout from the root: fresh noise is an exact base draw).
4. **Backup**: add ``w`` and ``w exp(lam r)`` to the sums of every node on the path.

*Why it converges to the target, whatever the tree's shape.* Let ``mu_m`` be the weighted empirical measure of the
level-``m`` nodes (``sum w delta_x / sum w``) and ``p_m`` the base marginal at that level. A node created at level
``m + 1`` by a rollout from a level-``j`` start node ``s`` (``j <= m``; ``j = -1``: the root, ``mu_{-1}`` exact)
has, given the tree before the iteration, ``E[w f(x)] = sum_s q(s) (pi(s) / q(s)) (P f)(s) = mu_j(P f)``, where
``P`` is the base kernel from level ``j`` to ``m + 1``, and ``E[w] = 1``. So ``sum (w f(x) - mu_j(P f))`` over the
level-``m + 1`` nodes is a martingale with bounded increments (``w <= 1/eps``; for ``eps = 0`` a bounded reward
bounds ``w`` by ``exp(lam (r_max - r_min))``), and ``mu_{m+1}(f)`` is, up to that martingale divided by the number
of nodes, an average of ``mu_j(P f)`` over past iterations. If every ``mu_j`` with ``j <= m`` converges to ``p_j``
(induction; the root widens forever, so every level receives infinitely many nodes), that average converges to
``p_j(P f) = p_{m+1}(f)``. Hence ``mu_m -> p_m`` at every level, and the read-out, the leaf measure tilted by
``exp(lam r)`` with ``r`` bounded, converges to ``p_theta exp(lam r)``. Nothing in the argument depends on which
level or which node is widened, as long as the root keeps widening: the level rule, the within-level proposal (any
``q`` with bounded ``pi / q``), the branching steps and the wave size change the variance, never the limit. At a
finite budget the read-out is a ratio estimate (bias ``O(1 / leaves)``); ``readout_ess`` in the result reports its
effective sample size. The weight ``w = pi(s) / q(s) = exp(lam (v_bar - v(s)))`` (for ``eps = 0``; ``exp(lam v_bar)
= sum_s pi(s) exp(lam v(s))``) is the tree's version of SMC's ``diff`` potential: a rollout from a node that looked
good must prove it.

**DTS\\* (``search=True``)**: the paper's tree search, with UCT selection ``v + c_uct sqrt(log N(parent) /
N(child))`` and the same progressive widening per node. It is a search, so its read-out is the best leaf found
(``readout="best"``; the ``n`` highest-reward distinct leaves for ``num_samples = n``); the paper's greedy walk by
``argmax v`` (``readout="greedy"``; for ``n > 1`` the first ``n`` leaves of the depth-first walk that visits
children in decreasing ``v``) stays available and returns a leaf of the highest-value subtree, often not the best
leaf found.

With the paper's widening ``C = 2, alpha = 0.8`` (meant for 10^3-10^5 NFE) the root may take a new child on each
of its first ~35 visits, so below ~35 samples' worth of NFE every rollout starts from fresh noise and DTS* is
best-of-N. A narrower tree (``C = 1, alpha = 0.5``) branches below the root from the first iterations
(``benchmarks/steering_world.py`` compares both).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffalign.steering.base import (
    BudgetError,
    SteeringProblem,
    SteeringResult,
    aux_generator,
    log_mean_exp,
    nfe_budget,
)

READOUTS = {"dts": ("weighted", "paper"), "dts_star": ("best", "greedy")}
"""The read-outs of each tree method; the first is its default."""


@dataclass
class Node:
    """One tree node: a state at a branching level (``state`` None for the root; ``reward`` set on leaves).

    ``value`` is the paper's uniform soft value; ``log_weight`` the weighted DTS importance weight fixed at
    creation; ``log_mass`` / ``log_tilt`` the logs of ``sum w`` / ``sum w exp(lam r)`` over the leaves below.
    """

    level: int
    parent: int
    state: Tensor | None = None
    reward: float = math.nan
    value: float = 0.0
    visits: int = 1
    children: list[int] = field(default_factory=list)
    pending: int = 0
    log_weight: float = 0.0
    log_mass: float = -math.inf
    log_tilt: float = -math.inf


@dataclass
class Expansion:
    """A planned iteration: the path from the root to the node that gets a new child, and the log-weight of the
    nodes its rollout creates."""

    path: list[int]
    log_weight: float = 0.0

    @property
    def start(self) -> int:
        return self.path[-1]


def default_branch_steps(num_steps: int, levels: int = 5) -> list[int]:
    """Branch at ``levels`` evenly spaced step indices of ``[0, num_steps)``, starting with 0 (the initial noise)."""
    every = max(1, num_steps // levels)
    return list(range(0, num_steps, every))[:levels]


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


class DiffusionTree:
    """DTS / DTS* over one ``SteeringProblem`` (module docstring).

    Args:
        problem: prompt, sampler, reward and inverse temperature ``lam``.
        search: False = DTS (sampling), True = DTS* (search: UCT selection).
        readout: DTS: ``"weighted"`` (default; consistent) or ``"paper"`` (the published Alg. 1-2, biased);
            DTS*: ``"best"`` (default; the best leaves found) or ``"greedy"`` (the paper's ``argmax v`` walk).
        branch_steps: step indices where the tree branches (must start with 0, each followed by a stochastic
            step); default 5 evenly spaced up to the last stochastic step.
        alpha, widening: progressive widening ``|children| < widening * N^alpha``: per node for the paper's DTS
            and DTS* (default the paper's 0.8, 2), per level for the weighted DTS (default 0.9, 2).
        defensive: weighted DTS: share ``eps`` of the within-level proposal drawn by base mass alone (bounds the
            importance weights by ``1 / eps``; 1 = no value guidance, 0 = pure Boltzmann).
        c_uct: DTS* exploration constant (in reward units).
        wave_size: expansions rolled out together per batched wave.
        generator: noise for the rollouts; selection draws come from a separate generator derived from it.
    """

    def __init__(
        self,
        problem: SteeringProblem,
        *,
        search: bool = False,
        readout: str | None = None,
        branch_steps: Sequence[int] | None = None,
        alpha: float | None = None,
        widening: float | None = None,
        defensive: float = 0.5,
        c_uct: float = 1.0,
        wave_size: int = 16,
        generator: torch.Generator | None = None,
    ) -> None:
        method = "dts_star" if search else "dts"
        readout = READOUTS[method][0] if readout is None else readout
        if readout not in READOUTS[method]:
            raise ValueError(f"readout {readout!r} is not one of {method}'s read-outs {list(READOUTS[method])}")
        if alpha is None:
            alpha = 0.9 if readout == "weighted" else 0.8
        if widening is None:
            widening = 2.0
        stochastic = problem.stochastic.nonzero().view(-1).tolist()
        if branch_steps is None:
            steps = default_branch_steps(stochastic[-1] + 1)
        else:
            steps = sorted(set(branch_steps))
        if not steps or steps[0] != 0 or steps[-1] >= problem.num_steps:
            raise ValueError(f"branch_steps must start at 0 and lie in [0, {problem.num_steps}), got {steps}")
        if steps[-1] > stochastic[-1]:
            raise ValueError(f"branch_steps {steps} branch after the last stochastic step {stochastic[-1]} "
                             f"(sde.steps): the children of such a node would all be identical")  # fmt: skip
        if not 0 < alpha <= 1 or widening <= 0:
            raise ValueError(f"progressive widening needs 0 < alpha <= 1 and widening > 0, got {alpha}, {widening}")
        if not 0 <= defensive <= 1:
            raise ValueError(f"defensive must lie in [0, 1], got {defensive}")
        if c_uct < 0 or wave_size < 1:
            raise ValueError(f"need c_uct >= 0 and wave_size >= 1, got {c_uct}, {wave_size}")
        self.problem = problem
        self.search = search
        self.readout = readout
        self.weighted = readout == "weighted"
        self.lam = problem.inverse_temperature
        self.levels = [*steps, problem.num_steps]  # time index of each level; the last level holds the leaves
        self.alpha, self.widening, self.defensive = alpha, widening, defensive
        self.c_uct, self.wave_size = c_uct, wave_size
        self.generator = generator
        self.select_gen = aux_generator(generator, 3, device="cpu")  # selection works on CPU tensors
        self.nodes: list[Node] = [Node(level=-1, parent=-1)]
        self.by_level: list[list[int]] = [[] for _ in self.levels]
        # weighted DTS: per-level progressive widening counts, index 0 = the root, m + 1 = level m
        self.level_visits = [0] * len(self.levels)
        self.level_expansions = [0] * len(self.levels)
        self.values_current = True  # the uniform soft values (weighted DTS updates them only for read-outs)
        self.nfe = 0
        self.iterations = 0

    # ------------------------------------------------------------------------------------------------ structure
    @property
    def leaf_level(self) -> int:
        return len(self.levels) - 1

    @property
    def leaves(self) -> list[int]:
        return list(self.by_level[self.leaf_level])

    def rollout_cost(self, level: int) -> int:
        """NFE to roll out one new child of a node at ``level`` (-1 = the root) down to ``x0``."""
        start = self.levels[max(level, 0)]
        return (self.problem.num_steps - start) * self.problem.step_cost

    def _path_to(self, node_id: int) -> list[int]:
        path = [node_id]
        while self.nodes[path[-1]].parent >= 0:
            path.append(self.nodes[path[-1]].parent)
        return path[::-1]

    def soft_value(self, node_id: int) -> float:
        """Weighted DTS's soft value of a node: ``(1/lam) log(sum w exp(lam r) / sum w)`` over the leaves below."""
        node = self.nodes[node_id]
        return (node.log_tilt - node.log_mass) / self.lam

    # ------------------------------------------------------------------------------------------------ growth
    def grow(self, budget: int | float, progress: bool = False) -> int:
        """Run iterations until ``budget`` more NFE are spent (or the next expansion does not fit); returns the
        NFE spent."""
        budget = nfe_budget(budget)
        spent = 0
        bar = tqdm(total=budget, desc="tree", unit="nfe", disable=not progress, leave=False)
        while True:
            wave = self._plan_levels(budget - spent) if self.weighted else self._plan_widening(budget - spent)
            if wave is None:
                break
            if not wave:
                continue
            used = self._rollout_wave(wave)
            spent += used
            bar.update(used)
        bar.close()
        return spent

    # weighted DTS: level by per-level widening, node by the within-level proposal ----------------------------
    def _next_level(self) -> int:
        """The level the next expansion widens (-1 = the root); a function of the iteration counts only."""
        if not self.by_level[0]:
            return -1
        if self.level_expansions[0] < self.widening * (self.level_visits[0] + 1) ** self.alpha:
            return -1
        for m in range(self.leaf_level):
            visits = self.level_visits[m + 1] + 1
            if m == self.leaf_level - 1 or self.level_expansions[m + 1] < self.widening * visits**self.alpha:
                return m
        raise AssertionError("unreachable: the deepest branching level always widens")

    def _commit_level(self, level: int) -> None:
        for m in range(-1, level + 1):
            self.level_visits[m + 1] += 1
        self.level_expansions[level + 1] += 1

    def level_proposal(self, level: int) -> tuple[list[int], Tensor, Tensor]:
        """The within-level proposal of the weighted DTS: the level's node ids, their ``(n,)`` proposal
        probabilities ``q`` and the ``(n,)`` log-weights ``log(pi / q)`` their rollouts' nodes get."""
        ids = self.by_level[level]
        log_w = torch.tensor([self.nodes[i].log_weight for i in ids], dtype=torch.float64)
        log_pi = log_w - torch.logsumexp(log_w, 0)
        tilt = torch.tensor([self.nodes[i].log_tilt - self.nodes[i].log_mass for i in ids], dtype=torch.float64)
        log_q = torch.log_softmax(log_pi + tilt, 0)
        if self.defensive == 1:
            log_q = log_pi
        elif self.defensive > 0:
            log_q = torch.logaddexp(log_q + math.log(1 - self.defensive), log_pi + math.log(self.defensive))
        return ids, log_q.exp(), log_pi - log_q

    def _plan_levels(self, remaining: int) -> list[Expansion] | None:
        starts: list[int] = []
        planned = 0
        while len(starts) < self.wave_size:
            level = self._next_level()
            cost = self.rollout_cost(level)
            if planned + cost > remaining:
                break
            self._commit_level(level)
            starts.append(level)
            planned += cost
        if not starts:
            return None
        wave = [Expansion([0]) for level in starts if level == -1]
        for level in sorted(set(starts) - {-1}):
            ids, q, log_ratio = self.level_proposal(level)
            picks = torch.multinomial(q, starts.count(level), replacement=True, generator=self.select_gen)
            wave.extend(Expansion(self._path_to(ids[p]), float(log_ratio[p])) for p in picks.tolist())
        return wave

    # the paper's DTS and DTS*: descend until a node may widen ------------------------------------------------
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

    def _plan_widening(self, remaining: int) -> list[Expansion] | None:
        wave: list[Expansion] = []
        planned = 0
        for _ in range(self.wave_size):
            path, expand = self._select()
            if expand is None:
                # a walk that ends at a leaf only counts the visit; the raised counts widen the path later
                self._backup_values(path[:-1])
                self.iterations += 1
                continue
            cost = self.rollout_cost(self.nodes[expand].level)
            if planned + cost > remaining:
                # the selected expansion no longer fits (DTS*'s deterministic selection would repeat it)
                return wave or None
            self.nodes[expand].pending += 1
            wave.append(Expansion(path))
            planned += cost
        return wave

    # rollouts and backup --------------------------------------------------------------------------------------
    @torch.no_grad()
    def _rollout_wave(self, wave: list[Expansion]) -> int:
        problem = self.problem
        nfe_start = problem.flow.nfe
        starts = [self.levels[max(self.nodes[e.start].level, 0)] for e in wave]
        root_kids = [k for k, e in enumerate(wave) if e.start == 0]
        x = torch.empty((len(wave), *problem.shape), device=problem.flow.device)
        for k, e in enumerate(wave):
            if e.start != 0:
                x[k] = self.nodes[e.start].state
        if root_kids:
            x[root_kids] = problem.initial_noise(len(root_kids), self.generator)
        # chains[k]: the new nodes of rollout k, created level by level
        chains: list[list[int]] = [[] for _ in wave]
        parents = [e.start for e in wave]

        def record(rows: list[int], level: int) -> None:
            for k in rows:
                node = Node(level=level, parent=parents[k], state=x[k].clone(), log_weight=wave[k].log_weight)
                self.nodes.append(node)
                node_id = len(self.nodes) - 1
                self.nodes[parents[k]].children.append(node_id)
                self.by_level[level].append(node_id)
                chains[k].append(node_id)
                parents[k] = node_id

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
        rewards = problem.score(x, "DTS leaf reward").tolist()
        for k, e in enumerate(wave):
            self.nodes[e.start].pending = max(self.nodes[e.start].pending - 1, 0)
            self.nodes[chains[k][-1]].reward = rewards[k]
            for node_id in chains[k]:
                self.nodes[node_id].value = rewards[k]
            for node_id in e.path + chains[k]:
                node = self.nodes[node_id]
                node.log_mass = _logaddexp(node.log_mass, e.log_weight)
                node.log_tilt = _logaddexp(node.log_tilt, e.log_weight + self.lam * rewards[k])
            if self.weighted:
                for node_id in e.path:
                    self.nodes[node_id].visits += 1
                self.values_current = False
            else:
                self._backup_values(e.path)
            self.iterations += 1
        used = problem.flow.nfe - nfe_start
        self.nfe += used
        return used

    def _backup_values(self, path: list[int]) -> None:
        """The paper's soft-value backup (log-mean-exp over all children) and visit counts along ``path``."""
        for node_id in reversed(path):
            node = self.nodes[node_id]
            node.visits += 1
            if node.children:
                values = torch.tensor([self.nodes[c].value for c in node.children], dtype=torch.float64)
                node.value = float(log_mean_exp(self.lam * values) / self.lam)

    def _update_values(self) -> None:
        """Recompute every node's uniform soft value bottom-up (the weighted DTS keeps them only on demand)."""
        if self.values_current:
            return
        for level in range(self.leaf_level - 1, -2, -1):
            ids = self.by_level[level] if level >= 0 else [0]
            for node_id in ids:
                node = self.nodes[node_id]
                values = torch.tensor([self.nodes[c].value for c in node.children], dtype=torch.float64)
                node.value = float(log_mean_exp(self.lam * values) / self.lam)
        self.values_current = True

    # ------------------------------------------------------------------------------------------------ read-out
    def leaf_probabilities(self, readout: str | None = None) -> tuple[list[int], Tensor]:
        """The exact distribution of a sampling read-out (``"weighted"`` or ``"paper"``; default the tree's own):
        leaf ids and ``(L,)`` float64 probabilities, computed without sampling."""
        readout = self.readout if readout is None else readout
        self._check_readout(readout)
        if readout == "weighted":
            ids = self.leaves
            log_tilt = torch.tensor([self.nodes[i].log_tilt for i in ids], dtype=torch.float64)
            return ids, torch.softmax(log_tilt, 0)
        if readout != "paper":
            raise ValueError(f"readout {readout!r} is a search read-out, not a distribution: use 'weighted' or "
                             "'paper'")  # fmt: skip
        self._update_values()
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

    def _check_readout(self, readout: str) -> None:
        if readout not in READOUTS["dts"] + READOUTS["dts_star"]:
            known = [*READOUTS["dts"], *READOUTS["dts_star"]]
            raise ValueError(f"unknown readout {readout!r}; expected one of {known}")
        if not self.nodes[0].children:
            raise ValueError("the tree is empty: grow it with a budget first")
        if readout == "weighted" and not self.weighted:
            raise ValueError("the weighted read-out needs the importance weights of a tree grown with "
                             "readout='weighted'")  # fmt: skip

    def sample(self, num_samples: int = 1, readout: str | None = None) -> tuple[Tensor, Tensor, list[int]]:
        """Read samples out of the built tree without model calls.

        Args:
            num_samples: how many leaves to return.
            readout: default the tree's own. ``"weighted"`` / ``"paper"``: independent draws from that read-out
                distribution (repeats possible); ``"best"``: the ``num_samples`` highest-reward distinct leaves;
                ``"greedy"``: the first ``num_samples`` leaves of the walk by decreasing soft value.

        Returns:
            ``(n, C, H, W)`` leaf latents, ``(n,)`` their rewards and the leaf node ids.
        """
        readout = self.readout if readout is None else readout
        self._check_readout(readout)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        leaves = self.leaves
        if readout in READOUTS["dts_star"] and len(leaves) < num_samples:
            raise BudgetError(f"the tree has {len(leaves)} leaves: too few for {num_samples} distinct samples")
        if readout == "best":
            ids = sorted(leaves, key=lambda i: -self.nodes[i].reward)[:num_samples]
        elif readout == "greedy":
            self._update_values()
            ids, stack = [], [0]
            while len(ids) < num_samples:
                node_id = stack.pop()
                if self.nodes[node_id].level == self.leaf_level:
                    ids.append(node_id)
                else:  # the highest-value child is visited first
                    stack.extend(sorted(self.nodes[node_id].children, key=lambda c: self.nodes[c].value))
        else:
            leaf_ids, probs = self.leaf_probabilities(readout)
            picks = torch.multinomial(probs, num_samples, replacement=True, generator=self.select_gen)
            ids = [leaf_ids[p] for p in picks.tolist()]
        latents = torch.stack([self.nodes[i].state for i in ids])
        rewards = torch.tensor([self.nodes[i].reward for i in ids], dtype=torch.float32)
        return latents, rewards, ids

    def best_leaf(self) -> tuple[Tensor, float]:
        """The highest-reward leaf found so far (latent ``(C, H, W)``, reward)."""
        best = max(self.leaves, key=lambda i: self.nodes[i].reward)
        return self.nodes[best].state, self.nodes[best].reward


def tree_steering(
    problem: SteeringProblem,
    budget: int | float,
    *,
    search: bool = False,
    num_samples: int = 1,
    generator: torch.Generator | None = None,
    progress: bool = False,
    **tree_args,
) -> SteeringResult:
    """Build a DTS (``search=False``) or DTS* (``search=True``) tree with ``budget`` NFE and read out samples.

    ``tree_args`` go to ``DiffusionTree`` (readout, branch_steps, alpha, widening, defensive, c_uct, wave_size).
    DTS returns ``num_samples`` draws of its read-out distribution, DTS* its ``num_samples`` best distinct leaves
    (``readout="greedy"``: the paper's walk). The tree is returned in ``info["tree"]`` so more budget can refine it
    (``tree.grow``) and more samples be drawn (``tree.sample``); ``info["readout_ess"]`` is the effective sample
    size ``1 / sum p^2`` of a sampling read-out.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    budget = problem.check_budget(budget)
    tree = DiffusionTree(problem, search=search, generator=generator, **tree_args)
    tree.grow(budget, progress=progress)
    latents, rewards, _ = tree.sample(num_samples)
    info = {"tree": tree, "iterations": tree.iterations, "leaves": len(tree.leaves),
            "best_reward": tree.best_leaf()[1]}  # fmt: skip
    if tree.readout in READOUTS["dts"]:
        info["readout_ess"] = float(1 / (tree.leaf_probabilities()[1] ** 2).sum())
    return SteeringResult(
        latents=latents,
        rewards=rewards.to(latents.device),
        nfe=tree.nfe,
        method="dts_star" if search else "dts",
        info=info,
    )
