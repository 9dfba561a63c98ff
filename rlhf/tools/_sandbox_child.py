"""The child side of the Python sandbox: `sandbox.run_python` passes this file's text to
`python -I -S -B -u -c <text> <sandbox dir> <files>`; importing it runs nothing.

It installs a PEP 578 audit hook before running the tool's code (`<sandbox dir>/main.py`). Python
code cannot remove an audit hook, and the hook keeps its state in closure cells that nothing the
tool's code can reach holds (no module global, `gc.get_objects` refused). On a refused operation
the hook names it on stderr and ends the process with an exit status the parent reads as a
one-line reason, so `try: ... except` in the tool's code cannot swallow the refusal.

The hook is one layer of several (see sandbox.py): the parent also sets rlimits, empties the
environment, installs a seccomp filter against making processes, takes away root's capabilities
and network, drops root to `nobody` where the interpreter allows it, and kills the whole process
group when the run ends. C code could step around an audit hook, which is why ctypes is refused
and `-S` keeps site-packages (and their extension modules) off the path; the standard library's
`_posixsubprocess`, which forks without an audit event, is refused on import, and where it is
built in and handed out by `_imp.create_builtin` anyway, the seccomp filter refuses its fork.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing costs ~20 ms of every run's start
if TYPE_CHECKING:
    from collections.abc import Callable

# Exit statuses the parent maps to reasons (sandbox.py); forging one only mislabels your own run.
EXIT_NETWORK = 201
EXIT_WRITE = 202
EXIT_READ = 203
EXIT_PROCESS = 204
EXIT_UNSAFE = 205
EXIT_MEMORY = 206
EXIT_FILE_SIZE = 207
EXIT_EXCEPTION = 208
EXIT_FILES = 209

_NETWORK_EVENTS = frozenset({
    "socket.__new__", "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg",
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostname", "socket.sethostname",
})
_PROCESS_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
    "os.kill", "os.killpg", "signal.pthread_kill", "resource.prlimit",
})
# Ways to reach around the hook or undo the parent's limits (root may raise its own rlimits).
_UNSAFE_EVENTS = frozenset({
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "gc.get_objects",
    "gc.get_referrers", "gc.get_referents", "resource.setrlimit", "sys._current_frames", "os.setns", "os.unshare",
    "fcntl.ioctl",  # e.g. marking a file immutable (as root) so that the sandbox dir cannot be deleted
})
# _posixsubprocess.fork_exec raises no audit event of its own, so its import is the place to stop it.
_FORBIDDEN_IMPORTS = (("_posixsubprocess", EXIT_PROCESS), ("_ctypes", EXIT_UNSAFE), ("ctypes", EXIT_UNSAFE))
# Events whose str/bytes arguments are paths the tool would change.
_WRITE_EVENTS = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
    "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod", "shutil.chown",
})
# A link made inside the sandbox could point anywhere, and the hook checks paths by their text.
_LINK_EVENTS = frozenset({"os.symlink", "os.link"})
_LIST_EVENTS = frozenset({"os.listdir", "os.scandir"})
_DEVICES = ("/dev/null", "/dev/urandom")


def _normalize(path: str, cwd: str) -> str:
    """`path` made absolute and free of `.` and `..` by its text alone: os.path is the tool's to
    monkeypatch, str methods are not."""
    if not path.startswith("/"):
        path = cwd + "/" + path
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return "/" + "/".join(parts)


def _make_path_check() -> Callable[[object, tuple[str, ...]], bool]:
    """allowed(path, roots): whether a path an event names lies under one of `roots`."""
    import posix

    # Every name the check uses is bound here, so later monkeypatching by the tool changes nothing.
    getcwd, normalize, devices = posix.getcwd, _normalize, _DEVICES

    def allowed(path: object, roots: tuple[str, ...]) -> bool:
        if type(path) is int or path is None:  # an fd already open (every open was checked), or the cwd
            return True
        if type(path) is bytes:
            path = path.decode("utf-8", "surrogateescape")
        if type(path) is not str:  # events carry the path already converted; anything else fails closed
            return False
        full = normalize(path, getcwd())
        return full in devices or any(full == root or full.startswith(root + "/") for root in roots)

    return allowed


def _make_hook(sandbox: str, read_roots: tuple[str, ...], max_writes: int) -> Callable[[str, tuple], None]:
    import posix

    # As in _make_path_check: the hook reads nothing the tool's code could rebind.
    exit_, write, allowed = posix._exit, posix.write, _make_path_check()
    network, process, unsafe, forbidden = _NETWORK_EVENTS, _PROCESS_EVENTS, _UNSAFE_EVENTS, _FORBIDDEN_IMPORTS
    changes, links, listings = _WRITE_EVENTS, _LINK_EVENTS, _LIST_EVENTS
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND
    inside = (sandbox,)
    readable = (sandbox,) + read_roots
    writes = [0]  # opens for writing so far: with RLIMIT_FSIZE, a bound on the disk the code can fill

    def refuse(status: int, what: str) -> None:
        write(2, ("\nsandbox: refused " + what[:300] + "\n").encode("utf-8", "replace"))
        exit_(status)

    def hook(event: str, args: tuple) -> None:
        try:
            if event == "open":
                path, mode, flags = args
                writing = bool(flags & write_flags) if type(flags) is int else any(c in str(mode) for c in "wax+")
                # os.open (mode None) could take a dir_fd the text of the path does not show.
                if not allowed(path, inside if writing or mode is None else readable):
                    refuse(EXIT_WRITE if writing else EXIT_READ, f"open({path!r}, {mode!r})")
                if writing and type(path) is not int:
                    writes[0] += 1
                    if writes[0] > max_writes:
                        refuse(EXIT_FILES, f"open({path!r}, {mode!r}): over {max_writes} files written")
            elif event in listings:
                if not allowed(args[0], readable):
                    refuse(EXIT_READ, f"{event}({args[0]!r})")
            elif event in changes:
                for arg in args:
                    if type(arg) not in (int, type(None)) and not allowed(arg, inside):
                        refuse(EXIT_WRITE, f"{event}({arg!r})")
            elif event in links:
                refuse(EXIT_WRITE, f"{event}{args!r}")
            elif event in network:
                refuse(EXIT_NETWORK, event)
            elif event in process:
                refuse(EXIT_PROCESS, event)
            elif event in unsafe:
                refuse(EXIT_UNSAFE, event)
            elif event == "import":
                for name, status in forbidden:
                    if args[0] == name:
                        refuse(status, f"import {name}")
        except BaseException:  # a hook that fails open would be worse than one that fails closed
            exit_(EXIT_UNSAFE)

    return hook


def main() -> None:
    import builtins
    import posix

    sandbox, max_writes = sys.argv[1], int(sys.argv[2])
    read_roots = tuple(p for p in sys.path if p)  # the standard library, which imports must read
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        with open(sandbox + "/main.py", encoding="utf-8") as f:
            code = compile(f.read(), "main.py", "exec")
        sys.addaudithook(_make_hook(sandbox, read_roots, max_writes))
        exec(code, namespace)
    except MemoryError:
        posix.write(2, b"\nMemoryError\n")
        posix._exit(EXIT_MEMORY)
    except SystemExit:
        raise
    except BaseException as exc:
        if isinstance(exc, OSError) and exc.errno == 27:  # EFBIG: RLIMIT_FSIZE (Python ignores SIGXFSZ)
            posix._exit(EXIT_FILE_SIZE)
        import traceback

        # tb_next: the frame of this exec() is the sandbox's, not the tool's.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
        posix._exit(EXIT_EXCEPTION)


if __name__ == "__main__":
    main()
