"""Sites sharing a worker run on one thread, one at a time, and switch only when they wait.

Each hosted site's calls (``fit``, ``test``, ...) run as a greenlet on the worker's one compute thread. A site
computes until it must wait for the other sites (a round barrier, an agreed decision, the global model): then it
hands the thread to the next site that can run, and resumes when what it waits for has arrived. So a worker with
several sites trains them one after another with all of its threads, as a plain loop would, and no two sites ever
compute at once.

One thread rather than a thread per site: torch's CPU parallelism (OpenMP) keeps a team of threads per thread that
uses it, and once a process holds more of them than it has CPUs, every parallel region pays for waking its team
(about a third slower per step, measured on a 2-core machine with 5 sites). Greenlets (the stack switching under
gevent) keep a single team.

What is process-wide but belongs to a site travels with it at every switch (:class:`SiteState`): torch's, numpy's
and Python's random generators, and autograd's grad mode. A site therefore draws exactly the numbers it would draw
alone in its own process, which is what makes results the same however sites are packed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import random
import threading
import time
from typing import Any, Callable, Optional

import greenlet
import numpy as np
import torch


def random_state() -> dict[str, Any]:
    """The process-wide random generators' state (torch CPU and, once initialised, CUDA; numpy's; Python's), in
    types a ``weights_only`` checkpoint load accepts (tensors, numbers, strings, lists)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": list(random.getstate()),
    }


def set_random_state(state: dict[str, Any]) -> None:
    """Put a :func:`random_state` back."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class SiteState:
    """What one site keeps of the process-wide state: random generators and grad mode.

    ``announce(True | False)``, if given, is called when the site starts and stops computing (the worker notes it
    where it outlives the worker, so that a worker's death can be put on the site that was at work).
    """

    def __init__(self, announce: Optional[Callable[[bool], None]] = None) -> None:
        self._rng: Optional[dict[str, Any]] = None
        self._grad_enabled = True
        self._announce = announce

    def capture(self) -> None:
        """Save the process-wide state as this site's."""
        self._rng = random_state()
        self._grad_enabled = torch.is_grad_enabled()

    def restore(self) -> None:
        """Put this site's state back in place."""
        torch.set_grad_enabled(self._grad_enabled)
        if self._rng is not None:
            set_random_state(self._rng)

    def computing(self, busy: bool) -> None:
        if self._announce is not None:
            self._announce(busy)


POLL_SECONDS = 0.05  # how often an idle compute thread checks, itself, whether what a site waits for has arrived
log = logging.getLogger(__name__)


class _Waiting:
    """A site's greenlet waiting for a Ray object."""

    __slots__ = ("site", "state", "done", "ref", "since")

    def __init__(self, site: greenlet.greenlet, state: SiteState, done: concurrent.futures.Future, ref: Any) -> None:
        self.site, self.state, self.done, self.ref, self.since = site, state, done, ref, time.monotonic()


class Scheduler:
    """The worker's compute thread and the greenlets of its sites' calls.

    A waiting site is resumed by the completion callback of the object it waits for; when every site waits, the
    compute thread also asks Ray itself (``ray.wait``) every :data:`POLL_SECONDS`, so a completion whose callback
    never comes (seen with objects another process put in the object store) cannot leave the worker waiting
    forever."""

    def __init__(self, threads: int) -> None:
        self._inbox: "queue.SimpleQueue[tuple]" = queue.SimpleQueue()
        self._hub: Optional[greenlet.greenlet] = None
        self._busy: set[int] = set()
        self._waiting: dict[int, _Waiting] = {}
        self._waits = 0
        self._thread = threading.Thread(target=self._loop, args=(threads,), name="lightning-fed-sites", daemon=True)
        self._thread.start()

    # -- from any thread (Ray's method threads) --------------------------------------------------
    def call(self, state: SiteState, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` as the site whose state is ``state``, on the compute thread; wait for its result."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", state, fn, args, done))
        return done.result()

    def set_threads(self, threads: int) -> None:
        """torch's intra-op threads, set where the computing happens."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("threads", threads, done))
        done.result()

    def wait_idle(self, timeout: float) -> bool:
        """Whether every site's call has ended (returned or raised) within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self._busy or self._waiting:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- from a site's greenlet -------------------------------------------------------------------
    def wait(self, ref: Any) -> Any:
        """The value of Ray object ``ref``; other sites compute meanwhile."""
        if self._hub is None or greenlet.getcurrent() is self._hub or threading.current_thread() is not self._thread:
            raise RuntimeError("a site waited for the federation outside its worker's compute thread")
        if torch.is_inference_mode_enabled() or torch.is_autocast_enabled():
            # such modes live in guards on the site's stack, which cannot travel with it to another site
            raise RuntimeError(
                "a site waited for the federation inside inference mode or autocast: call the federation "
                "outside them (e.g. in a hook that runs after validation, not inside a step)"
            )
        return self._hub.switch(("wait", ref))

    # -- the compute thread -------------------------------------------------------------------------
    def _loop(self, threads: int) -> None:
        self._hub = greenlet.getcurrent()
        torch.set_num_threads(max(1, threads))
        # denormal floats (below ~1e-38, e.g. in Adam's second moments) can make a CPU step 10-40x slower on x86;
        # flushed to zero, results change only where values are that small (docs: How it works)
        torch.set_flush_denormal(True)
        while True:
            try:
                item = self._inbox.get(timeout=POLL_SECONDS if self._waiting else None)
            except queue.Empty:
                self._resume_arrived()
                continue
            if item[0] == "threads":
                torch.set_num_threads(max(1, item[1]))
                item[2].set_result(None)
            elif item[0] == "call":
                _, state, fn, args, done = item
                if id(state) in self._busy:
                    done.set_exception(RuntimeError("a site was asked for two things at once"))
                    continue
                self._busy.add(id(state))
                self._step(greenlet.greenlet(lambda fn=fn, args=args: fn(*args)), state, done, start=True)
            else:  # "ready": what a site waited for has arrived (unless the site was resumed by polling already)
                _, key, value, error = item
                waiting = self._waiting.pop(key, None)
                if waiting is not None:
                    self._step(waiting.site, waiting.state, waiting.done, value=value, error=error)

    def _resume_arrived(self) -> None:
        import ray

        by_ref = {w.ref: key for key, w in self._waiting.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=0)
        for ref in ready:
            waiting = self._waiting.pop(by_ref[ref])
            try:
                value, error = ray.get(ref, timeout=0), None
            except Exception as err:  # the call it waited for failed: the site gets the error, as from the callback
                value, error = None, err
            if time.monotonic() - waiting.since > 1.0:
                log.warning(
                    "lightning-fed: a Ray completion callback did not come within 1 s; the site was resumed by polling"
                )
            self._step(waiting.site, waiting.state, waiting.done, value=value, error=error)

    def _step(
        self,
        site: greenlet.greenlet,
        state: SiteState,
        done: concurrent.futures.Future,
        start: bool = False,
        value: Any = None,
        error: Optional[BaseException] = None,
    ) -> None:
        """Run ``site`` until it finishes or waits again."""
        state.restore()
        state.computing(True)
        try:
            if start:
                out = site.switch()
            elif error is not None:
                out = site.throw(error)
            else:
                out = site.switch(value)
        except BaseException as err:  # the site's call raised
            state.capture()
            state.computing(False)
            self._busy.discard(id(state))
            done.set_exception(err)
            return
        state.capture()
        state.computing(False)
        if site.dead:
            self._busy.discard(id(state))
            done.set_result(out)
            return
        _, ref = out
        self._waits += 1
        key = self._waits  # one per wait: a late callback can never resume a later wait
        self._waiting[key] = _Waiting(site, state, done, ref)
        ref.future().add_done_callback(lambda f: self._inbox.put(("ready", key, *_outcome(f))))


def _outcome(future: concurrent.futures.Future) -> tuple[Any, Optional[BaseException]]:
    error = future.exception()
    return (None, error) if error is not None else (future.result(), None)
