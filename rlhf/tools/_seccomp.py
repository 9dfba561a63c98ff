"""A seccomp filter that lets a process make threads but no other process: hand-assembled
classic BPF, no libseccomp.

The sandbox's audit hook refuses os.fork, os.exec* and subprocess, but `_posixsubprocess.fork_exec`
raises no audit event, and where that module is built in (Debian's python3) `_imp.create_builtin`
hands it out without an import event: a fresh interpreter without the hook would be one call away.
This filter refuses the fork itself, in the kernel: fork and vfork fail with EPERM, clone with EPERM
unless it makes a thread (CLONE_THREAD), clone3 with ENOSYS (its flags sit behind a pointer a filter
cannot read; glibc then makes its threads with clone). Other system calls pass.
"""

from __future__ import annotations

import ctypes
import errno
import platform

# <linux/filter.h>: BPF_LD|BPF_W|BPF_ABS, BPF_JMP|{BPF_JEQ,BPF_JGE,BPF_JSET}|BPF_K, BPF_RET|BPF_K.
_LOAD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
# <linux/seccomp.h>: where struct seccomp_data keeps the call's number, ABI and first argument
# (its low 32 bits, little-endian), and what a filter may answer.
_NR, _ARCH, _ARG0_LOW = 0, 4, 16
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_CLONE_THREAD = 0x00010000
_X32_SYSCALL_BIT = 0x40000000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
# platform.machine() -> (AUDIT_ARCH_*, system call numbers); arm64 has no fork or vfork.
_MACHINES = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435}),
    "aarch64": (0xC00000B7, {"clone": 220, "clone3": 435}),
}


class _Instruction(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class Program(ctypes.Structure):
    """struct sock_fprog; it holds a reference to its instructions (ctypes keeps the array)."""

    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Instruction))]


def no_fork_filter(machine: str | None = None) -> Program | None:
    """The filter for this machine, or None where its system call numbers are not known here."""
    entry = _MACHINES.get(machine or platform.machine())
    if entry is None:
        return None
    arch, numbers = entry
    # (code, jump if true, jump if false, k); a jump names a return below, 0 goes on to the next line.
    body: list[tuple[int, int | str, int | str, int]] = [
        (_LOAD, 0, 0, _ARCH),
        (_JEQ, 0, "deny", arch),  # another ABI (int 0x80 on x86_64): nothing the sandbox runs uses one
        (_LOAD, 0, 0, _NR),
        (_JGE, "deny", 0, _X32_SYSCALL_BIT),
        (_JEQ, "nosys", 0, numbers["clone3"]),
        *((_JEQ, "deny", 0, numbers[name]) for name in ("fork", "vfork") if name in numbers),
        (_JEQ, 0, "allow", numbers["clone"]),
        (_LOAD, 0, 0, _ARG0_LOW),
        (_JSET, "allow", "deny", _CLONE_THREAD),
    ]
    returns = {"allow": _ALLOW, "deny": _ERRNO | errno.EPERM, "nosys": _ERRNO | errno.ENOSYS}
    where = {label: len(body) + i for i, label in enumerate(returns)}

    def offset(jump: int | str, line: int) -> int:
        return 0 if isinstance(jump, int) and jump == 0 else where[str(jump)] - line - 1

    rows = [(code, offset(jt, i), offset(jf, i), k) for i, (code, jt, jf, k) in enumerate(body)]
    rows += [(_RET, 0, 0, value) for value in returns.values()]
    return Program(len(rows), (_Instruction * len(rows))(*(_Instruction(*row) for row in rows)))
