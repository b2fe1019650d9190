"""Run ``offseg train`` and SIGKILL it at the N-th file-system write of one checkpoint save (a test helper).

Environment: ``KILL_IN`` (a path fragment, e.g. ``checkpoint-4``), ``KILL_AT`` (1-based index of the write
event to die at, 0 = never; or ``before:NAME``, the first write of a file named NAME; or ``rename``, the first
rename), ``KILL_SIGNAL`` (``SIGKILL``, default, to this process; ``SIGINT`` to the
whole process group, as Ctrl-C in a terminal does) and optionally ``KILL_LOG`` (a file that receives every
counted event). With ``FILL_FILE`` set, the process is not killed at that event: it fills the file system of
``FILL_FILE`` by writing that file until the disk is full (another program taking the space during a save).
Counted events are Python's audit events for opening a file for writing, renames and tree removals whose
path contains ``KILL_IN``: the process dies just before that write, i.e. between two files of the save.
"""

import os
import signal
import sys

FRAGMENT = os.environ["KILL_IN"]
TARGET = os.environ.get("KILL_AT", "0")
LOG = os.environ.get("KILL_LOG")
SIGNAL = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))
FILL = os.environ.get("FILL_FILE")
_count = 0


def _fill_disk(path: str) -> None:
    block = b"\0" * 4096
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError:  # ENOSPC: the file system is full
            pass


def _writing(args) -> bool:
    mode, flags = (args[1], args[2]) if len(args) > 2 else (args[1] if len(args) > 1 else None, 0)
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool(isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _hook(event, args):
    global _count
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)) and _writing(args):
        paths = [os.fsdecode(args[0])]
    elif event in ("os.rename", "shutil.rmtree", "os.remove"):
        paths = [os.fsdecode(a) for a in args if isinstance(a, (str, bytes, os.PathLike))]
    else:
        return
    if not any(FRAGMENT in p for p in paths):
        return
    _count += 1
    if LOG:
        with open(LOG, "a") as log:  # not counted: the log path does not contain FRAGMENT
            log.write(f"{_count} {event} {' '.join(paths)}\n")
    if TARGET.isdigit():
        hit = _count == int(TARGET)
    elif TARGET.startswith("before:"):
        hit = event == "open" and os.path.basename(paths[0]) == TARGET[len("before:"):]
    else:
        hit = TARGET == "rename" and event == "os.rename"
    if hit and FILL:
        _fill_disk(FILL)
    elif hit:
        if SIGNAL == signal.SIGKILL:
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            os.killpg(os.getpgid(0), SIGNAL)


sys.addaudithook(_hook)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from offseg_hf.cli import main  # noqa: E402

sys.exit(main(["train", *sys.argv[1:]]))
