"""The in-sandbox executor: a warm interpreter that runs code sent over a pipe.

It runs inside the sandbox (bubblewrap namespace or container), as the only long-lived process
there besides the namespace's init, and speaks length-prefixed JSON frames on its stdin/stdout.
Frames are 4-byte lengths followed by ``marshal`` (format 4: plain dicts, str, bytes, numbers),
which needs no import; the runner imports only C modules up front so a cold sandbox starts fast.
Each ``run`` forks a child that applies the rlimits, runs the code in the private workdir and is
killed at the wall-clock deadline; afterwards every other process in the pid namespace is killed,
so nothing outlives the call. A ``session`` keeps one child interpreter (its globals) and the
workdir between calls. Standard library only: the host sends this file's source as ``python -c``.
"""

import marshal
import os
import resource
import select
import struct
import sys
import time

WORKDIR = os.environ.get("MILES_SANDBOX_WORKDIR", "/work")
SCRATCH_DIRS = (WORKDIR, "/tmp")
HEADER = struct.Struct(">I")
MEMORY_ERROR_EXIT = 137
MARSHAL_VERSION = 4
SIGKILL = 9  # the signal module costs an enum import; these numbers are the same on every Linux
SIGPIPE = 13
SESSION_LOST = "\n[sandbox] the session interpreter was killed; its variables are lost, files are kept\n"


# -- framing ---------------------------------------------------------------------------------------
def read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd):
    (size,) = HEADER.unpack(read_exact(fd, HEADER.size))
    return marshal.loads(read_exact(fd, size))


def write_frame(fd, obj):
    data = marshal.dumps(obj, MARSHAL_VERSION)
    data = HEADER.pack(len(data)) + data
    while data:
        data = data[os.write(fd, data):]


# -- limits and cleanup ----------------------------------------------------------------------------
def apply_rlimits(limits):
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.get("memory_mb"):
        resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] * mb,) * 2)
    if limits.get("cpu_s"):
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime + limits["cpu_s"]) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    if limits.get("file_mb"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_mb"] * mb,) * 2)
    if limits.get("pids") and limits.get("pids_rlimit", True):
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["pids"],) * 2)


def other_pids(keep):
    mine = {1, os.getpid()} | set(keep)
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in mine]


def reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def kill_strays(keep=()):
    """SIGKILL every process of the namespace but init, this runner and ``keep``; wait till gone."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        if not keep:
            try:
                os.kill(-1, SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for pid in other_pids(keep):
                try:
                    os.kill(pid, SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        reap()
        if not [pid for pid in other_pids(keep) if not is_zombie(pid)]:
            return
        time.sleep(0.005)


def is_zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wipe_scratch():
    for top in SCRATCH_DIRS:
        if not os.path.isdir(top):
            continue
        for name in os.listdir(top):
            path = os.path.join(top, name)
            if os.path.isdir(path) and not os.path.islink(path):
                import shutil

                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def write_files(files):
    for name, spec in files.items():
        rel = os.path.normpath(name)
        if os.path.isabs(rel) or rel.split(os.sep)[0] == "..":
            raise ValueError("file path %r leaves the workdir; use a relative path" % name)
        path = os.path.join(WORKDIR, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.islink(path):
            os.unlink(path)
        with open(path, "wb") as f:
            f.write(spec)


# -- executing code in a child ---------------------------------------------------------------------
def execute_python(code, namespace):
    """Run ``code`` like ``python -c`` would; return the exit code and whether memory ran out."""
    try:
        exec(compile(code, "<sandbox>", "exec"), namespace)
        return 0, False
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0, False
        if isinstance(code, int):
            return code & 0xFF, False
        sys.stderr.write(str(code) + "\n")
        return 1, False
    except MemoryError:
        sys.stderr.write("MemoryError: the sandbox memory limit was reached\n")
        return MEMORY_ERROR_EXIT, True
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1, False
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass


def attach_stdio(fds):
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    sys.stdin = os.fdopen(0, "r", closefd=False)
    sys.stdout = os.fdopen(1, "w", closefd=False)
    sys.stderr = os.fdopen(2, "w", closefd=False)


def fresh_namespace():
    return {"__name__": "__main__", "__builtins__": __builtins__}


def child_main(request, stdio, host_fds):
    """In the forked child: limits, stdio, then the code. Never returns."""
    try:
        for fd in host_fds:
            os.close(fd)
        os.setsid()
        os.chdir(WORKDIR)
        attach_stdio(stdio)
        for fd in stdio:
            os.close(fd)
        apply_rlimits(request["limits"])
        sys.argv = ["-c"]
        if request["language"] == "bash":
            import signal

            signal.signal(SIGPIPE, signal.SIG_DFL)  # a shell expects the default, Python ignores it
            os.execv("/bin/bash", ["bash", "-c", request["code"]])
        status, _ = execute_python(request["code"], fresh_namespace())
        os._exit(status)
    except MemoryError:
        os._exit(MEMORY_ERROR_EXIT)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(126)


def session_main(channel, host_fds, limits):
    import socket

    """In the session child: run each received piece of code in one persistent namespace."""
    for fd in host_fds:
        os.close(fd)
    os.setsid()
    os.chdir(WORKDIR)
    apply_rlimits(dict(limits, cpu_s=None))
    namespace = fresh_namespace()
    devnull = os.open(os.devnull, os.O_RDWR)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 1 << 24, 3)
        except OSError:
            os._exit(0)
        if not message:
            os._exit(0)
        request = marshal.loads(message)
        attach_stdio(fds)
        for fd in fds:
            os.close(fd)
        apply_rlimits({"cpu_s": request["limits"].get("cpu_s")})
        status, oom = execute_python(request["code"], namespace)
        attach_stdio((devnull,) * 3)
        channel.sendall(marshal.dumps({"exit_code": status, "oom": oom}, MARSHAL_VERSION))


class OutputCollector:
    """Drains the child's stdout/stderr, keeping at most ``limit`` bytes of each."""

    def __init__(self, stdout_fd, stderr_fd, limit):
        self.limit = limit
        self.data = {stdout_fd: bytearray(), stderr_fd: bytearray()}
        self.names = {stdout_fd: "stdout", stderr_fd: "stderr"}
        self.live = set(self.data)
        self.truncated = False
        self.epoll = select.epoll()
        self.done_fd = None
        for fd in self.data:
            os.set_blocking(fd, False)
            self.epoll.register(fd, select.EPOLLIN)

    @property
    def open(self):
        return bool(self.live)

    def watch_done(self, fd):
        """Also wake up when ``fd`` (a pidfd or the session channel) becomes readable."""
        self.done_fd = fd
        self.epoll.register(fd, select.EPOLLIN)

    def unwatch_done(self):
        if self.done_fd is not None:
            self.epoll.unregister(self.done_fd)
            self.done_fd = None

    def poll(self, timeout):
        """Read what is ready; return True when the watched fd is readable."""
        done = False
        for fd, _ in self.epoll.poll(max(timeout, 0)):
            if fd == self.done_fd:
                done = True
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                self.epoll.unregister(fd)
                self.live.discard(fd)
                os.close(fd)
                continue
            buf = self.data[fd]
            room = self.limit - len(buf)
            if len(chunk) > room:
                self.truncated = True
            buf += chunk[: max(room, 0)]
        return done

    def close(self):
        for fd in self.live:
            os.close(fd)
        self.live.clear()
        self.epoll.close()

    def result(self):
        out = {self.names[fd]: bytes(buf).decode("utf-8", "replace") for fd, buf in self.data.items()}
        out["output_truncated"] = self.truncated
        return out


def feed_stdin(fd, data):
    import threading

    def write():
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            pass
        finally:
            os.close(fd)

    if data:
        threading.Thread(target=write, daemon=True).start()
    else:
        os.close(fd)


class Runner:
    def __init__(self, host_in, host_out):
        self.host_fds = (host_in, host_out)
        self.session_pid = None
        self.session_channel = None

    # -- ops ---------------------------------------------------------------------------------------
    def op_ping(self, request):
        return {"ok": True, "pid": os.getpid()}

    def op_reset(self, request):
        self.stop_session()
        kill_strays()
        wipe_scratch()
        return {"ok": True}

    def op_run(self, request):
        if request.get("files"):
            write_files(request["files"])
        keep_files = request.get("session", False)
        session = keep_files and request["language"] == "python"
        if session:
            self.ensure_session(request["limits"])
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        started = time.monotonic()
        if session:
            pid = self.session_pid
            import socket

            payload = marshal.dumps(request, MARSHAL_VERSION)
            socket.send_fds(self.session_channel, [payload], [stdin_r, out_w, err_w])
        else:
            pid = os.fork()
            if pid == 0:
                os.close(stdin_w)
                os.close(out_r)
                os.close(err_r)
                child_main(request, (stdin_r, out_w, err_w), self.host_fds)
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
        feed_stdin(stdin_w, request.get("stdin", "").encode())
        collector = OutputCollector(out_r, err_r, request["limits"].get("output_kb", 64) * 1024)
        deadline = started + request["timeout"]
        status = self.wait(pid, session, collector, deadline)
        timed_out = status is None
        if timed_out and session:
            self.stop_session()
        elif timed_out:
            os.kill(pid, SIGKILL)
            os.waitpid(pid, 0)
        kill_strays(keep=[self.session_pid] if self.session_pid else ())
        end = time.monotonic() + 0.5
        while collector.open and time.monotonic() < end:
            collector.poll(end - time.monotonic())
        collector.close()
        if not keep_files:
            wipe_scratch()
        result = collector.result()
        result["duration"] = time.monotonic() - started
        result["timed_out"] = timed_out
        if timed_out:
            result.update(exit_code=-SIGKILL, oom_killed=False)
            if session:
                result["stderr"] += SESSION_LOST
        else:
            result["stderr"] += status.pop("stderr_note", "")
            result.update(status)
        return result

    def wait(self, pid, session, collector, deadline):
        """Collect output until the child finishes; None on timeout, else exit_code/oom_killed."""
        if session:
            collector.watch_done(self.session_channel.fileno())
        else:
            pidfd = os.pidfd_open(pid)
            collector.watch_done(pidfd)
        try:
            while time.monotonic() < deadline:
                if collector.poll(deadline - time.monotonic()):
                    return self.session_reply(pid) if session else decode_status(os.waitpid(pid, 0)[1])
            return None
        finally:
            collector.unwatch_done()
            if not session:
                os.close(pidfd)

    def session_reply(self, pid):
        reply = self.session_channel.recv(65536)
        if not reply:  # the interpreter died (killed by the OOM killer or by its own code)
            status = decode_status(os.waitpid(pid, 0)[1])
            status["stderr_note"] = SESSION_LOST
            self.stop_session()
            return status
        reply = marshal.loads(reply)
        return {"exit_code": reply["exit_code"], "oom_killed": reply["oom"]}

    def ensure_session(self, limits):
        if self.session_pid is not None:
            return self.session_pid
        import socket

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            mine.close()
            try:
                session_main(theirs, self.host_fds, limits)
            finally:
                os._exit(1)
        theirs.close()
        self.session_pid, self.session_channel = pid, mine
        return pid

    def stop_session(self):
        if self.session_pid is not None:
            try:
                os.kill(self.session_pid, SIGKILL)
                os.waitpid(self.session_pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        if self.session_channel is not None:
            self.session_channel.close()
        self.session_pid = self.session_channel = None

    def serve(self):
        host_in, host_out = self.host_fds
        write_frame(host_out, {"ready": True, "pid": os.getpid()})
        while True:
            try:
                request = read_frame(host_in)
            except EOFError:
                return
            try:
                reply = getattr(self, "op_" + request["op"])(request)
            except Exception as e:
                reply = {"error": "%s: %s" % (type(e).__name__, e)}
            write_frame(host_out, reply)


def decode_status(wait_status):
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        # Nothing in the sandbox but the kernel's OOM killer sends SIGKILL to a child that is
        # still within its deadline.
        return {"exit_code": -sig, "oom_killed": sig == SIGKILL}
    code = os.WEXITSTATUS(wait_status)
    return {"exit_code": code, "oom_killed": code == MEMORY_ERROR_EXIT}


def main():
    # Keep the host channel off fds 0-2 so children can have their own stdio there.
    host_in, host_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.makedirs(WORKDIR, exist_ok=True)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: children cannot ptrace us
    except Exception:
        pass
    Runner(host_in, host_out).serve()


if __name__ == "__main__":
    main()
