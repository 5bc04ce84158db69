"""Processes and OS accounting for the benchmark: start, bound and kill children; ports; CPU
time and resident memory of a process; CPU usage of other processes on a set of CPUs."""
import ctypes
import os
import signal
import socket
import subprocess
import time

TICK = os.sysconf("SC_CLK_TCK")
CHILDREN = []  # every long-lived process started, killed on exit
STARTUP_DEADLINE = 20.0


def kill(p):
    """SIGKILL the process and its whole process group (anything it forked)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass
    if p.poll() is None:
        try:
            p.kill()
        except OSError:
            pass


def kill_all():
    for p in CHILDREN:
        kill(p)
    for p in CHILDREN:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    CHILDREN.clear()


def preexec(cpus):
    """In the child: die with us (even on SIGKILL), optionally pinned to `cpus`."""
    libc = ctypes.CDLL(None, use_errno=True)

    def f():
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)
    return f


def spawn(args, cpus, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL):
    p = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=stderr,
                         preexec_fn=preexec(cpus), start_new_session=True)
    CHILDREN.append(p)
    return p


def stop(p):
    kill(p)
    p.wait(timeout=10)
    if p in CHILDREN:
        CHILDREN.remove(p)


def run_bounded(args, cpus, seconds):
    """A load generator run: bounded by its own duration flag and by a hard timeout."""
    r = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=seconds + 30, preexec_fn=preexec(cpus))
    if r.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, err_file=None):
    end = time.monotonic() + STARTUP_DEADLINE
    while time.monotonic() < end:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    tail = ""
    if err_file and os.path.exists(err_file):
        with open(err_file, errors="replace") as f:
            tail = f.read()[-2000:]
    state = f"exited with {proc.returncode}" if proc.poll() is not None else "still not listening"
    raise RuntimeError(f"{what}: port {port} never accepted within {STARTUP_DEADLINE:.0f}s ({state})\n{tail}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, fields 14 and 15


def cpu_stat(cpus):
    """(total, busy, irq+softirq) ticks of the given CPUs, from /proc/stat."""
    total = busy = irq = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cpus:
                v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(v)
                busy += sum(v) - v[3] - v[4]
                irq += v[5] + v[6]
    return total, busy, irq


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def settled_rss_mb(pid, deadline=2.0):
    """VmRSS once it stops moving (two samples 0.1 s apart within 1%), at most `deadline` s."""
    end = time.monotonic() + deadline
    prev = rss_mb(pid)
    while time.monotonic() < end:
        time.sleep(0.1)
        cur = rss_mb(pid)
        if abs(cur - prev) <= 0.01 * prev:
            return cur
        prev = cur
    return prev


def cmd_out(args):
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=20)
        return (r.stdout + r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
