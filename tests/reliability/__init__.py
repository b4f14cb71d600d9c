"""Reliability tests: faults injected into real runs (read-only folders, a full disk, a Gemini outage).

Each test is bounded in time (subprocess timeouts, or an elapsed-time assertion) and talks to
loopback only. The file-system faults need mount permission (root with CAP_SYS_ADMIN); without it they
are skipped with the reason.
"""
