"""Ctrl-C during training: finish the step, save, stop."""
import signal


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the current step (``requested`` becomes True); a second Ctrl-C
    interrupts at once. The loop may also set ``requested`` itself (the time budget)."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not in the main thread: leave Ctrl-C alone
            self._previous = None
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: finishing this step, saving a checkpoint and stopping (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
