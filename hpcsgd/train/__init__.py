"""``hpcsgd train``: the command's training loop (:mod:`.loop`) and its one-job parts.

A client of the public API. Nothing is imported here, so ``hpcsgd.train.rundir`` (read by the
report) or ``hpcsgd.train.startup`` (imported by the CLI first) cost only themselves.
"""
