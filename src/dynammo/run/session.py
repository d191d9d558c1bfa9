"""The lifecycle every run shares (`dynammo run`, `resume` and `pretrain`): the console copied to
log.txt, the fit journal handed to the engine, SIGINT/SIGTERM turned into a saved stop, the final
status recorded (interrupted or failed: why), and whatever was opened closed."""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from dynammo.console import Console
from dynammo.errors import RunInterrupted, UserError
from dynammo.journal import FitJournal
from dynammo.signals import handling_stop_signals


@contextmanager
def stop_on_signals(engine, console: Console):
    """SIGINT/SIGTERM ask the engine to save and stop at the next batch; a second one (a second or
    more later) stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    first = [0.0]

    def handler(signum, frame):
        name = signal.Signals(signum).name
        # within a second it is the same request: torchrun forwards the SIGTERM that SLURM or a
        # `kill` of the process group also sent to every worker directly
        if engine.stop_requested and time.monotonic() - first[0] > 1.0:
            raise KeyboardInterrupt
        if engine.stop_requested:
            return
        first[0] = time.monotonic()
        engine.stop_requested = name
        console.print(f"{name}: saving a checkpoint at the next batch, then stopping (send it again to stop at once)")

    with handling_stop_signals(handler):
        yield


class Session:
    """The running run as its body sees it: `status` is set when the body ends."""

    def __init__(self, engine, console: Console):
        self.engine, self.console = engine, console
        self.status = "failed"

    def stop_on_signals(self):
        """The block a signal stops at its next batch (the training)."""
        return stop_on_signals(self.engine, self.console)


@contextmanager
def run_session(run_dir: Path, console: Console, engine, *, journal: Optional[FitJournal], tb,
                mark: Callable[[str, str], None], resume_hint: Callable[[], str],
                close: Callable[[str], None]):
    """console -> run_dir/log.txt, the engine gets `tb` and `journal`; a RunInterrupted is recorded
    by `mark("interrupted", why)` and raised again with `resume_hint()`, a UserError (a diverged
    loss, a full disk) by `mark("failed", why)`; `close(status)` runs however the run ends."""
    console.attach(Path(run_dir) / "log.txt")
    session = Session(engine, console)
    try:
        engine.attach_run(tb, journal)
        yield session
        session.status = "complete"
    except RunInterrupted as exc:
        session.status = "interrupted"
        mark("interrupted", str(exc))
        raise RunInterrupted(f"{exc}; {resume_hint()}") from None
    except KeyboardInterrupt:  # a second signal: stopped at once
        session.status = "interrupted"
        raise
    except UserError as exc:  # what the finished tasks (epochs) recorded stays
        mark("failed", str(exc))
        raise
    finally:
        close(session.status)
        console.detach()
