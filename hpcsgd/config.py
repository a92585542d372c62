"""Training configuration: a frozen dataclass read from TOML, overridden by flags.

Every command-line flag of ``hpcsgd train`` is also a TOML key (dashes become underscores);
a flag given on the command line wins over the file. Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the key and the allowed range. Checks
that need the world size (``q <= P``) run in :func:`validate_for_world`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


from .errors import ConfigError
from .faults.schedule import FAIL_RULE, STRAGGLE_RULE, rank_faults, stragglers
from .limits import FLOAT32_MAX, check_bytes, check_float32, check_seconds, node_cpus
from .metrics import toml_text
from .algorithms.registry import ALGORITHMS, REGISTRY

MODELS = ("mlp", "lenet", "resnet20", "resnet56", "resnet110")
LR_SCHEDULES = ("constant", "step", "cosine")
NAN_POLICIES = ("stop", "skip")
CHUNK_WEIGHTINGS = ("size", "uniform")
PLACEMENTS = ("cyclic", "spread")  # hpcsgd/data/placement.py
FAIL_MODES = ("leave", "kill")
AVERAGE_WEIGHTS = ("equal", "samples")  # hpcsgd/algorithms/base.py
BALANCE = ("none", "speed")  # hpcsgd/data/balance.py
EXCHANGES = ("auto", "alltoallv", "shared-memory", "node-aware")  # hpcsgd/comm/exchange.py
ALLREDUCES = ("library", "node-aware", "nonblocking")  # hpcsgd/comm/nodes.py
PROGRESS = ("auto", "bar", "lines", "none")
DEVICES = ("auto", "cpu", "cuda")
# A user's model: factory(input_shape, num_classes) -> nn.Module, imported from pkg.module.
_MODEL_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
SEED_MAX = 2**64 - 1  # torch.manual_seed takes at most 64 bits
INT_MAX = 2**63 - 1  # every other integer key must fit a signed 64-bit integer (TOML's, torch's)
MIN_GBPS = 1e-6  # 1 kb/s: a slower emulated link would make a model's message a duration no clock takes
_SLOWDOWN = re.compile(r"^(\d+):([0-9.]+)$")  # RANK:FACTOR
MAX_SLOWDOWN = 1000.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Field comments are the `--help` texts."""

    data: str = ""  # shard directory written by `hpcsgd shard`
    run_dir: str = ""  # where config, metrics, summary and checkpoints go
    algorithm: str = "local"  # sync | local | rps | lossy-allreduce
    q: int = 1  # redundancy: chunks each rank holds (1..P)
    redundancy: float | None = None  # mu >= 0, RI-SGD's redundancy (q = 1 + mu): a fractional mu holds a fixed part of the next chunk
    redundancy_spread: float = 0.0  # sigma: per-rank redundancies drawn N(mu, sigma) (seeded), shifted to mean mu, clipped to [0, P-1]
    redundancy_per_rank: list[float] = field(default_factory=list)  # one mu_i per rank, each in [0, P-1] (instead of redundancy)
    placement: str = "cyclic"  # cyclic | spread: a rank's extra chunks are its neighbours' (cyclic) or on other nodes (spread, needs q <= P/R)
    ranks_per_node: int = 0  # R, ranks per node for spread placement, node link rules and node failures (0: from Split_type(SHARED) at the start)
    tau: int = 1  # averaging period in steps (local, rps)
    drop_rate: float = 0.0  # probability a block message is dropped, [0, 1)
    drop_rate_phase1: float | None = None  # override of drop_rate for RPS phase 1 (scatter)
    drop_rate_phase2: float | None = None  # override of drop_rate for RPS phase 2 (gather)
    link_drop: list[str] = field(default_factory=list)  # rules 'to:R=x', 'from:R=x', 'S->D=x', 'inter-node=x', 'node:A->node:B=x'
    link_drop_file: str = ""  # P x P drop-rate matrix (.npy or .csv), rows = sender
    link_latency_ms: float = 0.0  # emulated network: latency per message in ms (0: off)
    link_gbps: float = 0.0  # emulated network: bandwidth of every link in Gb/s (0: unlimited)
    link_latency: list[str] = field(default_factory=list)  # per-link latency rules 'to:R=ms', 'from:R=ms', 'S->D=ms', 'inter-node=ms', 'node:A->node:B=ms'
    link_bandwidth: list[str] = field(default_factory=list)  # per-link bandwidth rules 'to:R=gbps', 'from:R=gbps', 'S->D=gbps', 'inter-node=gbps', 'node:A->node:B=gbps'
    model: str = "mlp"  # mlp | lenet | resnet20 | resnet56 | resnet110 | pkg.module:factory (your own)
    mlp_hidden: list[int] = field(default_factory=lambda: [256, 128])  # MLP hidden widths
    epochs: float = 10.0  # epochs of training (one epoch = one pass over a chunk)
    steps: int = 0  # total steps; overrides epochs when > 0
    batch_size: int | list[int] = 32  # samples drawn per held chunk per step (local batch = q * b); or one per rank
    chunk_weighting: str = "size"  # size | uniform: unequal chunks weigh by size (empirical risk) or 1/P each
    lr: float = 0.1  # base learning rate
    momentum: float = 0.0  # SGD momentum
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float = 0.0  # L2 penalty
    lr_schedule: str = "constant"  # constant | step | cosine
    lr_milestones: list[float] = field(default_factory=list)  # epochs where step decays
    lr_gamma: float = 0.1  # step decay factor
    warmup_epochs: float = 0.0  # linear warm-up from lr/10
    average_optimizer_state: bool = False  # local/rps: also average momentum buffers
    overlap: bool = True  # sync: bucketed Iallreduce started from gradient hooks during backward
    bucket_mb: float = 25.0  # sync: gradient bucket size in MB when overlapping
    overlap_rounds: bool = False  # local/rps: run each round behind the next step, applied one step late
    average_weights: str = "equal"  # equal | samples: local/rps rounds weigh each rank by the samples it drew since the last round (unequal batches)
    exchange: str = "auto"  # auto | alltoallv | shared-memory | node-aware: how rps's block exchange travels (auto: shared-memory on one node, node-aware across nodes; all give the same bits)
    allreduce: str = "library"  # library | node-aware | nonblocking: the Allreduce of local's rounds and sync's steps (node-aware: reduce in node, across nodes, bcast in node; rounds differently from the library's; sync needs --no-overlap; nonblocking: the library's Iallreduce, waited for: may round differently from the blocking call)
    balance: str = "none"  # none | speed: per-rank batch sizes follow measured compute speed, total fixed, decided by all ranks after a warm-up window in the first epoch, then at epoch ends (local/rps; implies average_weights samples)
    balance_warmup: int = 0  # balance speed: timed steps (after the first) before the first decision (0: a quarter of an epoch, at least 3; capped at the first epoch's end)
    seed: int = 0  # seed of init, data order and drop masks
    fail: list[str] = field(default_factory=list)  # crash-stop faults 'RANK@STEP', or 'node:N@STEP' (every rank of node N)
    fail_rate: float = 0.0  # random crash-stop: per-rank failure probability per epoch (seeded)
    fail_mode: str = "leave"  # leave | kill: a failing rank leaves politely, or SIGKILLs itself (needs mpirun --with-ft ulfm)
    reweight: bool = False  # after failures, sample and scale losses so every covered chunk keeps its weight
    straggle: list[str] = field(default_factory=list)  # 'RANK@STEP[-END]:SECONDS' sleeps
    slowdown: list[str] = field(default_factory=list)  # 'RANK:FACTOR': that rank's compute takes FACTOR (>= 1) times as long (an emulated slower device)
    log_every: int = 0  # steps between metric lines (0: about 10 per epoch)
    eval_every: float = 1.0  # epochs between test evaluations (0: only at the end)
    grad_diversity: bool = False  # log inter-worker and intra-worker (per-sample) gradient diversity at log steps
    eval_train_samples: int = 2048  # training-set sample for eval-time train loss (0: all)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    resume: bool = False  # continue from the newest good checkpoint in run_dir
    overwrite: bool = False  # move a run already in run_dir aside (to run_dir/replaced/) and start afresh
    nan_policy: str = "stop"  # stop | skip: what a non-finite loss does
    collective_timeout: float = 600.0  # seconds any collective may take before the job aborts with exit 4 (0: off)
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch intra-op threads per rank (0: OMP_NUM_THREADS, SLURM_CPUS_PER_TASK, or cores / ranks per node)
    progress: str = "auto"  # auto | bar | lines | none (auto: bar on a terminal)

    def to_toml(self) -> str:
        """The resolved config as TOML (read back by :func:`load_toml`)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return toml_text(values, "resolved hpcsgd train config")

    @property
    def faults(self) -> dict[int, int]:
        """world rank -> step at which it fails (the explicit ``RANK@STEP`` entries)."""
        return {int(m[2]): int(m[3]) for m in map(FAIL_RULE.match, self.fail) if not m[1]}

    @property
    def node_faults(self) -> dict[int, int]:
        """node -> step at which all its ranks fail (the ``node:N@STEP`` entries)."""
        return {int(m[2]): int(m[3]) for m in map(FAIL_RULE.match, self.fail) if m[1]}

    def batch_sizes(self, ranks: int) -> list[int]:
        """``b_i`` of every rank: ``batch_size`` repeated, or its per-rank list."""
        return list(self.batch_size) if isinstance(self.batch_size, list) else [self.batch_size] * ranks

    @property
    def fractional(self) -> bool:
        """Fractional or per-rank redundancy, or per-rank batches: partial chunks and the batch-mean loss."""
        mu = self.redundancy
        return ((mu is not None and not float(mu).is_integer()) or self.redundancy_spread > 0
                or bool(self.redundancy_per_rank) or isinstance(self.batch_size, list))

    @property
    def slowdowns(self) -> dict[int, float]:
        """rank -> factor of each slowdown rule."""
        return {int(m[1]): float(m[2]) for m in map(_SLOWDOWN.match, self.slowdown)}

    @property
    def effective_average_weights(self) -> str:
        """What the rounds weigh by: ``balance = "speed"`` implies ``"samples"``."""
        return "samples" if self.balance == "speed" else self.average_weights


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)


def field_help(name: str) -> str:
    """The comment after a field in TrainConfig's source: the flag's help text."""
    return _HELP.get(name, "")


def _read_help() -> dict[str, str]:
    import inspect

    helps = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.*)$", line)
        if m:
            helps[m[1]] = m[2]
    return helps


_HELP = _read_help()


def load_toml(path: str | Path) -> dict:
    """Read a config file; a missing or malformed file is a ConfigError naming it."""
    if not str(path).strip():  # Path("") would be the current directory
        raise ConfigError("the config file path is empty")
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}): "
            f"TOML files are UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


# Names users bring from other tools: suggested, never silently accepted.
_SUGGEST = {"learning_rate": "lr", "batch": "batch_size", "bs": "batch_size", "lr_scheduler": "lr_schedule",
            "drop": "drop_rate", "p": "drop_rate", "period": "tau", "faults": "fail",
            "arrival_rate": "arrival", "num_epochs": "epochs", "wd": "weight_decay"}


def build_config(file_values: dict | None = None, overrides: dict | None = None, source: str = "config") -> TrainConfig:
    """Merge file values and flag overrides (flags win), check types and ranges.

    ``arrival`` (the arrival rate, ``1 - drop_rate``) is accepted for ``drop_rate``.
    """
    merged: dict = {}
    for origin, values in ((source, file_values or {}), ("command line", overrides or {})):
        values = _arrival_to_drop_rate(dict(values), origin)
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in FIELDS:
                close = [_SUGGEST[key]] if key in _SUGGEST else difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.75)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown config key {key!r} in {origin}{hint}")
            if isinstance(value, dict):
                raise ConfigError(f"config key {key!r} in {origin} must be a value, not a table")
            merged[key] = _coerce(key, value, origin)
    cfg = TrainConfig(**_resolve_q(merged))
    validate(cfg)
    return cfg


def _resolve_q(merged: dict) -> dict:
    """``q`` from ``redundancy`` (``1 + floor(mu)``, the chunks held whole); both given and disagreeing is refused.

    An integer ``mu`` is then exactly ``q = 1 + mu``: the same run, fingerprint and trajectory.
    """
    mu, per_rank = merged.get("redundancy"), merged.get("redundancy_per_rank") or []
    if mu is not None and mu < 0 or any(m < 0 for m in per_rank):  # named by validate()
        return merged
    if per_rank:
        whole = 1 + math.floor(min(per_rank))
        if mu is not None and not math.isclose(mu, sum(per_rank) / len(per_rank), rel_tol=1e-9, abs_tol=1e-12):
            raise ConfigError(f"redundancy = {mu} and redundancy_per_rank = {per_rank} disagree (redundancy is their "
                              f"mean, {sum(per_rank) / len(per_rank)}): give one")
    elif mu is not None:
        whole = 1 + math.floor(mu)
    else:
        return merged
    if "q" in merged and merged["q"] != whole:
        given = f"redundancy = {mu}" if not per_rank else f"redundancy_per_rank = {per_rank}"
        raise ConfigError(f"q = {merged['q']} and {given} disagree: q = 1 + redundancy, {whole} here (the chunks "
                          f"held whole): give one")
    return {**merged, "q": whole}


def _arrival_to_drop_rate(values: dict, origin: str) -> dict:
    if "arrival" not in values:
        return values
    arrival = values.pop("arrival")
    if "drop_rate" in values or "drop-rate" in values:
        raise ConfigError(f"give either arrival or drop_rate in {origin}, not both")
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not 0 < arrival <= 1:
        raise ConfigError(f"arrival must be a number in (0, 1] (1 - drop_rate) in {origin}, got {arrival!r}")
    values["drop_rate"] = round(1.0 - float(arrival), 12)
    return values


def _coerce(key: str, value, origin: str):
    """Check ``value`` against the field's type; ints are accepted where floats are."""
    hint = HINTS[key]
    optional = one_or_list = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        lists = [a for a in args if typing.get_origin(a) is list]
        one_or_list = bool(lists)  # ``int | list[int]``: one value, or a list (one per rank)
        hint = lists[0] if lists and isinstance(value, (list, tuple)) else args[0]
    if value is None and optional:
        return None
    origin_type = typing.get_origin(hint)
    if origin_type is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single flag value stands for a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} ({origin}) must be a list of {item.__name__}, got {value!r}")
        if one_or_list and not value:
            raise ConfigError(f"config key {key!r} ({origin}) must be one {item.__name__} or a list of them, got []")
        values = [_scalar(key, v, item, origin) for v in value]
        return values[0] if one_or_list and len(values) == 1 else values
    return _scalar(key, value, hint, origin)


def _scalar(key: str, value, kind: type, origin: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > (SEED_MAX if key == "seed" else INT_MAX):
                top = "2**64-1" if key == "seed" else "2**63-1"
                raise ConfigError(f"config key {key!r} ({origin}) must be at most {top}, got {value}")
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key {key!r} ({origin}) must be finite, got {value}")
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(
        f"config key {key!r} ({origin}) must be of type {kind.__name__}, got {type(value).__name__} {value!r}"
    )


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def _at_least(name: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def validate(cfg: TrainConfig) -> None:
    """Range checks that need no knowledge of the world or the data."""
    if not cfg.data:
        raise ConfigError("data (the shard directory, --data) is required")
    if not cfg.run_dir:
        raise ConfigError("run_dir (--run-dir) is required")
    _validate_choices(cfg)
    _validate_ranges(cfg)
    _validate_limits(cfg)
    _validate_faults(cfg)
    _validate_links(cfg)
    _validate_combinations(cfg)


def _validate_choices(cfg: TrainConfig) -> None:
    _choice("algorithm", cfg.algorithm, ALGORITHMS)
    if cfg.model not in MODELS and not _MODEL_FACTORY.match(cfg.model):
        raise ConfigError(f"model must be one of {', '.join(MODELS)} or pkg.module:factory (your own), got {cfg.model!r}")
    _choice("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    _choice("nan_policy", cfg.nan_policy, NAN_POLICIES)
    _choice("chunk_weighting", cfg.chunk_weighting, CHUNK_WEIGHTINGS)
    _choice("progress", cfg.progress, PROGRESS)
    _choice("device", cfg.device, DEVICES)
    _choice("placement", cfg.placement, PLACEMENTS)
    _choice("average_weights", cfg.average_weights, AVERAGE_WEIGHTS)
    _choice("balance", cfg.balance, BALANCE)
    _choice("exchange", cfg.exchange, EXCHANGES)
    _choice("allreduce", cfg.allreduce, ALLREDUCES)


def _validate_ranges(cfg: TrainConfig) -> None:
    for name in ("q", "tau"):
        _at_least(name, getattr(cfg, name), 1)
    for b in cfg.batch_sizes(1):
        _at_least("batch_size", b, 1)
    _validate_redundancy(cfg)
    for name in ("steps", "log_every", "checkpoint_every", "threads", "eval_train_samples", "seed", "balance_warmup",
                 "momentum", "weight_decay", "warmup_epochs", "eval_every", "ranks_per_node"):
        _at_least(name, getattr(cfg, name), 0)
    if cfg.steps == 0 and not cfg.epochs > 0:
        raise ConfigError(f"epochs must be > 0 (or set steps), got {cfg.epochs}")
    if cfg.seed > SEED_MAX:
        raise ConfigError(f"seed must be in 0..2**64-1, got {cfg.seed}")
    if cfg.collective_timeout < 0:
        raise ConfigError(f"collective_timeout must be >= 0 seconds (0: no watchdog), got {cfg.collective_timeout}")
    if not cfg.bucket_mb > 0:
        raise ConfigError(f"bucket_mb must be > 0, got {cfg.bucket_mb}")
    if not cfg.lr > 0:
        raise ConfigError(f"lr must be > 0, got {cfg.lr}")
    if cfg.momentum >= 1:
        raise ConfigError(f"momentum must be in [0, 1), got {cfg.momentum}")
    if not 0 < cfg.lr_gamma <= 1:
        raise ConfigError(f"lr_gamma must be in (0, 1], got {cfg.lr_gamma}")
    if any(w < 1 for w in cfg.mlp_hidden):
        raise ConfigError(f"mlp_hidden widths must be >= 1, got {cfg.mlp_hidden}")
    if any(m < 0 for m in cfg.lr_milestones):
        raise ConfigError(f"lr_milestones must be epochs >= 0, got {cfg.lr_milestones}")
    for name in ("drop_rate", "drop_rate_phase1", "drop_rate_phase2"):
        value = getattr(cfg, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} must be in [0, 1) (an arrival rate above 0), got {value}")


def _validate_redundancy(cfg: TrainConfig) -> None:
    """``redundancy`` and its spread or per-rank values: numbers >= 0 (their top, P-1, needs the world)."""
    if cfg.redundancy is not None and cfg.redundancy < 0:
        raise ConfigError(f"redundancy must be a number >= 0 (mu; q = 1 + mu), got {cfg.redundancy}")
    if cfg.redundancy_spread < 0:
        raise ConfigError(f"redundancy_spread must be >= 0 (sigma of the per-rank draw), got {cfg.redundancy_spread}")
    if any(m < 0 for m in cfg.redundancy_per_rank):
        raise ConfigError(f"redundancy_per_rank values must be >= 0, got {cfg.redundancy_per_rank}")
    if cfg.redundancy_per_rank and cfg.redundancy_spread > 0:
        raise ConfigError("give redundancy_per_rank (the values) or redundancy_spread (a draw), not both")
    check_float32("redundancy_spread", cfg.redundancy_spread)  # numpy's normal() overflows past it
    if cfg.reweight and cfg.fractional:
        raise ConfigError("reweight does not combine with fractional or per-rank redundancy or per-rank batch_size "
                          "(their loss is the mean over each rank's batch)")


def _validate_limits(cfg: TrainConfig) -> None:
    """What the values become: float32 tensors, step counts, durations, threads, a model in memory."""
    check_float32("lr", cfg.lr, nonzero=True)
    check_float32("weight_decay", cfg.weight_decay, nonzero=True)
    check_float32("lr_gamma", cfg.lr_gamma, nonzero=True)  # a decayed lr that rounds to 0 stops learning
    for name in ("epochs", "eval_every", "warmup_epochs"):  # become step counts (64-bit integers)
        if getattr(cfg, name) > INT_MAX:
            raise ConfigError(f"{name} must be at most 2**63-1 epochs, got {getattr(cfg, name)}")
    if any(m > INT_MAX for m in cfg.lr_milestones):
        raise ConfigError(f"lr_milestones must be at most 2**63-1 epochs, got {cfg.lr_milestones}")
    check_seconds("collective_timeout", cfg.collective_timeout)
    check_seconds("link_latency_ms", cfg.link_latency_ms, "ms", 1e3)
    _check_gbps("link_gbps", cfg.link_gbps)
    if cfg.threads > node_cpus():
        raise ConfigError(f"threads must be at most this node's {node_cpus()} CPUs (0: chosen for the ranks "
                          f"sharing the node), got {cfg.threads}")
    if cfg.model == "mlp":
        # A lower bound on the MLP's parameters whatever the data (1 feature, 2 classes):
        # refused here, before torch allocates it.
        widths = [1, *cfg.mlp_hidden, 2]
        params = sum(a * b + b for a, b in zip(widths, widths[1:]))
        check_bytes(f"mlp_hidden {cfg.mlp_hidden} (at least {params:,} parameters: weights, gradients, "
                    f"a flat copy)", 3 * 4 * params)


def _check_gbps(name: str, gbps: float) -> None:
    """A link bandwidth in Gb/s: 0 (unlimited) or enough that a message's time is a duration."""
    if not (gbps == 0 or MIN_GBPS <= gbps <= FLOAT32_MAX):
        raise ConfigError(f"{name} must be 0 (unlimited) or in {MIN_GBPS:g}..{FLOAT32_MAX:.4g} Gb/s, got {gbps}")


def _validate_combinations(cfg: TrainConfig) -> None:
    """Settings that are each legal but refused together: one message, before anything loads."""
    if cfg.resume and cfg.overwrite:
        raise ConfigError("give --resume (continue the run in run_dir) or --overwrite (replace it), not both")
    if cfg.overlap_rounds and cfg.average_optimizer_state and REGISTRY[cfg.algorithm].uses_tau:
        raise ConfigError("overlap_rounds does not combine with average_optimizer_state "
                          "(the spec delays the model's average only): turn one of them off")
    if cfg.allreduce == "node-aware" and ((cfg.algorithm == "sync" and cfg.overlap) or
                                       (cfg.algorithm == "local" and cfg.overlap_rounds)):
        raise ConfigError(f"allreduce = {cfg.allreduce!r} sums blocking rounds; {cfg.algorithm} with "
                          f"{'overlap' if cfg.algorithm == 'sync' else 'overlap_rounds'} averages by the library's "
                          f"nonblocking Allreduce: give --no-overlap{'' if cfg.algorithm == 'sync' else '-rounds'}, "
                          "or leave allreduce at 'library'")
    if cfg.balance == "speed" and not REGISTRY[cfg.algorithm].uses_tau:
        raise ConfigError(f"balance = 'speed' needs algorithm local or rps (it weighs model averaging by the "
                          f"samples each rank drew); {cfg.algorithm} averages gradients with equal weights")


def _validate_faults(cfg: TrainConfig) -> None:
    """The injected faults: failures (rate, schedule, mode) and stragglers."""
    _choice("fail_mode", cfg.fail_mode, FAIL_MODES)
    if not 0.0 <= cfg.fail_rate < 1.0:
        raise ConfigError(f"fail_rate must be in [0, 1), got {cfg.fail_rate}")
    for rule in cfg.fail:
        if not FAIL_RULE.match(rule):
            raise ConfigError(f"fail entry {rule!r} must look like RANK@STEP with RANK, STEP >= 0, e.g. 3@500, "
                              f"or node:NODE@STEP (every rank of a node), e.g. node:1@500")
    if len(cfg.faults) + len(cfg.node_faults) != len(cfg.fail):
        raise ConfigError(f"fail names a rank or a node twice: {cfg.fail}")
    for rule in cfg.straggle:
        m = STRAGGLE_RULE.match(rule)
        if not m or (m[3] and int(m[3]) < int(m[2])):
            raise ConfigError(f"straggle entry {rule!r} must look like RANK@STEP[-END]:SECONDS, e.g. 1@10-20:0.5")
        seconds = _number(m[4])
        if seconds is None:
            raise ConfigError(f"straggle entry {rule!r}: SECONDS {m[4]!r} is not a number")
        check_seconds(f"straggle entry {rule!r}: SECONDS", seconds)
    for rule in cfg.slowdown:
        m = _SLOWDOWN.match(rule)
        factor = _number(m[2]) if m else None
        if factor is None or not 1.0 <= factor <= MAX_SLOWDOWN:
            raise ConfigError(f"slowdown entry {rule!r} must look like RANK:FACTOR with FACTOR a number in "
                              f"1..{MAX_SLOWDOWN:g}, e.g. 1:2 (rank 1 computes at half speed)")
    if len(cfg.slowdowns) != len(cfg.slowdown):
        raise ConfigError(f"slowdown names a rank twice: {cfg.slowdown}")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _validate_links(cfg: TrainConfig) -> None:
    """The link rules' form and values, before the world size is known (their ranks: at assembly)."""
    from .faults.lossy import apply_link_rules  # numpy only: no MPI

    def rate(what: str, value: float) -> None:
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{what} must be in [0, 1) (arrival rate above 0), got {value}")

    checks = {"link_drop": rate,
              "link_latency": lambda what, ms: check_seconds(what, ms, "ms", 1e3),
              "link_bandwidth": _check_gbps}
    for name, check in checks.items():
        for rule in getattr(cfg, name):
            try:
                apply_link_rules([], [rule], INT_MAX + 1, name, check)  # no matrices: form and value only
            except ConfigError:
                raise
            except ValueError:  # the form matched, but the value is no number ("2->3=1..2")
                raise ConfigError(f"{name} rule {rule!r}: the value after '=' is not a number") from None


def validate_for_world(cfg: TrainConfig, world_size: int, chunk_sizes: tuple[int, ...] | None = None,
                       ranks_per_node: int = 1) -> None:
    """Checks that need the number of ranks P (and, given them, the shards' chunk sizes and R)."""
    _validate_redundancy_for_world(cfg, world_size)
    if not 1 <= cfg.q <= world_size:
        raise ConfigError(f"q must be in 1..P={world_size}, got {cfg.q}")
    if chunk_sizes:
        smallest = min(range(len(chunk_sizes)), key=lambda c: chunk_sizes[c])
        if max(cfg.batch_sizes(1)) > chunk_sizes[smallest]:
            raise ConfigError(
                f"batch_size {cfg.batch_size} (samples per chunk per step) is larger than chunk {smallest}'s "
                f"{chunk_sizes[smallest]} samples: one step would pass over it more than once and epochs would "
                f"lose their meaning; use at most {chunk_sizes[smallest]}"
            )
    if chunk_sizes and cfg.steps == 0:
        per_epoch = max(1, -(-sum(chunk_sizes) // sum(cfg.batch_sizes(len(chunk_sizes)))))
        if cfg.epochs * per_epoch > INT_MAX:
            raise ConfigError(f"epochs {cfg.epochs} at {per_epoch} steps per epoch is more than 2**63-1 steps")
    for rank, step in cfg.faults.items():
        if rank >= world_size:
            raise ConfigError(f"fail entry {rank}@{step} names rank {rank}, but ranks are 0..{world_size - 1}")
    nodes = -(-world_size // ranks_per_node)
    for node, step in cfg.node_faults.items():
        if node >= nodes:
            raise ConfigError(f"fail entry node:{node}@{step} names node {node}, but the {world_size} ranks fill "
                              f"nodes 0..{nodes - 1} ({ranks_per_node} ranks per node)")
    if len(rank_faults(cfg, world_size, ranks_per_node)) >= world_size:
        raise ConfigError(f"fail would stop all {world_size} ranks; at least one must survive")
    for rank, first, _, _ in stragglers(cfg.straggle):
        if rank >= world_size:
            raise ConfigError(f"straggle entry for rank {rank}: ranks are 0..{world_size - 1}")
    for rank in cfg.slowdowns:
        if rank >= world_size:
            raise ConfigError(f"slowdown entry for rank {rank}: ranks are 0..{world_size - 1}")


def _validate_redundancy_for_world(cfg: TrainConfig, world_size: int) -> None:
    """Redundancies in [0, P-1] and per-rank lists of P values."""
    top = world_size - 1
    if cfg.redundancy is not None and cfg.redundancy > top:
        raise ConfigError(f"redundancy must be in [0, P-1] = [0, {top}] (P={world_size}), got {cfg.redundancy}")
    if cfg.redundancy_spread > top:  # a wider draw is clipped to the ends of [0, P-1] almost everywhere
        raise ConfigError(f"redundancy_spread must be in [0, P-1] = [0, {top}] (P={world_size}), got "
                          f"{cfg.redundancy_spread}")
    for name, values in (("redundancy_per_rank", cfg.redundancy_per_rank),
                         ("batch_size", cfg.batch_size if isinstance(cfg.batch_size, list) else [])):
        if values and len(values) != world_size:
            raise ConfigError(f"{name} must give one value per rank: {len(values)} values for P={world_size} ranks")
    if any(m > top for m in cfg.redundancy_per_rank):
        raise ConfigError(f"redundancy_per_rank values must be in [0, P-1] = [0, {top}] (P={world_size}), "
                          f"got {cfg.redundancy_per_rank}")
