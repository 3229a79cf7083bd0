"""A fair re-entrant lock, for the locks two Python threads (a panel's training thread, the kernel's cells) take in
turns: the model's step lock (lab.nn.step_lock) and the wgpu backend's."""
import collections
import threading


class FairLock:
    """A re-entrant lock granted in the order it was asked for. Python's locks are not fair: a training loop that
    releases its lock and takes it again for the next step could get it back at once, every time, so a save or a
    generation from the kernel waited for the end of the run. Here a thread that asked while the lock was held is
    served at the next release, before the releasing thread can have it again."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner, self._depth, self._queue = None, 0, collections.deque()

    def acquire(self):
        me = threading.get_ident()
        if self._owner == me:   # re-entry needs no turn (only the owner sets _owner to itself)
            self._depth += 1
            return True
        with self._cond:
            ticket = object()
            self._queue.append(ticket)
            try:
                while self._owner is not None or self._queue[0] is not ticket:
                    self._cond.wait()
            except BaseException:   # (a Ctrl-C while waiting): give the place in the queue up
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._owner, self._depth = me, 1
            return True

    def release(self):
        if self._owner != threading.get_ident():
            raise RuntimeError("FairLock.release() by a thread that does not hold it")
        if self._depth > 1:
            self._depth -= 1
            return
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()
