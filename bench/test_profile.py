"""Self-checks of python -m bench.profile's reading of `perf script` (no perf needed)."""
from __future__ import annotations

from bench.profile import IRQ, OTHER, USER, category, parse_script, shares, table

# `perf script -F pid,ip,sym`: a header with the pid, the call chain leaf first, a blank line
SCRIPT = """\
   101 
\tffffffff8207a086 tcp_sendmsg_locked+0x16
\tffffffff82079037 __sys_sendto+0x77
\tffffffff82079040 __x64_sys_sendto+0x20
\tffffffff81000010 do_syscall_64+0x50
\tffffffff81000000 entry_SYSCALL_64_after_hwframe+0x76
\t    7f00000010 __send+0x1

   101 
\t    7f00000020 __pyx_f_6fastws_7_engine_flow_pump+0x10
\t    7f00000030 __pyx_f_6fastws_7_engine_engine_turn+0x20

   202 
\tffffffff8207a000 tcp_v4_rcv+0x10

   101 
\tffffffff8107a000 io_run_task_work+0x10
\tffffffff8107b000 __do_sys_io_uring_enter+0x10
\tffffffff81000010 do_syscall_64+0x50

   101 
\tffffffff8107a000 do_writev+0x10
\tffffffff81000010 do_syscall_64+0x50

   101 
\tffffffff8107a000 __irq_exit_rcu+0x10
\tffffffff8107b000 asm_sysvec_apic_timer_interrupt+0x10
\t    7f00000020 __pyx_f_6fastws_7_engine_flow_pump+0x10
"""


def test_samples_are_kept_for_the_proxys_pids_only():
    chains = parse_script(SCRIPT, {101})
    assert len(chains) == 5
    assert chains[0][0] == "tcp_sendmsg_locked" and chains[0][-1] == "__send"
    assert parse_script(SCRIPT, {202}) == [["tcp_v4_rcv"]]


def test_a_sample_goes_under_its_outermost_system_call():
    chains = parse_script(SCRIPT, {101})
    assert [category(c) for c in chains] == ["sendto", USER, "io_uring_enter", "writev", IRQ]
    assert category(["tcp_v4_rcv", "do_syscall_64", "entry_SYSCALL_64"]) == OTHER


def test_shares_and_the_table_add_up():
    cats, users = shares(parse_script(SCRIPT, {101}))
    assert abs(sum(cats.values()) - 1) < 1e-9
    assert cats["sendto"] == 0.2 and users == {"__pyx_f_6fastws_7_engine_flow_pump": 0.2}
    rec = {"target": "fastws", "kind": "echo", "unit": "message", "ok": True, "error": None,
           "samples": 5, "cpu_us": 10.0, "shares": cats, "user": users}
    md = table("echo", [rec, {"target": "nginx", "ok": False, "error": "it died"}], 12)
    assert "| **all (utime + stime)** | **10.00** |" in md
    assert "| `sendto` | 2.00 |" in md and "| user space | 2.00 |" in md
    assert "nginx: FAILED: it died" in md
