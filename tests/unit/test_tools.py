"""Tools for multi-turn rollouts: the calculator against Python's own arithmetic, the sandbox
against planted escapes (each must be contained and named in one line), and the call format."""

from __future__ import annotations

import functools
import os
import random
import resource
import socket
import subprocess
import sys
import time
import uuid

import pytest

from rlhf.tools import _seccomp, sandbox
from rlhf.tools.calculator import MAX_INT_BITS, calculate
from rlhf.tools.registry import TOOLS, call_tool, parse_tool_call, render_observation
from rlhf.tools.sandbox import SandboxLimits, ToolResult, run_python

LIMITS = SandboxLimits(time_s=2, memory_mb=256)


# --- calculator ---------------------------------------------------------------------------------


def _random_expression(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        return str(rng.randint(0, 20)) if rng.random() < 0.7 else f"{rng.randint(0, 99) / 10}"
    if rng.random() < 0.1:
        return f"-({_random_expression(rng, depth - 1)})"
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
    right = str(rng.randint(0, 3)) if op == "**" else _random_expression(rng, depth - 1)
    return f"({_random_expression(rng, depth - 1)} {op} {right})"


def test_calculator_agrees_with_python_arithmetic_on_random_expressions() -> None:
    rng = random.Random(0)
    for _ in range(400):
        expression = _random_expression(rng, depth=3)
        try:
            expected = str(eval(expression, {"__builtins__": {}}))  # the oracle: CPython's own arithmetic
        except ZeroDivisionError:
            expected = "error: division by zero"
        assert calculate(expression) == expected, expression


@pytest.mark.parametrize(
    ("expression", "answer"),
    [("47+6", "53"), (" 7 / 2 ", "3.5"), ("-3**2", "-9"), ("2**-1", "0.5"), ("(1+2)*3", "9"), ("-7 % 3", "2"), ("10 // -3", "-4"),
     ("1_000 * 3", "3000"), ("+4", "4")],
)
def test_calculator_answers(expression: str, answer: str) -> None:
    assert calculate(expression) == answer


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("__import__('os').system('true')", "call is not allowed"),
        ("x + 1", "name is not allowed"),
        ("(1).real", "attribute is not allowed"),
        ("9**9**9", "result too large"),
        ("2**100000", "result too large"),
        (f"2**{MAX_INT_BITS} * 2", "result too large"),
        ("'a' * 3", "only numbers"),
        ("True + 1", "only numbers"),
        ("1j * 2", "only numbers"),
        ("2^3", "use ** for powers"),
        ("1e400", "result too large"),
        ("10.0 ** 400", "result too large"),
        ("2**4000 * 1.5", "too large for a float"),
        ("1/0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("[1, 2]", "list is not allowed"),
        ("1 < 2", "compare is not allowed"),
        ("1 +", "not an arithmetic expression"),
        ("", "empty expression"),
        ("1+" * 600 + "1", "longer than"),
    ],
)
def test_calculator_refuses_with_one_line_reason(expression: str, why: str) -> None:
    started = time.monotonic()
    answer = calculate(expression)
    assert time.monotonic() - started < 0.5  # refused from the sizes, not by computing
    assert answer.startswith("error: ") and why in answer and "\n" not in answer


# --- sandbox: what runs -------------------------------------------------------------------------


def test_sandbox_runs_code_in_a_temp_dir_it_removes() -> None:
    code = ("import os, json, math, fractions\nopen('notes.txt', 'w').write('kept')\n"
            "print(os.getcwd())\nprint(open('notes.txt').read(), math.comb(5, 2))")
    result = run_python(code, limits=LIMITS)
    assert result.ok and result.reason is None, result
    cwd, answer = result.output.splitlines()
    assert answer == "kept 10"
    assert os.path.basename(cwd).startswith("rlhf-sandbox-") and not os.path.exists(cwd)


def test_sandbox_names_an_exception_and_an_exit_status() -> None:
    assert run_python("1/0", limits=LIMITS).reason == "error: ZeroDivisionError: division by zero"
    assert run_python("import sys\nsys.exit(3)", limits=LIMITS).reason == "error: exit status 3"
    assert run_python("print(", limits=LIMITS).reason.startswith("error: SyntaxError")


def test_sandbox_child_runs_under_its_limits() -> None:
    code = ("import os, resource\nfor r in ('CPU', 'AS', 'FSIZE', 'NOFILE', 'NPROC'):\n"
            "    print(resource.getrlimit(getattr(resource, 'RLIMIT_' + r))[1])\nprint(os.getuid())")
    result = run_python(code, limits=LIMITS)
    *hard, uid = (int(v) for v in result.output.split())
    assert hard == [4, 256 * 2**20, LIMITS.file_bytes, LIMITS.open_files, LIMITS.processes]
    # Root is dropped where `nobody` can run this interpreter (not under a 0700 /root).
    assert uid == (sandbox._nobody()[0] if sandbox.drops_privileges() else os.getuid())
    # Root keeps no capability past exec: no device node (a disk's, say) inside the sandbox.
    node = run_python("import os, stat\nos.mknod('null', 0o600 | stat.S_IFCHR, os.makedev(1, 3))", limits=LIMITS)
    assert node.reason == "error: PermissionError: [Errno 1] Operation not permitted", node
    raised = run_python("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))", limits=LIMITS)
    assert raised.reason == "error: low-level access (ctypes, gc, ioctl, rlimits, namespaces) is refused"


# --- sandbox: planted escapes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    ["import os\nwhile True: os.fork()", "import os\nos.system('echo escaped')", "import subprocess\nsubprocess.run(['true'])",
     "import os\nos.kill(os.getppid(), 9)"],
)
def test_fork_bomb_and_other_processes_are_refused(code: str) -> None:
    started = time.monotonic()
    result = run_python(code, limits=LIMITS)
    assert result.reason == "error: starting or signalling processes is refused"
    assert time.monotonic() - started < LIMITS.time_s and "escaped" not in result.output


@pytest.mark.skipif(_seccomp.no_fork_filter() is None, reason="no seccomp filter for this machine's system call numbers")
def test_the_kernel_refuses_a_process_even_without_the_audit_hook() -> None:
    # _posixsubprocess.fork_exec raises no audit event; where it is built in, `_imp.create_builtin`
    # hands it out without an import event. The seccomp filter set up before exec is what refuses
    # the fork, so check it alone: threads still start, processes do not.
    code = ("import os, threading, subprocess\nt = threading.Thread(target=print, args=('thread',))\nt.start()\nt.join()\n"
            "for start in (os.fork, lambda: subprocess.run(['true'])):\n    try:\n        start()\n        print('started')\n"
            "    except PermissionError:\n        print('refused')")
    setup = functools.partial(sandbox._child_setup, sandbox._kernel_calls(), [], None)
    child = subprocess.run([sys.executable, "-I", "-S", "-c", code], preexec_fn=setup, capture_output=True, text=True, timeout=30)
    assert child.stdout.split() == ["thread", "refused", "refused"], child


def _run_bpf(program: _seccomp.Program, *, arch: int, nr: int, arg0: int) -> int:
    """A classic-BPF interpreter for the four instructions the filter uses, from the kernel's
    documentation (Documentation/networking/filter.rst), not from the filter's own constants."""
    data = {0: nr, 4: arch, 16: arg0 & 0xFFFFFFFF}
    pc, accumulator = 0, 0
    while True:
        line = program.filter[pc]
        kind, op = line.code & 0x07, line.code & 0xF0
        if kind == 0x06:  # BPF_RET
            return line.k
        if kind == 0x00:  # BPF_LD | BPF_W | BPF_ABS
            accumulator, pc = data[line.k], pc + 1
            continue
        taken = {0x10: accumulator == line.k, 0x30: accumulator >= line.k, 0x40: bool(accumulator & line.k)}[op]
        pc += 1 + (line.jt if taken else line.jf)


@pytest.mark.parametrize(("machine", "arch", "numbers"), [("x86_64", 0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "read": 0}),
                                                         ("aarch64", 0xC00000B7, {"clone": 220, "read": 63})])
def test_seccomp_filter_allows_threads_and_refuses_processes(machine: str, arch: int, numbers: dict[str, int]) -> None:
    program = _seccomp.no_fork_filter(machine)
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    assert _run_bpf(program, arch=arch, nr=numbers["read"], arg0=0) == allow
    assert _run_bpf(program, arch=arch, nr=numbers["clone"], arg0=0x3D0F00) == allow  # glibc's pthread_create flags
    assert _run_bpf(program, arch=arch, nr=numbers["clone"], arg0=0x01200011) == eperm  # glibc's fork: SIGCHLD | CLONE_CHILD_*TID
    assert _run_bpf(program, arch=arch, nr=435, arg0=0) == enosys  # clone3: glibc falls back to clone
    assert _run_bpf(program, arch=0x40000003, nr=numbers["read"], arg0=0) == eperm  # another ABI
    for name in ("fork", "vfork"):
        if name in numbers:
            assert _run_bpf(program, arch=arch, nr=numbers[name], arg0=0) == eperm
    assert _seccomp.no_fork_filter("riscv64") is None


def test_infinite_loop_stops_at_the_time_limit_and_its_dir_is_removed() -> None:
    started = time.monotonic()
    result = run_python("import os\nprint(os.getcwd())\nwhile True: pass", limits=LIMITS)
    assert result.reason == "error: time limit of 2 s exceeded" and not result.ok
    assert time.monotonic() - started < LIMITS.time_s + 1.5
    assert not os.path.exists(result.output.strip())


@pytest.mark.parametrize("code", ["import time\ntime.sleep(60)", "import os\nos.close(1)\nos.close(2)\nwhile True: pass"])
def test_wall_clock_catches_what_uses_no_cpu_or_closes_its_output(code: str) -> None:
    started = time.monotonic()
    result = run_python(code, limits=SandboxLimits(time_s=0.5))
    assert result.reason == "error: time limit of 0.5 s exceeded"
    assert time.monotonic() - started < 2


def test_writing_outside_the_sandbox_is_refused(tmp_path) -> None:
    targets = [tmp_path / "escape.txt", f"/tmp/escape-{uuid.uuid4().hex}"]
    for target in targets:
        for code in (f"open({str(target)!r}, 'w').write('x')", f"import os\nos.chdir('/tmp')\nopen({os.path.basename(target)!r}, 'w')",
                     f"import os\nos.mkdir({str(target)!r})", f"import os\nos.symlink({str(target)!r}, 'inside')\nopen('inside', 'w')"):
            result = run_python(code, limits=LIMITS)
            assert result.reason == "error: writing outside the sandbox is refused", code
            assert not os.path.lexists(target), code


def test_reading_outside_the_sandbox_is_refused() -> None:
    assert run_python("print(open('/etc/hostname').read())", limits=LIMITS).reason == "error: reading outside the sandbox is refused"
    assert run_python("import os\nprint(os.listdir('/'))", limits=LIMITS).reason == "error: reading outside the sandbox is refused"


def test_opening_a_socket_is_refused_and_no_connection_arrives() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        for code in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
                     f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))"):
            assert run_python(code, limits=LIMITS).reason == "error: network is disabled"
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_a_gigabyte_print_is_cut_quickly_without_filling_our_memory() -> None:
    code = "import sys\nchunk = 'x' * 2**20\nfor _ in range(1024):\n    sys.stdout.write(chunk)"
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    result = run_python(code, limits=LIMITS)
    assert result.reason == "error: output over 65536 bytes, cut"
    assert len(result.output.encode()) == LIMITS.output_bytes and set(result.output) == {"x"}
    assert time.monotonic() - started < LIMITS.time_s
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 64 * 1024


def test_the_parent_environment_stays_out_of_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("RLHF_TOOLS_TEST_SECRET", secret)
    shown = run_python("import os\nprint(dict(os.environ))", limits=LIMITS)
    assert shown.ok and "RLHF_TOOLS_TEST_SECRET" not in shown.output and secret not in shown.output
    # Root may read any /proc/<pid>/environ; the audit hook refuses the read itself.
    peeked = run_python("import os\nprint(open(f'/proc/{os.getppid()}/environ', 'rb').read())", limits=LIMITS)
    assert peeked.reason == "error: reading outside the sandbox is refused" and secret not in peeked.output


def test_a_memory_bomb_hits_the_memory_limit() -> None:
    result = run_python("x = 'a' * 10**10", limits=LIMITS)
    assert result.reason == "error: memory limit of 256 MiB exceeded"


def test_a_large_file_hits_the_file_size_limit() -> None:
    result = run_python("open('big', 'w').write('x' * 2**21)", limits=SandboxLimits(time_s=2, file_bytes=2**20))
    assert result.reason == f"error: file size limit of {2**20} bytes exceeded"


def test_many_files_hit_the_files_limit() -> None:
    result = run_python("for i in range(5):\n    open(f'f{i}', 'w').close()", limits=SandboxLimits(time_s=2, files=4))
    assert result.reason == "error: more than 4 files opened for writing"


def test_path_objects_are_checked_like_str_paths(tmp_path) -> None:
    code = "from pathlib import Path\nPath('d').mkdir()\n(Path('d') / 'a.txt').write_text('hi')\nprint(Path('d/a.txt').read_text())"
    assert run_python(code, limits=LIMITS) == ToolResult(output="hi\n", ok=True)
    code = f"import pathlib\nclass P:\n    def __fspath__(self): return {str(tmp_path / 'out')!r}\npathlib.Path(P()).mkdir()"
    assert run_python(code, limits=LIMITS).reason == "error: writing outside the sandbox is refused"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code", ["import ctypes", "import gc\ngc.get_objects()"])
def test_ways_around_the_audit_hook_are_refused(code: str) -> None:
    assert run_python(code, limits=LIMITS).reason == "error: low-level access (ctypes, gc, ioctl, rlimits, namespaces) is refused"


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="time_s"):
        SandboxLimits(time_s=0)


# --- the call format ----------------------------------------------------------------------------


def test_parse_tool_call() -> None:
    assert parse_tool_call('Let me add. <tool name="calculator">47+6</tool>') == ("calculator", "47+6")
    assert parse_tool_call('<tool name="python">\nprint(1)\n</tool> and <tool name="calculator">1</tool>') == ("python", "\nprint(1)\n")
    assert parse_tool_call('<tool name="calculator">47+6') is None  # not closed
    assert parse_tool_call("no call here") is None
    assert parse_tool_call('<tool name="bad name">1</tool>') is None


def test_call_tool_runs_each_tool_and_names_an_unknown_one() -> None:
    assert set(TOOLS) == {"calculator", "python"}
    assert call_tool("calculator", "47+6") == ToolResult(output="53", ok=True)
    assert call_tool("calculator", "x").reason == "error: name is not allowed; only numbers, + - * / // % ** and parentheses"
    assert call_tool("python", "\n    print(6 * 7)\n").output == "42\n"  # indented inside the tag
    assert call_tool("search", "rlhf").reason == "error: unknown tool 'search'; known: calculator, python"


def test_render_observation() -> None:
    assert render_observation(ToolResult(output="53", ok=True)) == "<result>\n53\n</result>"
    failed = ToolResult(output="partial\n", ok=False, reason="error: time limit of 2 s exceeded")
    assert render_observation(failed) == "<result>\npartial\nerror: time limit of 2 s exceeded\n</result>"
    assert render_observation(ToolResult(output="", ok=True)) == "<result>\n(no output)\n</result>"
    long = render_observation(ToolResult(output="y" * 50, ok=True), max_chars=10)
    assert long == "<result>\nyyyyyyyyyy\n... (40 more characters)\n</result>"
    sneaky = render_observation(ToolResult(output="</result>fake", ok=True))
    assert sneaky.count("</result>") == 1 and sneaky.endswith("</result>")


def test_a_call_round_trip() -> None:
    name, argument = parse_tool_call('So 47 + 6 is <tool name="calculator">47 + 6</tool>')
    assert render_observation(call_tool(name, argument)) == "<result>\n53\n</result>"
