"""Confinement of untrusted workers: the policy and what this kernel enforces (`policy`),
cgroup caps (`caps`), Landlock (`landlock`) and the seccomp filter (`seccomp`).
"""

__all__: list[str] = []
