"""Run the console's Session in a child process, so drawing can never delay a decision.

Why a process: PySide6 holds the GIL for the whole of each Qt call, so with the loop in a thread
of the GUI process every long paint stalled the acquisition thread. `python -m gui.bench`, 64 ch
at 1 kHz, decision latency p99 1.5-2.1 ms headless vs 9.5-15 ms with the window drawing (thread
runner). With this runner (and the GUI thread at nice +10, `yield_cpu_to_sessions`): p99
1.5-2.0 ms with the window vs 1.5-2.7 ms headless on the same VM (gui/bench.py docstring).

Command latency (gui.bench, 40 per run): DISARM call -> interlock disarmed in the child p50
0.3-0.5 ms (round trip 0.5-1.0 ms); EMERGENCY STOP call -> disarmed 0.3-0.9 ms. The in-process
call takes 0.03-0.5 ms; the extra is the pipe and the child's command thread waking up.

Channels between the console (parent) and the session (child, 'spawn' context, no Qt imported):

- commands: a duplex Pipe, one request and one reply at a time (`SessionProxy`, the
  SessionControl of the window). A refused command raises ControlError in the window exactly as
  in-process; a child that does not answer within COMMAND_TIMEOUT_S raises ControlError too.
  The reply carries the child's local_clock() when the command had taken effect, so the time
  from the call to the interlock disarmed is measured (`SessionProxy.last_command_ms`).
- events + status: a one-way Pipe written by one forwarder thread in the child every
  FORWARD_PERIOD_S (bus events, `Session.snapshot()`, every LATENCY_PERIOD_S the latency
  ring, last a 'final' report with the summary or the error). The loop never touches a pipe:
  events wait in the bus subscription (bounded, drops counted and shown) until the forwarder
  takes them.
- EEG and decisions for the scope: `multiprocessing.shared_memory`, the Scope's flat buffer
  (gui/scope.py), written by the pipeline tap in the child, read by the window. The
  child unlinks the segment when it ends; a child that died without doing so (SIGKILL, a
  crash) is noticed by the console's next poll, which unlinks it then (the console's own
  mapping stays valid until it lets go), so /dev/shm does not keep a dead session's ring.

Safety: the child disarms and ends the session (recording flushed, summary written) when asked
(`stop`), when the command pipe reaches EOF or the parent pid changes (the console died, even by
SIGKILL), and on SIGTERM; it ignores SIGINT (Ctrl-C in a terminal closes the window, which stops
the child in order). If an EMERGENCY STOP cannot reach the child, the console kills it (a dead
process cannot pulse; the recording is then incomplete).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np
from pylsl import local_clock

from closedloop.config import SessionConfig
from closedloop.control import ControlError
from closedloop.session import SessionSnapshot
from gui.model import POLLED_KINDS
from gui.runner import SUBSCRIPTION_MAXLEN, SourceSpec, source_for
from gui.scope import Scope

log = logging.getLogger(__name__)

START_METHOD = "spawn"  # no fork of a Qt process; the child imports no Qt
FORWARD_PERIOD_S = 0.02  # events + snapshot to the console every 20 ms (its tick is >= 40 ms)
LATENCY_PERIOD_S = 0.5  # the latency ring (8192 x float32 = 32 KB) every 0.5 s
COMMAND_TIMEOUT_S = 2.0  # a command not answered within this raises ControlError
ESTOP_TIMEOUT_S = 1.0  # an emergency stop not confirmed within this kills the child
PARENT_CHECK_S = 0.25  # the child checks its parent pid this often while idle
FINAL_SEND_TIMEOUT_S = 10.0  # the child waits this long to hand over its final report
# Linux niceness added to the console's GUI thread (`yield_cpu_to_sessions`): with the session
# in its own process the window no longer holds the loop's GIL, but on a 2-core machine painting
# still competes for a core. `python -m gui.bench`, 64 ch x 1 kHz, busy machine (load 2-5):
# decision latency p99 3.7-4.6 ms at nice 0 vs 2.0-2.9 ms at nice 10 (quiet: ~1-1.5 ms either
# way). Sessions start from a spawner thread made before the nice: they keep normal priority.
GUI_NICE = 10
CHILD_COMMANDS = frozenset(
    {
        "arm",
        "disarm",
        "emergency_stop",
        "set_thresholds",
        "start_calibration",
        "stop_calibration",
        "thresholds",
        "stop",
        "probe",
    }
)


class SessionProcessError(RuntimeError):
    """The session process failed (its exception, or how it died); shown in the console."""


# ============================================================================ child side
def child_main(
    cmd: Any,
    out: Any,
    config: SessionConfig,
    spec: SourceSpec | None,
    out_root: str | None,
    arm_action: str | None,
    live: bool,
    parent_pid: int,
) -> None:
    """Entry point of the session process (module level: picklable under 'spawn')."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the console coordinates Ctrl-C
    child = _Child(cmd, out, config, spec, out_root, arm_action, live, parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: child.request_stop("SIGTERM to the session process"))
    code = child.run()
    if code:
        raise SystemExit(code)


class _Child:
    def __init__(self, cmd, out, config, spec, out_root, arm_action, live, parent_pid) -> None:
        self.cmd, self.out = cmd, out
        self.config, self.spec = config, spec
        self.out_root = Path(out_root) if out_root else None
        self.arm_action, self.live, self.parent_pid = arm_action, live, parent_pid
        self.session = None
        self.subscription = None
        self.scope: Scope | None = None
        self.shm: shared_memory.SharedMemory | None = None
        self.scope_msg: tuple | None = None
        self.final: tuple | None = None
        self.done = threading.Event()
        self.stop_reason = ""

    def request_stop(self, reason: str) -> None:
        """Disarm and end the session (any thread; also before the session exists)."""
        self.stop_reason = self.stop_reason or reason
        s = self.session
        if s is not None:
            try:
                s.disarm(f"session process: {reason}")
            finally:
                s.stop(reason)

    def run(self) -> int:
        from closedloop.bus import EventBus
        from closedloop.session import Session

        error_text = tb = ""
        summary = None
        forwarder = threading.Thread(target=self._forward, name="console-forward", daemon=True)
        server = threading.Thread(target=self._serve, name="console-commands", daemon=True)
        try:
            bus = EventBus()
            self.subscription = bus.subscribe(
                "console", maxlen=SUBSCRIPTION_MAXLEN, kinds=POLLED_KINDS
            )
            source = source_for(self.config, self.spec)
            self.session = Session(
                self.config,
                source,
                live=self.live,
                bus=bus,
                out_root=self.out_root,
                arm_action=self.arm_action,
                on_status=self._on_status,
            )
            if self.stop_reason:  # asked to stop while starting
                self.session.stop(self.stop_reason)
            forwarder.start()
            server.start()
            summary = self.session.run()
        except BaseException as exc:  # reported to the console; the session already disarmed
            error_text = f"{type(exc).__name__}: {exc}"
            tb = traceback.format_exc()
            log.error("session process failed:\n%s", tb)
        finally:
            lat = self._latency()
            self.final = ("final", summary, error_text, tb, lat)
            self.done.set()
            if forwarder.ident is not None:
                forwarder.join(FINAL_SEND_TIMEOUT_S)
            else:  # failed before the forwarder ran: report directly
                self._send([self.final])
            if self.shm is not None:
                self.shm.unlink()  # the console keeps its own mapping until it lets go
        return 1 if error_text else 0

    # ---- loop thread --------------------------------------------------------------------
    def _on_status(self, _status) -> None:
        # First call after the pipeline exists comes before the first chunk (phase
        # 'calibrating'), so the tap sees every sample (as gui.runner.SessionRunner).
        s = self.session
        if self.scope is None and s is not None and s.pipeline is not None:
            chain = s.pipeline.chain
            names = tuple(chain.ch_names)
            feats = tuple(getattr(chain, "feature_names", ()))
            size = Scope.buffer_size(len(names), chain.sfreq, len(feats))
            self.shm = shared_memory.SharedMemory(create=True, size=size)
            scope = Scope(names, chain.sfreq, feats, buffer=self.shm.buf)
            s.pipeline.taps.append(scope)
            self.scope = scope
            self.scope_msg = ("scope", self.shm.name, names, chain.sfreq, feats, scope.seconds)

    # ---- forwarder thread: the only writer of the event pipe ----------------------------
    def _forward(self) -> None:
        scope_sent = False
        next_latency = 0.0
        while True:
            finishing = self.done.wait(FORWARD_PERIOD_S)
            msgs: list[tuple] = []
            if not scope_sent and self.scope_msg is not None:
                msgs.append(self.scope_msg)
                scope_sent = True
            events = self.subscription.drain()
            if events:
                msgs.append(("events", events))
            s = self.session
            msgs.append(("status", s.snapshot(), self.subscription.dropped))
            now = time.monotonic()
            if now >= next_latency and s.pipeline is not None:
                next_latency = now + LATENCY_PERIOD_S
                msgs.append(("latency", self._latency()))
            if finishing:
                msgs.append(self.final)
            if not self._send(msgs):
                self.request_stop("console connection lost")
                return
            if finishing:
                return

    def _send(self, msgs: list[tuple]) -> bool:
        try:
            self.out.send(msgs)
        except (pickle.PicklingError, TypeError, AttributeError):
            # an event payload that does not pickle: send it as text rather than lose it
            try:
                self.out.send([_plain(m) for m in msgs])
            except OSError:
                return False
        except OSError:  # BrokenPipe: the console is gone
            return False
        return True

    def _latency(self) -> np.ndarray:
        s = self.session
        p = s.pipeline if s is not None else None
        return p.latency_samples().astype(np.float32) if p is not None else np.zeros(0, np.float32)

    # ---- command thread -------------------------------------------------------------------
    def _serve(self) -> None:
        # Serves until the process exits, also while the session shuts down: a late EMERGENCY
        # STOP gets an answer rather than a timeout (which would kill a child mid-flush).
        while True:
            try:
                if not self.cmd.poll(PARENT_CHECK_S):
                    if os.getppid() != self.parent_pid:
                        self.request_stop("console process gone")
                        return
                    continue
                cid, name, args, kwargs = self.cmd.recv()
            except (EOFError, OSError):
                self.request_stop("console connection closed")
                return
            try:
                value = self._execute(name, args, kwargs)
                reply = (cid, True, value, local_clock())
            except ControlError as exc:
                reply = (cid, False, ("ControlError", str(exc)), local_clock())
            except Exception as exc:  # reported to the caller, never fatal to the session
                reply = (cid, False, (type(exc).__name__, str(exc)), local_clock())
            try:
                self.cmd.send(reply)
            except OSError:
                self.request_stop("console connection closed")
                return

    def _execute(self, name: str, args: tuple, kwargs: dict) -> Any:
        s = self.session
        if name == "stop":
            self.request_stop(*args)
            return None
        if name == "probe":  # the child's own view, for tests and diagnostics
            snap = s.snapshot()
            return {
                "interlock": snap.interlock if snap.ready else None,
                "reason": snap.interlock_reason,
                "locked_out": snap.locked_out,
                "thresholds": snap.thresholds if snap.ready else None,
                "pulse_count": snap.pulse_count,
                "folder": snap.folder,
                "pid": os.getpid(),
            }
        if name not in CHILD_COMMANDS:
            raise ControlError(f"unknown command {name!r}")
        return getattr(s, name)(*args, **kwargs)


def _plain(msg: tuple) -> tuple:
    """A message whose event payloads are reduced to str (when something does not pickle)."""
    if msg[0] != "events":
        return msg
    from closedloop.bus import Event

    out = []
    for ev in msg[1]:
        try:
            pickle.dumps(ev)
            out.append(ev)
        except Exception:
            payload = {
                k: v if isinstance(v, (int, float, str, bool)) else repr(v)
                for k, v in ev.payload.items()
            }
            out.append(Event(ev.kind, payload, ev.t_stream, ev.t_local))
    return ("events", out)


# ============================================================================ console side
_GUI_PROCESS: dict[str, Any] = {"spawner": None, "yielded": False}


def _spawner_thread() -> ThreadPoolExecutor:
    """One thread that starts every session process (created on first use, kept).

    A Linux thread and the processes it forks inherit its niceness: starting children from
    here keeps them at the priority this thread had when it was made.
    """
    if _GUI_PROCESS["spawner"] is None:
        spawner = ThreadPoolExecutor(1, thread_name_prefix="closedloop-spawner")
        spawner.submit(int).result()  # make the thread now, before any nice
        _GUI_PROCESS["spawner"] = spawner
    return _GUI_PROCESS["spawner"]


def yield_cpu_to_sessions(nice: int = GUI_NICE) -> bool:
    """Lower the calling (GUI) thread's priority by `nice`; session processes keep theirs.

    Linux only (elsewhere niceness is per process and would slow the session too). Once per
    process: a nice cannot be undone without privileges. Returns True if applied.
    """
    if _GUI_PROCESS["yielded"] or not sys.platform.startswith("linux") or nice <= 0:
        return False
    _spawner_thread()
    try:
        os.nice(nice)  # Linux: this thread only
    except OSError:
        return False
    _GUI_PROCESS["yielded"] = True
    return True


class _AttachedMemory(shared_memory.SharedMemory):
    """The console's mapping of the child's scope buffer.

    numpy views keep the mapping alive after the window lets go of the runner; closing then
    would raise BufferError, so the mapping goes with the last view instead.
    """

    def __del__(self) -> None:
        with contextlib.suppress(BufferError):
            self.close()


class SessionProxy:
    """The window's SessionControl: each call is one request / reply to the child.

    Raises ControlError when the child refuses, fails, or does not answer within the timeout.
    `folder` is the session folder once the child made it. `last_command_ms`: (name, call ->
    effect in the child, full round trip) of the newest command, ms.
    """

    def __init__(self, runner: ProcessRunner) -> None:
        self._runner = runner
        self.folder: Path | None = None
        self.last_command_ms: tuple[str, float, float] = ("", float("nan"), float("nan"))

    def arm(self, action: str, operator: str = "") -> None:
        self._runner.call("arm", action, operator=operator)

    def disarm(self, reason: str) -> None:
        self._runner.call("disarm", reason)

    def emergency_stop(self, source: str) -> None:
        """Disarm in the child; if it does not confirm within ESTOP_TIMEOUT_S, kill it."""
        if not self._runner.running:
            raise ControlError("the session process is not running: nothing can fire")
        try:
            self._runner.call("emergency_stop", source, timeout_s=ESTOP_TIMEOUT_S)
        except ControlError as exc:
            self._runner.kill(f"emergency stop not confirmed ({exc})")
            raise ControlError(
                f"emergency stop not confirmed by the session process ({exc}): it was killed"
            ) from exc

    def set_thresholds(self, enter: float, leave: float, source: str) -> None:
        self._runner.call("set_thresholds", float(enter), float(leave), source)

    def start_calibration(self, source: str) -> None:
        self._runner.call("start_calibration", source)

    def stop_calibration(self, source: str) -> None:
        self._runner.call("stop_calibration", source)

    def thresholds(self) -> tuple[float, float]:
        return tuple(self._runner.call("thresholds"))

    def stop(self, reason: str = "stop requested") -> None:
        self._runner.call("stop", reason)

    def probe(self) -> dict[str, Any]:
        """The child's interlock state, reason, thresholds, pulse count, folder, pid."""
        return self._runner.call("probe")


class _Inbox:
    """`subscription.drain()` for the window: reads the pipe, returns the events received."""

    def __init__(self, runner: ProcessRunner) -> None:
        self._runner = runner
        self.events: list = []

    def drain(self) -> list:
        self._runner.poll()
        out, self.events = self.events, []
        return out

    @property
    def dropped(self) -> int:
        return self._runner.events_dropped


class ProcessRunner:
    """One session in a child process; the same interface as gui.runner.SessionRunner.

    config: the session config. source: which stream (SourceSpec; None = the config's).
    out_root: where the session folder goes. arm_action: arm after calibration (demo).
    """

    def __init__(
        self,
        config: SessionConfig,
        source: SourceSpec | None = None,
        *,
        out_root: Path | None = None,
        arm_action: str | None = None,
        live: bool = True,
        command_timeout_s: float = COMMAND_TIMEOUT_S,
    ) -> None:
        if source is not None and not isinstance(source, SourceSpec):
            raise TypeError(
                "ProcessRunner opens its stream in the child: pass a SourceSpec "
                "(use gui.runner.SessionRunner for a source object)"
            )
        ctx = mp.get_context(START_METHOD)
        self._cmd, child_cmd = ctx.Pipe(duplex=True)
        self._in, child_out = ctx.Pipe(duplex=False)
        self._child_ends = (child_cmd, child_out)
        self._proc = ctx.Process(
            target=child_main,
            args=(
                child_cmd,
                child_out,
                config,
                source,
                str(out_root) if out_root is not None else None,
                arm_action,
                live,
                os.getpid(),
            ),
            name="closedloop-session",
            daemon=False,  # never terminated by multiprocessing at exit: it ends itself cleanly
        )
        self.command_timeout_s = command_timeout_s
        self.session = SessionProxy(self)
        self.subscription = _Inbox(self)
        self.scope: Scope | None = None
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.error_text = ""
        self.error_traceback = ""
        self.events_dropped = 0
        self._snapshot = SessionSnapshot()
        self._latency = np.zeros(0)
        self._ready = False
        self._final = False
        self._in_closed = False
        self._shm: _AttachedMemory | None = None
        self._shm_released = False
        self._cmd_lock = threading.Lock()
        self._next_id = 0

    def start(self) -> ProcessRunner:
        _spawner_thread().submit(self._proc.start).result()
        for end in self._child_ends:  # only the child holds them now: EOF means it is gone
            end.close()
        self._child_ends = ()
        return self

    # ---- state ------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.is_alive()

    @property
    def started(self) -> bool:
        return self._proc.pid is not None

    @property
    def ready(self) -> bool:
        """The child's pipeline exists."""
        return self._ready and self.running

    def snapshot(self) -> SessionSnapshot:
        self.poll()
        return self._snapshot

    def latency_samples(self) -> np.ndarray:
        """The child's recent decision latencies (ms), as of its last report (<= 0.5 s old)."""
        self.poll()
        return self._latency.astype(float)

    # ---- the event pipe -----------------------------------------------------------------
    def poll(self) -> None:
        """Take everything the child sent; notice when it is gone (GUI thread, non-blocking)."""
        while not self._in_closed:
            try:
                if not self._in.poll():
                    break
                msgs = self._in.recv()
            except (EOFError, OSError):
                self._in_closed = True
                break
            for msg in msgs:
                self._handle(msg)
        if self._in_closed and not self._final and self.error is None and self.started:
            self._proc.join(1.0)
            self._fail(f"session process died without a report ({_exit_text(self._proc)})")
        if self._in_closed and self._shm is not None and not self._shm_released:
            self._release_shm()

    def _release_shm(self) -> None:
        """The child is gone: remove its scope segment from /dev/shm unless it did so itself.

        A child that ended cleanly unlinked it already (FileNotFoundError here); one killed
        (SIGKILL, OOM) could not, and the resource tracker would only do it when the console
        exits. Unlinking removes the name; the mapping the window reads stays valid.
        """
        if self._proc.is_alive():  # pipe closed but still running: it unlinks at its end
            return
        self._shm_released = True
        with contextlib.suppress(FileNotFoundError):
            self._shm.unlink()

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "events":
            self.subscription.events.extend(msg[1])
        elif kind == "status":
            _, self._snapshot, self.events_dropped = msg
            self._ready = self._snapshot.ready
            if self._snapshot.folder:
                self.session.folder = Path(self._snapshot.folder)
        elif kind == "latency":
            self._latency = msg[1]
        elif kind == "scope":
            _, name, ch_names, sfreq, feats, seconds = msg
            self._shm = _AttachedMemory(name=name)
            self.scope = Scope(ch_names, sfreq, feats, seconds, buffer=self._shm.buf, init=False)
        elif kind == "final":
            _, self.summary, error_text, tb, lat = msg
            self._final = True
            if lat.size:
                self._latency = lat
            if error_text:
                self.error_traceback = tb
                self._fail(error_text)

    def _fail(self, text: str) -> None:
        self.error_text = text
        self.error = SessionProcessError(text)

    # ---- commands ---------------------------------------------------------------------
    def call(self, name: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Run a SessionControl method in the child and return its result (ControlError)."""
        timeout_s = self.command_timeout_s if timeout_s is None else timeout_s
        with self._cmd_lock:
            if not self.running:
                raise ControlError("the session process is not running")
            self._next_id += 1
            cid = self._next_id
            t0 = local_clock()
            try:
                self._cmd.send((cid, name, args, kwargs))
                deadline = time.monotonic() + timeout_s
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cmd.poll(left):
                        raise ControlError(
                            f"the session process did not answer '{name}' within {timeout_s:g} s"
                        )
                    rid, ok, value, t_done = self._cmd.recv()
                    if rid == cid:  # older replies belong to calls that timed out
                        break
            except (EOFError, OSError) as exc:
                raise ControlError(f"the session process is gone ({exc})") from exc
            t1 = local_clock()
        if name != "probe":  # diagnostics do not hide the last operator command's figures
            self.session.last_command_ms = (name, 1e3 * (t_done - t0), 1e3 * (t1 - t0))
        if ok:
            return value
        kind, text = value
        if kind == "ControlError":
            raise ControlError(text)
        raise ControlError(f"{kind} in the session process: {text}")

    def stop(self, reason: str, timeout_s: float = 20.0) -> bool:
        """Disarm, ask the child to end, wait for its folder to be complete; True if it ended."""
        if not self.started:
            return True
        if self.running:
            # it may be ending or gone already; either way wait for it below
            with contextlib.suppress(ControlError):
                self.call("stop", reason, timeout_s=min(timeout_s, self.command_timeout_s))
        deadline = time.monotonic() + timeout_s
        while self._proc.is_alive() and time.monotonic() < deadline:
            self.poll()  # keep the pipe flowing so the child's final report gets through
            self._proc.join(0.02)
        self.poll()
        return not self._proc.is_alive()

    def kill(self, why: str) -> None:
        """SIGKILL the child (an emergency stop it did not confirm)."""
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)
            self._fail(f"session process killed: {why}")

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the child to end by itself (polling the pipe); True if it ended."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._proc.is_alive() and (deadline is None or time.monotonic() < deadline):
            self.poll()
            self._proc.join(0.05)
        self.poll()
        return not self._proc.is_alive()


def _exit_text(proc: mp.process.BaseProcess) -> str:
    code = proc.exitcode
    if code is None:
        return "still running, pipe closed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
