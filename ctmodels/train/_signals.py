"""SIGTERM during `fit` (with a `checkpoint_dir`): the step in flight finishes, a
checkpoint is saved, then the previous handler (or the default action) runs."""

from __future__ import annotations

import signal
import threading


class TermGuard:
    """Installed (in the main thread, unless SIGTERM is ignored) when there is a
    checkpoint folder; `flag` is set by the signal; `restore` puts the previous
    handler back."""

    def __init__(self, checkpoint_dir):
        self.flag = False
        self.installed = False
        self.old_handler = None
        if (
            checkpoint_dir is not None
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
        ):
            self.old_handler = signal.signal(signal.SIGTERM, self._on_term)
            self.installed = True

    def _on_term(self, signum, frame):
        self.flag = True

    def _previous(self):
        return signal.SIG_DFL if self.old_handler is None else self.old_handler

    def handle(self, s, save, prog) -> None:
        """Save `s`, then act on the signal as if `fit` had not caught it."""
        self.flag = False
        save(s)
        prog.close()
        handler = self._previous()
        signal.signal(signal.SIGTERM, handler)
        if callable(handler):  # a Python handler: let it decide, then go on
            handler(signal.SIGTERM, None)
            signal.signal(signal.SIGTERM, self._on_term)
        else:  # the default action: terminate, now that the checkpoint is safe
            signal.raise_signal(signal.SIGTERM)

    def restore(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self._previous())
