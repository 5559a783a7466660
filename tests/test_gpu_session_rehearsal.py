"""Rehearsal of ``bench/gpu_session.sh`` on CPU (issue 19): its real control flow (limits,
deadlines, SIGINT then SIGKILL, the results folder, the state kept for ``rerun``, the summary)
with every step replaced by a stand-in (``GS_STANDIN``) that finishes, fails, hangs until its
deadline's SIGINT, or ignores SIGINT and is killed at its limit. Times are shrunk through
``GS_LIMIT_*`` / ``GS_MARGIN``. Each case proves the result files survive, at most 8 files come
back under $OUT with names the device tool accepts (letters, digits, '.', '_', '-'; at most two
folders down), and the summary says what did not run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("build", "correctness", "memcheck", "headline", "suite")
# the planned tests of the stand-in's test steps: correctness A, B (the pair triton lora_linear);
# suite C, D (no pair)
A, B = "tests/test_lora.py::test_fwd[triton-a]", "tests/test_lora.py::test_fwd[triton-b]"
C, D = "tests/test_summation.py::test_c", "tests/test_summation.py::test_d"

STANDIN = r"""#!/usr/bin/env bash
# a stand-in for one step of bench/gpu_session.sh: $1 = step; GS_REHEARSE_<step> = its behaviour
step=$1
var=GS_REHEARSE_$step
mode=${!var:-finish}
if [ "$step" = suite ]; then first="C_ID"; second="D_ID"; else first="A_ID"; second="B_ID"; fi
res() {  # one result line, flushed as the plugin would
  printf '{"step": "%s", "test": "%s", "when": "call", "outcome": "%s", "time_s": 0.1}\n' \
    "$step" "$1" "$2" >> "$LORA_KERNELS_RESULTS_JSONL"
}
case $step in
  correctness|suite)
    printf '{"step": "%s", "planned": ["%s", "%s"]}\n' "$step" "$first" "$second" \
      >> "$LORA_KERNELS_RESULTS_JSONL"
    res "$first" passed ;;
  memcheck) echo "memcheck output" > "$RES/memcheck.log" ;;
  headline) echo '{"rows": []}' > "$RES/standin-headline.json"
            echo 'half' > "$RES/standin-headline.json.tmp"
            for i in 1 2 3; do echo x > "$RES/extra-$i.txt"; done ;;
esac
case $mode in
  finish) case $step in correctness|suite) res "$second" passed ;; esac; exit 0 ;;
  fail) case $step in correctness|suite) res "$second" failed ;; esac; exit 1 ;;
  hang) sleep 1000 ;;
  killed) trap '' INT; sleep 1000 ;;
esac
""".replace("A_ID", A).replace("B_ID", B).replace("C_ID", C).replace("D_ID", D)

NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _session(tmp_path, modes: dict, mode_arg: str | None = None, out: str = "out"):
    standin = tmp_path / "standin.sh"
    standin.write_text(STANDIN)
    standin.chmod(0o755)
    (tmp_path / out).mkdir(exist_ok=True)
    env = dict(os.environ, PY=sys.executable, GS_STANDIN=str(standin), OUT=str(tmp_path / out),
               GS_STATE=str(tmp_path / "state"), GS_MARGIN="3", GS_LIMIT_build="6",
               GS_LIMIT_correctness="6", GS_LIMIT_memcheck="6", GS_LIMIT_headline="6",
               GS_LIMIT_suite="6", TRITON_CACHE_DIR=str(tmp_path / "tcache"),
               PYTHONPATH=str(ROOT))
    env.update({f"GS_REHEARSE_{k}": v for k, v in modes.items()})
    cmd = ["bash", str(ROOT / "bench" / "gpu_session.sh")] + ([mode_arg] if mode_arg else [])
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    return r, tmp_path / out / "gpu-session"


def _check_out(out_root: Path):
    files = [p for p in out_root.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for p in files:
        rel = p.relative_to(out_root)
        assert len(rel.parts) <= 3, rel  # at most two folders down
        assert all(NAME.match(part) for part in rel.parts), rel
    return files


def _steps(res: Path) -> dict:
    out = {}
    for line in (res / "steps.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "end":
            out[e["step"]] = e
    return out


CASES = {
    "all finish": {},
    "fail, hang, killed": {"correctness": "hang", "memcheck": "fail", "headline": "killed",
                           "suite": "fail"},
    "build hangs": {"build": "killed", "correctness": "killed", "suite": "hang"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_rehearsal(tmp_path, case):
    modes = CASES[case]
    r, res = _session(tmp_path, modes)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    files = _check_out(tmp_path / "out")
    assert {p.name for p in files} >= {"session.log", "steps.jsonl", "tests.jsonl",
                                       "summary.txt"}, (files, log)
    ends = _steps(res)
    assert set(ends) == set(STEPS), ends
    for s in STEPS:
        m = modes.get(s, "finish")
        want_cut = m in ("hang", "killed")
        assert ends[s]["cut"] is want_cut, (s, ends[s], log)
        if m == "killed" and s != "build" and s != "memcheck":
            assert ends[s]["rc"] == 137, (s, ends[s])  # SIGINT ignored: killed at the limit
        if m == "fail":
            assert ends[s]["rc"] == 1
    # results written before a hang or a kill survive
    lines = [json.loads(x) for x in (res / "tests.jsonl").read_text().splitlines()]
    got = {(x["step"], x["test"]): x["outcome"] for x in lines if "test" in x}
    assert got[("correctness", A)] == "passed" and got[("suite", C)] == "passed"
    summary = (res / "summary.txt").read_text()
    cut_tests = sum(1 for s in ("correctness", "suite") if modes.get(s) in ("hang", "killed"))
    assert f"did not run: steps none; {cut_tests} planned tests" in summary, summary
    if modes.get("correctness") in ("hang", "killed"):
        assert "CUT at its deadline" in summary and "1 did not run" in summary
        assert "triton lora_linear         1 of 2 planned tests did not run" in summary
    elif modes.get("correctness") == "fail":
        assert "triton lora_linear         failed" in summary
    else:
        assert "triton lora_linear         verified" in summary
    # the session log is complete (written in place by tee, never copied half-written)
    assert "summary" in (res / "session.log").read_text()
    # the state for rerun holds the results, not the log
    state = tmp_path / "state"
    assert (state / "tests.jsonl").read_text() == (res / "tests.jsonl").read_text()
    assert not (state / "session.log").exists()


def test_rerun_continues_where_the_first_command_stopped(tmp_path):
    """First command: correctness hangs (cut). The rerun (a fresh, empty $OUT, as the device
    tool gives each call) restores the results, skips the finished steps and runs the cut one."""
    r, res = _session(tmp_path, {"correctness": "hang"})
    assert r.returncode == 0, r.stdout + r.stderr
    r2, res2 = _session(tmp_path, {}, "rerun", out="out2")
    log = r2.stdout + r2.stderr
    assert r2.returncode == 0, log
    _check_out(tmp_path / "out2")
    starts = [json.loads(x) for x in (res2 / "steps.jsonl").read_text().splitlines()]
    rerun_started = [e["step"] for e in starts[len((res / "steps.jsonl").read_text()
                                                   .splitlines()):] if e["event"] == "start"]
    assert rerun_started == ["correctness"], (rerun_started, log)
    assert "finished in the first command, not repeated" in log
    summary = (res2 / "summary.txt").read_text()
    assert "triton lora_linear         verified" in summary, summary
