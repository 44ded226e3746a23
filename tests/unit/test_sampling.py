"""The sampler settings (otel_envoy/sampling.py): OpenTelemetry names and variables, flags, bad input."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from otel_envoy.events.layout import BPF_DIR
from otel_envoy.sampling import SamplerError, SamplerSettings, peer_hash, sampler_settings

ROOT = Path(__file__).resolve().parents[2]


def test_parent_based_with_one_percent_of_roots_by_default() -> None:
    s = sampler_settings(env={})
    assert s == SamplerSettings("parentbased_traceidratio", 0.01, parent_based=True)
    assert s.kernel_threshold() == round(0.01 * 2**32)


def test_the_parent_based_samplers_let_the_traceparent_decide_first() -> None:
    assert sampler_settings("parentbased_traceidratio", "0.25", {}) == SamplerSettings(
        "parentbased_traceidratio", 0.25, parent_based=True)
    assert sampler_settings("parentbased_always_on", None, {}) == SamplerSettings(
        "parentbased_always_on", 1.0, parent_based=True)
    assert sampler_settings("parentbased_always_off", None, {}) == SamplerSettings(
        "parentbased_always_off", 0.0, parent_based=True)
    assert sampler_settings("always_on", None, {}) == SamplerSettings("always_on", 1.0)
    assert sampler_settings("always_on", None, {}).kernel_threshold() == 2**32


def test_the_environment_names_the_sampler_and_flags_win() -> None:
    env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    s = sampler_settings(env=env)
    assert s == SamplerSettings("traceidratio", 0.25) and s.kernel_threshold() == 2**30
    assert sampler_settings("always_off", None, env) == SamplerSettings("always_off", 0.0)
    assert sampler_settings(None, "0.5", env).ratio == 0.5
    assert sampler_settings("TraceIdRatio", "1", {}).ratio == 1.0  # names are case-insensitive


def test_traceidratio_without_a_ratio_traces_everything() -> None:
    assert sampler_settings("traceidratio", None, {}).ratio == 1.0
    assert sampler_settings("traceidratio", "", {}).ratio == 1.0


@pytest.mark.parametrize(("name", "arg", "message"), [
    ("sometimes", None, "unknown sampler 'sometimes'"),
    ("traceidratio", "1.5", "out of range"),
    ("traceidratio", "-0.1", "out of range"),
    ("traceidratio", "half", "is not a number"),
    ("parentbased_traceidratio", "7", "out of range"),
    ("parentbased_sometimes", None, "unknown sampler"),
])
def test_bad_input_is_one_clear_error(name: str, arg: str | None, message: str) -> None:
    with pytest.raises(SamplerError, match=message):
        sampler_settings(name, arg, {})


def test_the_cli_refuses_a_bad_sampler_with_exit_2_and_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["OTEL_TRACES_SAMPLER"] = "traceidratio"
    env["OTEL_TRACES_SAMPLER_ARG"] = "2"
    proc = subprocess.run([sys.executable, "-m", "otel_envoy.cli", "run", "--pid", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "out of range" in proc.stderr and "Traceback" not in proc.stderr


def test_the_cpu_budget_halves_the_ratio_while_over_and_doubles_it_back_while_well_under() -> None:
    from otel_envoy.sampling import MIN_BUDGET_RATIO, CpuBudget

    b = CpuBudget(0.5, 1.0)
    assert b.observe(0.4) is None  # within the budget: nothing changes
    assert b.observe(0.9).ratio == 0.5 and b.observe(0.8).ratio == 0.25
    assert b.observe(0.3) is None  # between half the budget and the budget: it holds
    assert b.observe(0.1).ratio == 0.5 and b.observe(0.1).ratio == 1.0
    assert b.observe(0.0) is None  # never above the sampler's own ratio
    assert b.summary() == {"budget": 0.5, "ratio_now": 1.0, "ratio_lowest": 0.25, "keep_rate_now": 0,
                           "keep_rate_lowest": 0, "changes": 4, "highest_share": 0.9}
    low = CpuBudget(0.1, 0.01)
    for _ in range(40):
        low.observe(1.0)
    assert low.ratio == MIN_BUDGET_RATIO  # bounded below: a trickle of requests stays traced


def test_at_its_floor_the_budget_lowers_the_keep_rate_then_gives_it_back_before_the_ratio() -> None:
    """A flood of anomalies (kept whatever the sampler) once the ratio cannot go lower: the keep rate is
    halved from what was kept, down to a floor; well under the budget it comes back first, then the ratio."""
    from otel_envoy.sampling import MIN_BUDGET_RATIO, MIN_KEEP_RATE, BudgetStep, CpuBudget

    b = CpuBudget(0.1, MIN_BUDGET_RATIO * 2)
    assert b.observe(0.5, kept_per_s=5000) == BudgetStep(MIN_BUDGET_RATIO, 0)  # the ratio first
    assert b.observe(0.5, kept_per_s=5000) == BudgetStep(MIN_BUDGET_RATIO, 2500)  # then the keeps
    assert b.observe(0.3, kept_per_s=2500) == BudgetStep(MIN_BUDGET_RATIO, 1250)
    for _ in range(20):
        b.observe(0.3, kept_per_s=b.keep_rate)
    assert b.keep_rate == MIN_KEEP_RATE  # a trickle of anomalies stays traced
    assert b.observe(0.08, kept_per_s=10) is None  # between half the budget and the budget: it holds
    assert b.observe(0.01, kept_per_s=10) == BudgetStep(MIN_BUDGET_RATIO, 20)
    assert b.observe(0.01, kept_per_s=20) == BudgetStep(MIN_BUDGET_RATIO, 40)
    assert b.observe(0.01, kept_per_s=20) == BudgetStep(MIN_BUDGET_RATIO, 80)
    assert b.observe(0.01, kept_per_s=20) == BudgetStep(MIN_BUDGET_RATIO, 0)  # no longer binding: no limit
    assert b.observe(0.01) == BudgetStep(MIN_BUDGET_RATIO * 2, 0)  # then the ratio
    assert b.summary()["keep_rate_lowest"] == MIN_KEEP_RATE
    ceiling = CpuBudget(0.1, MIN_BUDGET_RATIO, keep_ceiling=100)
    assert ceiling.observe(0.5, kept_per_s=100) == BudgetStep(MIN_BUDGET_RATIO, 50)
    assert ceiling.observe(0.01, kept_per_s=50) == BudgetStep(MIN_BUDGET_RATIO, 100)  # back to --keep-rate
    assert ceiling.observe(0.01, kept_per_s=100) is None


def test_the_cli_refuses_a_budget_out_of_range() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run([sys.executable, "-m", "otel_envoy.cli", "run", "--pid", "1", "--cpu-budget", "-1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--cpu-budget" in proc.stderr


@pytest.mark.parametrize("flag", ["--keep-slow-ms", "--keep-slow-handshake-ms", "--keep-slow-accept-ms",
                                  "--keep-rate"])
@pytest.mark.parametrize("value", ["-1", "nan", "1e7"])
def test_the_cli_refuses_keep_thresholds_out_of_range(flag: str, value: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = subprocess.run([sys.executable, "-m", "otel_envoy.cli", "run", "--pid", "1", flag, value],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and f"{flag} " in proc.stderr, proc.stderr


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a host C compiler")
def test_peer_hash_is_the_kernel_s(tmp_path: Path) -> None:
    """sampling.peer_hash against peer_hash() of bpf/conn_sampling.bpf.h, compiled with the host compiler."""
    source = (BPF_DIR / "conn_sampling.bpf.h").read_text()
    start = source.index("static __always_inline __u32 peer_hash(")
    body = source[start:source.index("\n}\n", start) + 3].replace("static __always_inline ", "static ")
    cases = [(bytes([127, 0, 0, 1]), socket.AF_INET, 40000), (bytes([10, 1, 2, 3]), socket.AF_INET, 1),
             (socket.inet_pton(socket.AF_INET6, "::ffff:127.0.0.1"), socket.AF_INET6, 65535),
             (socket.inet_pton(socket.AF_INET6, "2001:db8::42"), socket.AF_INET6, 443)]
    calls = "".join(
        "{ __u8 a[16] = {" + ",".join(str(b) for b in raw) + "}; "
        f'printf("%u\\n", peer_hash(a, {family}, {port})); }}\n' for raw, family, port in cases)
    program = tmp_path / "hash.c"
    program.write_text("#include <stdio.h>\n#include <string.h>\ntypedef unsigned char __u8;\n"
                       "typedef unsigned short __u16;\ntypedef unsigned int __u32;\n#define AF_INET6 10\n"
                       f"{body}\nint main(void) {{\n{calls}return 0;\n}}\n")
    exe = tmp_path / "hash"
    subprocess.run(["cc", "-Wall", "-Werror", "-o", str(exe), str(program)], check=True)
    kernel = [int(x) for x in subprocess.run([str(exe)], check=True, capture_output=True,
                                             text=True).stdout.split()]
    assert kernel == [peer_hash(raw, family, port) for raw, family, port in cases]
