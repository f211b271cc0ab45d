"""What the system tests ask of the processes they start."""

import psutil


def gone(p: psutil.Process) -> bool:
    """Exited: no such process, or nothing left of it but its exit status."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def engine_core(front_end_pid: int) -> psutil.Process:
    """The engine core: the one multiprocessing child of an engine worker."""
    front = psutil.Process(front_end_pid)
    cores = [c for c in front.children() if "spawn_main" in " ".join(c.cmdline())
             and "resource_tracker" not in " ".join(c.cmdline())]
    assert len(cores) == 1, [c.cmdline() for c in front.children()]
    return cores[0]
