"""What a run shows: kard-ray's own lines on the console, Ray's and the libraries' logs in `<run>/logs/`.

Quiet by default: a line per stage start/finish, one progress line per long stage (steps or rows, rate,
ETA; updated in place on a TTY, otherwise every `PROGRESS_EVERY_S` seconds and `PROGRESS_MIN_ADVANCE`
of the stage, e.g. under `ray job submit`), warnings and the results table. `--verbose` (env `KARD_VERBOSE=1`) puts Ray's worker output
and internal logs back on the console.

Training and evaluation run in other processes (Ray Train workers, Ray Data actors, maybe on other
nodes). Quiet, Ray does not forward their stdout (`log_to_driver=False`), so their lines travel through
a small relay actor that the driver drains; their own stdout/stderr stay in Ray's log files, which an
embedded run copies to `<run>/logs/ray/` when it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Optional

VERBOSE_ENV = "KARD_VERBOSE"
PROGRESS_EVERY_S = float(os.environ.get("KARD_PROGRESS_EVERY_S", "60"))
PROGRESS_MIN_ADVANCE = 0.2  # off a TTY a progress line also needs 20% more done: at most 6 lines a stage
_MAX_COPIED_LOG_BYTES = 50 << 20  # a Ray log file larger than this is left in the session directory


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def set_verbose(verbose: bool) -> None:
    """Through the environment, so Ray workers and job subprocesses started from here see it too."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


def fmt_duration(seconds: float) -> str:
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Console:
    """The driver's console: plain lines, and progress lines keyed by name (one live line per name)."""

    def __init__(self, stream=None, every_s: float = PROGRESS_EVERY_S, tty: Optional[bool] = None):
        self._stream, self._tty, self.every_s = stream, tty, every_s
        self._last: dict[str, tuple] = {}  # name -> (when its line was last printed, the fraction it showed)
        self._live = False  # a TTY progress line is on screen without its newline
        self._counts: dict[str, dict] = {}  # name -> items done, first start, last finish
        self._lock = threading.Lock()

    @property
    def stream(self):
        return self._stream or sys.stdout  # looked up when used: pytest's capture swaps sys.stdout

    @property
    def tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def say(self, text: str) -> None:
        with self._lock:
            self._end_live()
            self.stream.write(text + "\n")
            self.stream.flush()

    def progress(self, name: str, text: str, final: bool = False, fraction: Optional[float] = None) -> None:
        """A stage's progress line. Off a TTY it prints when `every_s` have passed since the stage's last
        line (or since its first report) and it has advanced `PROGRESS_MIN_ADVANCE` (of `fraction`, its
        share done), and always at the end: a few lines per stage however slow the machine."""
        with self._lock:
            now = time.monotonic()
            last_t, last_f = self._last.setdefault(name, (now, 0.0))
            if self.tty:
                self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
                self._live = not final
            elif final or is_verbose() or (now - last_t >= self.every_s
                                           and (fraction is None or fraction - last_f >= PROGRESS_MIN_ADVANCE - 1e-9)):
                self.stream.write(text + "\n")
            else:
                return
            self._last[name] = (now, fraction or 0.0)
            self.stream.flush()

    def count(self, name: str, n: int, total: int, unit: str, started: float, finished: float) -> None:
        """`n` more of `total` items of a stage done, in a batch that ran from `started` to `finished`
        (wall clock, in whichever process did it): a progress line with rate and ETA."""
        c = self._counts.setdefault(name, {"done": 0, "t0": started, "t1": finished})
        c["done"] += n
        c["t0"], c["t1"] = min(c["t0"], started), max(c["t1"], finished)
        done, total = c["done"], max(total, 1)
        rate = done / max(c["t1"] - c["t0"], 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        self.progress(name, f"[{name}] {done}/{total} {unit} ({100 * done / total:.0f}%) | {rate:.1f} {unit}/s"
                            f" | eta {fmt_duration(eta)}", final=done >= total, fraction=done / total)

    def reset(self) -> None:
        """A new run: no stage's progress carries over (a second run in one process counts from zero)."""
        with self._lock:
            self._last.clear()
            self._counts.clear()

    def _end_live(self) -> None:
        if self._live:
            self.stream.write("\n")
            self._live = False


_console = Console()


# ---------------------------------------------------------------------------- from any process
def say(text: str) -> None:
    """A line for the user, from the driver or from any Ray worker of this job."""
    _send(("say", text))


def progress(name: str, text: str, final: bool = False, fraction: Optional[float] = None) -> None:
    _send(("progress", name, text, final, fraction))


def count(name: str, n: int, total: int, unit: str, started: float) -> None:
    """`n` of `total` items done by a batch that began at `started` (time.time()) and ends now."""
    _send(("count", name, n, total, unit, started, time.time()))


def _dispatch(msg: tuple) -> None:
    kind, *args = msg
    getattr(_console, kind)(*args)


def _in_ray_worker() -> bool:
    """A Ray worker process (task or actor), not a driver: its stdout is not the user's console."""
    try:
        import ray

        return ray.is_initialized() and ray._private.worker.global_worker.mode == ray.WORKER_MODE
    except Exception:
        return False


def _send(msg: tuple) -> None:
    if not _in_ray_worker():
        sess = _session[0]
        if sess is not None and threading.current_thread() is not sess._drainer:
            sess.drain()  # workers' lines sent before this one print before it
        _dispatch(msg)
        return
    if _relay_put(msg) or msg[0] == "count":
        return
    text = msg[1] if msg[0] == "say" else msg[2]
    sys.__stdout__.write(text + "\n")  # not print: Ray Train's patched print reaches the driver twice
    sys.__stdout__.flush()


def _relay_put(msg: tuple) -> bool:
    """Hand `msg` to this job's relay and wait for it to take it (a few ms; these lines are rare). A handle
    cached from a run that has ended fails: look the relay up again, once. False: no run's console."""
    import ray

    for attempt in range(2):
        relay = _relay_handle(fresh=attempt > 0)
        if relay is None:
            return False
        try:
            ray.get(relay.put.remote(msg), timeout=10)
            return True
        except Exception:  # the relay of an earlier run (killed when it ended), or unreachable
            continue
    return False


_relay_cache: dict = {"handle": None, "checked": -1e9}
_RELAY_TTL_S = 10.0  # a worker looks the relay up again after this (a run's relay ends with the run)


def _relay_name() -> str:
    import ray

    return f"kard_console_{ray.get_runtime_context().get_job_id()}"


def _relay_handle(fresh: bool = False):
    try:
        import ray

        if not ray.is_initialized():
            return None
        if fresh or time.monotonic() - _relay_cache["checked"] > _RELAY_TTL_S:
            _relay_cache["checked"], _relay_cache["handle"] = time.monotonic(), None
            _relay_cache["handle"] = ray.get_actor(_relay_name(), namespace="kard_ray")
    except Exception:  # no relay in this job: Ray forwards the worker's stdout, as for any worker
        return None
    return _relay_cache["handle"]


class _Relay:
    """Holds the workers' console messages until the driver takes them (in arrival order)."""

    def __init__(self):
        self.msgs: list = []

    def put(self, msg) -> None:
        self.msgs.append(msg)

    def take(self) -> list:
        msgs, self.msgs = self.msgs, []
        return msgs


# ---------------------------------------------------------------------------- the driver's session
_routing = [False]
_session: list = [None]

# Lines on the driver's stderr that are Ray's internals: its Python log format, its C++ (glog) format, and
# what its log monitor forwards from raylets and workers. Quiet, they go to driver.log only.
_INTERNAL_LINE = re.compile(
    rb"^(\x1b\[[0-9;]*m)*("
    rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\s+(TRACE|DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+:\d+ -- "
    rb"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] "
    rb"|\((raylet|gcs_server|autoscaler|monitor|[\w.<>()-]+ pid=\d+)[^)]*\)(\x1b\[[0-9;]*m)* )")


def routing_active() -> bool:
    """Whether a run's session files Ray's console output (then Ray may log at INFO)."""
    return _routing[0]


class session:
    """The driver's console for one run, as a context manager.

    The driver's stderr (file descriptor 2: Ray's Python and C++ logs and what its log monitor forwards)
    is copied to `<logs_dir>/driver.log`; quiet, only lines that are not Ray's internals reach the
    console. Library warnings go to the same file. `start_relay()`, once Ray is up, drains the workers'
    lines onto the console. At the end an embedded Ray's log files are copied to `<logs_dir>/ray/`.
    `upload_to`: the run's URI logs directory, when `logs_dir` is a local staging copy."""

    def __init__(self, logs_dir: str, upload_to: Optional[str] = None):
        self.logs_dir, self.upload_to = logs_dir, upload_to
        self.relay, self._stop, self._drainer, self._undo = None, threading.Event(), None, []
        self.keep_ray_logs = False  # set when this process started Ray: its log files are the run's to keep

    def __enter__(self) -> "session":
        os.makedirs(self.logs_dir, exist_ok=True)
        if not is_verbose():
            _no_progress_bars()
        log = open(os.path.join(self.logs_dir, "driver.log"), "ab", buffering=0)
        self._undo.append(log.close)
        self._undo.append(_file_warnings(log))
        self._undo.append(_filter_stderr(log, quiet=not is_verbose()))
        self._undo.append(_file_ray_messages(log, quiet=not is_verbose()))
        self._undo.append(_file_stdout_loggers(log, quiet=not is_verbose()))
        _console.reset()
        _routing[0], _session[0] = True, self
        return self

    def start_relay(self) -> None:
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # On the driver's node: a worker node lost mid-run must not take the console with it.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self.relay = ray.remote(num_cpus=0)(_Relay).options(
            name=_relay_name(), namespace="kard_ray", get_if_exists=True, scheduling_strategy=here).remote()
        self._drainer = threading.Thread(target=self._drain_loop, daemon=True, name="kard-console")
        self._drainer.start()

    def drain(self) -> None:
        """Print the workers' lines that have arrived (before a line of the driver's own, so both keep order)."""
        import ray

        if self.relay is None:
            return
        try:
            for msg in ray.get(self.relay.take.remote(), timeout=10):
                _dispatch(msg)
        except Exception as e:  # the console must never fail a run
            logging.getLogger("kard_ray").debug("console relay: %r", e)

    def _drain_loop(self) -> None:
        while not self._stop.wait(0.5):
            self.drain()

    def __exit__(self, *exc) -> None:
        if self._drainer is not None:
            self._stop.set()
            self._drainer.join(timeout=15)
            self.drain()
            with contextlib.suppress(Exception):
                import ray

                ray.kill(self.relay)  # no one drains it after the run: workers fall back to their stdout
        if self.keep_ray_logs:
            _copy_ray_logs(os.path.join(self.logs_dir, "ray"))  # per Ray session: a rerun keeps both
        _routing[0], _session[0] = False, None
        for undo in reversed(self._undo):
            undo()
        if self.upload_to:
            from kard_ray import io

            io.upload_dir(self.logs_dir, self.upload_to)


def _no_progress_bars() -> None:
    """Library progress bars (transformers' "Loading weights", "Writing model shards") are not the run's."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is first imported
    if "transformers" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def _file_warnings(log):
    """Python warnings (a library's FutureWarning, ...) into the log file instead of stderr."""
    handler = _log_handler(log)
    pw = logging.getLogger("py.warnings")
    pw.addHandler(handler)
    pw.propagate = False
    logging.captureWarnings(True)

    def undo():
        logging.captureWarnings(False)
        pw.removeHandler(handler)
        pw.propagate = True

    return undo


# Libraries whose logger writes straight to stdout with a handler of its own (DeepSpeed, imported by
# transformers' save_pretrained through accelerate, warns "Setting accelerator to CPU" there).
_STDOUT_LOGGERS = ("DeepSpeed",)


def _log_handler(log) -> logging.Handler:
    """A logging handler that writes records to the run's log file (one format for all of them)."""
    handler = logging.StreamHandler(io_text(log))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


class _ToLog(logging.Filter):
    """On a logger: its records go to the run's log file, not to the logger's own (stdout) handlers.
    A logger filter, not a handler: it is in place before the library is imported and adds its handler."""

    def __init__(self, log):
        super().__init__()
        self.handler = _log_handler(log)

    def filter(self, record) -> bool:
        with contextlib.suppress(Exception):
            self.handler.handle(record)
        return False


def _file_stdout_loggers(log, quiet: bool):
    if not quiet:
        return lambda: None
    to_log = _ToLog(log)
    for name in _STDOUT_LOGGERS:
        logging.getLogger(name).addFilter(to_log)
    return lambda: [logging.getLogger(name).removeFilter(to_log) for name in _STDOUT_LOGGERS]


def _file_ray_messages(log, quiet: bool):
    """Messages the cluster pushes to the driver ("(raylet) WARNING: 8 PYTHON worker processes have been
    started ..."): Ray prints them on stdout, where they are not the user's. Quiet, they go to the log
    file (Ray 2.60's `print_to_stdstream`; left alone if a Ray version has no such function)."""
    try:
        import ray._private.worker as ray_worker

        original = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        return lambda: None
    if not quiet:
        return lambda: None

    def to_log(data, ignore_prefix=False):
        for line in data.get("lines", []):
            with contextlib.suppress(Exception):
                log.write(f"({data.get('pid')}) {line}\n".encode())

    ray_worker.print_to_stdstream = to_log
    return lambda: setattr(ray_worker, "print_to_stdstream", original)


def io_text(binary):
    import io as _io

    return _io.TextIOWrapper(binary, encoding="utf-8", write_through=True)


def _filter_stderr(log, quiet: bool):
    """Point fd 2 at a pipe; a thread copies every line to `log` and, unless it is Ray's internals (or
    not quiet), to the real stderr. Processes started meanwhile (an embedded Ray's raylet) may hold the
    pipe after the run, so the thread keeps pumping, unfiltered, once the run's session is over."""
    try:
        saved = os.dup(2)
    except OSError:  # no stderr descriptor (some notebook front ends): nothing to filter
        return lambda: None
    sys.stderr.flush()
    r, w = os.pipe()
    os.dup2(w, 2)
    os.close(w)
    state = {"log": log, "quiet": quiet}

    def pump():
        with os.fdopen(r, "rb", buffering=0) as pipe:
            pending = b""
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    return
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    _route_line(line + b"\n", state, saved)

    threading.Thread(target=pump, daemon=True, name="kard-stderr").start()

    def undo():
        sys.stderr.flush()
        time.sleep(0.2)  # let the pump take what is already in the pipe
        state["log"], state["quiet"] = None, False
        os.dup2(saved, 2)

    return undo


def _route_line(line: bytes, state: dict, saved: int) -> None:
    log = state["log"]
    if log is not None:
        with contextlib.suppress(Exception):
            log.write(line)
    if not (state["quiet"] and _INTERNAL_LINE.match(line)):
        with contextlib.suppress(OSError):
            os.write(saved, line)


def _copy_ray_logs(dest: str) -> None:
    """Ray's log files of this (embedded) session: raylet, GCS, and every worker's stdout/stderr."""
    try:
        import ray

        src = ray._private.worker._global_node.get_logs_dir_path()
    except Exception:
        return
    dest = os.path.join(dest, os.path.basename(os.path.dirname(src)))  # session_<date>_<pid>
    for root, _, files in os.walk(src):
        for f in files:
            p = os.path.join(root, f)
            if not f.endswith((".out", ".err", ".log")) or os.path.getsize(p) > _MAX_COPIED_LOG_BYTES:
                continue
            out = os.path.join(dest, os.path.relpath(p, src))
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with contextlib.suppress(OSError):
                shutil.copyfile(p, out)


def staging_dir() -> str:
    return tempfile.mkdtemp(prefix="kard_logs_")
