"""Progress on rank 0: a tqdm bar on a terminal, plain periodic lines in batch jobs."""

from __future__ import annotations

import sys


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
        loss = record.get("loss")
        fields = {"loss": f"{loss:.4f}" if loss is not None else "-"}
        if record.get("avg_test_accuracy") is not None:
            fields["test_acc"] = f"{record['avg_test_accuracy']:.3f}"
        if self.bar is not None:
            self.bar.update(done - self._last)
            self.bar.set_postfix(fields, refresh=False)
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
