"""Progress on rank 0: a tqdm bar on a terminal, plain periodic lines in batch jobs.

The loss shown is rank 0's training-batch loss, the mean over the last logging window: a
quick, noisy figure, and not the one the `done:` line (the averaged model on the whole
training set) or `hpcsgd report` (rank means) give, so its label says whose and which it is.
"""

from __future__ import annotations

import sys


LOSS_LABEL = "loss (rank 0 batches, last window)"
ACC_LABEL = "test acc (averaged model)"
BAR_KEYS = {LOSS_LABEL: "r0_batch_loss", ACC_LABEL: "avg_model_test_acc"}


def progress_fields(record: dict) -> dict[str, str]:
    """The labelled figures of a progress line: rank 0's batch loss, the averaged model's test
    accuracy at evaluation steps."""
    loss = record.get("loss")
    fields = {LOSS_LABEL: f"{loss:.4f}" if loss is not None else "-"}
    if record.get("avg_test_accuracy") is not None:
        fields[ACC_LABEL] = f"{record['avg_test_accuracy']:.3f}"
    return fields


class Progress:
    """``update(done, record)`` after each logged step; ``close()`` at the end.

    Args:
        mode: auto (bar when stderr is a terminal and tqdm is installed), bar, lines, none.
        total: total steps; start: the first step (after a resume).
        enabled: False on every rank but rank 0.
    """

    def __init__(self, mode: str, total: int, start: int = 0, enabled: bool = True):
        self.total = total
        self.bar = None
        self.requested = mode
        self.mode = "none" if not enabled else mode
        if self.mode == "auto":
            self.mode = "bar" if sys.stderr.isatty() else "lines"
        if self.mode == "bar":
            try:
                from tqdm import tqdm
            except ImportError:
                self.mode = "lines"
            else:
                self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
        self._last = start
        self._last_line = 0.0
        self._every = max(1, total // 20)

    def update(self, done: int, record: dict) -> None:
        if self.mode == "none":
            return
        fields = progress_fields(record)
        if self.bar is not None:
            self.bar.update(done - self._last)
            # tqdm prints "key=value": short keys keep the bar on one line.
            self.bar.set_postfix({BAR_KEYS[k]: v for k, v in fields.items()}, refresh=False)
        elif done - self._last_line >= self._every or done == self.total or "test_loss" in record:
            self._last_line = done
            extra = " ".join(f"{k} {v}" for k, v in fields.items())
            print(
                f"step {done}/{self.total} epoch {record['epoch']:.2f} {extra} "
                f"rounds {record['rounds']} live {record['live_ranks']} {record['wall_s']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
        self._last = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def take_over(self, start: int) -> None:
        """Report from this rank on, from step ``start``: the rank that reported has gone."""
        if self.mode == "none" and self.requested != "none":
            self.__init__(self.requested, self.total, start, enabled=True)


def progress(iterable, world, total: int | None = None, desc: str | None = None, **tqdm_options):
    """``for x, y in hpcsgd.progress(loader, world):`` a tqdm bar on rank 0 of a library loop.

    As ``hpcsgd train``'s bar: on rank 0 only, when stderr is a terminal and tqdm is
    installed; everywhere else (other ranks, batch jobs, no tqdm) the iterable itself comes
    back, so the loop is the same on every rank and nothing is printed into a log file.
    ``total`` defaults to ``len(iterable)``; ``tqdm_options`` go to tqdm as they are.
    """
    if world.comm.rank != 0 or not sys.stderr.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, **tqdm_options)
