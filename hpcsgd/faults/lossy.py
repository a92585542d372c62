"""The loss-injection layer: which messages of a block exchange arrive.

Every drop is decided by one counter-based generator, ``U(seed, step, phase, src, dst)``: a
Philox stream keyed by the run's seed whose counter encodes ``(step, phase)``. One draw gives
the whole ``P x P`` matrix of a step's phase, so every rank computes the same mask without
communicating, and a run repeats bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

PHASES = (1, 2)


def uniforms(seed: int, step: int, phase: int, size: int) -> np.ndarray:
    """The matrix ``U[src, dst]`` of uniforms in [0, 1) for one step and phase.

    Pure: depends only on its arguments. The Philox counter's high words hold (phase, step) and
    its low words count the draws, so distinct (step, phase) pairs read disjoint streams.
    """
    if seed < 0 or step < 0 or phase < 0:
        raise ConfigError(f"seed, step and phase must be >= 0, got {seed}, {step}, {phase}")
    bitgen = np.random.Philox(key=seed, counter=[0, 0, phase, step])
    return np.random.Generator(bitgen).random((size, size))


def arrival_mask(seed: int, step: int, phase: int, rates: np.ndarray) -> np.ndarray:
    """Boolean ``arrived[src, dst]`` for one step and phase; the diagonal always arrives.

    Args:
        rates: ``P x P`` drop probabilities per link (src row, dst column).
    """
    size = rates.shape[0]
    arrived = uniforms(seed, step, phase, size) >= rates
    np.fill_diagonal(arrived, True)  # a rank's own block never crosses the network
    return arrived


_RULE = re.compile(
    r"^\s*(?:(?P<kind>to|from):(?P<rank>\d+)|(?P<src>\d+)->(?P<dst>\d+)|(?P<inter>inter-node)"
    r"|node:(?P<nsrc>\d+)\s*->\s*node:(?P<ndst>\d+))\s*=\s*(?P<rate>[0-9.eE+-]+)\s*$"
)
_FORMS = "'to:R=x', 'from:R=x', 'S->D=x', 'inter-node=x' or 'node:A->node:B=x'"


@dataclass(frozen=True)
class LinkRates:
    """Per-phase ``P x P`` drop-rate matrices: a uniform rate, phase overrides, link rules."""

    phase1: np.ndarray
    phase2: np.ndarray

    def for_phase(self, phase: int) -> np.ndarray:
        return self.phase1 if phase == 1 else self.phase2

    @property
    def lossless(self) -> bool:
        """True when no message can ever be dropped (the exchange then skips mask work)."""
        return not (self.phase1.any() or self.phase2.any())

    @classmethod
    def build(
        cls,
        size: int,
        drop_rate: float = 0.0,
        phase1: float | None = None,
        phase2: float | None = None,
        rules: tuple[str, ...] | list[str] = (),
        matrix: np.ndarray | None = None,
        nodes: list[int] | None = None,
    ) -> "LinkRates":
        """Resolve the drop-rate settings of a config into two matrices.

        Precedence, lowest first: ``drop_rate``, then the per-phase rate, then ``matrix`` (a
        ``P x P`` file), then each rule in order: ``"to:R=x"`` (links into rank R),
        ``"from:R=x"`` (links out of R), ``"S->D=x"`` (one link), ``"inter-node=x"`` (every
        link between two nodes), ``"node:A->node:B=x"`` (links from node A's ranks to node
        B's). Rules apply to both phases. ``nodes[r]`` is rank r's node (default: one rank
        per node).
        """
        mats = []
        for name, rate in (("drop_rate_phase1", phase1), ("drop_rate_phase2", phase2)):
            value = drop_rate if rate is None else rate
            _check_rate(name if rate is not None else "drop_rate", value)
            mats.append(np.full((size, size), float(value)))
        if matrix is not None:
            matrix = np.asarray(matrix, dtype=float)
            if matrix.shape != (size, size):
                raise ConfigError(
                    f"link drop matrix must be {size}x{size} (one row and column per rank), "
                    f"got shape {matrix.shape}"
                )
            if not np.all((matrix >= 0) & (matrix < 1)):
                raise ConfigError("link drop matrix entries must be in [0, 1)")
            for m in mats:
                m[:] = matrix
        apply_link_rules(mats, rules, size, "link_drop", _check_rate, nodes)
        for m in mats:
            np.fill_diagonal(m, 0.0)
        return cls(mats[0], mats[1])


def apply_link_rules(mats: list[np.ndarray], rules, size: int, name: str, check, nodes=None) -> None:
    """Apply ``"to:R=x"`` (links into R), ``"from:R=x"`` (out of R), ``"S->D=x"`` rules in order,
    and the node rules ``"inter-node=x"`` and ``"node:A->node:B=x"``.

    Shared by the drop rates and the emulated network's latency and bandwidth; ``check(what,
    value)`` raises a ConfigError for a value out of range. ``nodes[r]`` is rank r's node
    (None: every rank its own node); a node rule sets only links between different nodes.
    """
    for rule in rules:
        match = _RULE.match(rule)
        if not match:
            raise ConfigError(f"{name} rule {rule!r} is not of the form {_FORMS}")
        value = float(match["rate"])
        check(f"{name} rule {rule!r}", value)
        if match["inter"] or match["nsrc"] is not None:
            if mats:  # no matrices: a check of form and value only (the config's, before P is known)
                node = np.arange(size) if nodes is None else np.asarray(nodes)
                _apply_node_rule(mats, match, node, value, f"{name} rule {rule!r}")
            continue
        ranks = [int(r) for r in (match["rank"], match["src"], match["dst"]) if r is not None]
        if any(r >= size for r in ranks):
            raise ConfigError(f"{name} rule {rule!r} names a rank outside 0..{size - 1}")
        for m in mats:
            if match["kind"] == "to":
                m[:, ranks[0]] = value
            elif match["kind"] == "from":
                m[ranks[0], :] = value
            else:
                m[ranks[0], ranks[1]] = value


def _apply_node_rule(mats: list[np.ndarray], match, node: np.ndarray, value: float, what: str) -> None:
    """Set the links a node rule names: between any two nodes, or from node A's ranks to node B's."""
    if match["inter"]:
        cross = node[:, None] != node[None, :]
    else:
        a, b = int(match["nsrc"]), int(match["ndst"])
        count = int(node.max()) + 1
        if a >= count or b >= count:
            raise ConfigError(f"{what} names a node outside 0..{count - 1} (the run's {len(node)} ranks fill "
                              f"{count} node(s); see ranks_per_node)")
        if a == b:
            raise ConfigError(f"{what} names node {a} twice: node rules set links between two nodes "
                              f"(links inside a node cross no network)")
        cross = (node[:, None] == a) & (node[None, :] == b)
    for m in mats:
        m[cross] = value


def _check_rate(name: str, value: float) -> None:
    if not (0.0 <= value < 1.0):
        raise ConfigError(f"{name} must be in [0, 1) (arrival rate above 0), got {value}")
