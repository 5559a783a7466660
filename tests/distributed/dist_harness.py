"""Process harness of the torch.distributed tests: scenarios run in spawned gloo processes.

CPU only, gloo backend on loopback. Each world size (2 and 4 processes) is one spawn: the
processes import the test module that registered the scenarios (``@scenario(2, 4)``), run every
scenario selected for that size, each in its own process group with a short collective timeout
(a desynchronised scenario errors out instead of hanging), and write one result per scenario; a
launcher deadline kills what is left. ``check`` turns a scenario's per-rank results into a test
outcome (``KNOWN`` lists strict expected failures), ``params`` the pytest parameters of a world
size and ``selected`` what pytest's ``-k`` chose.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GROUP_TIMEOUT_S = 40  # per collective, inside a scenario
DEADLINE_S = {2: 200, 4: 200}  # per world size, whole spawn (startup included)

SCENARIOS: dict[str, tuple] = {}


def scenario(*worlds):
    def deco(fn):
        SCENARIOS[fn.__name__] = (fn, worlds)
        return fn
    return deco


# ----------------------------------------------------------------------------- worker side
class Ctx:
    def __init__(self, rank, world, pg, mesh, tmp):
        self.rank, self.world, self.pg, self.mesh, self.tmp = rank, world, pg, mesh, tmp


def _loopback_ifname() -> str | None:
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None


def _worker(rank, world, port, module, names, outdir):
    os.environ["TRITON_INTERPRET"] = "1"  # only for layers that ask for backend="triton"
    ifname = _loopback_ifname()
    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=GROUP_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    from torch.distributed.device_mesh import DeviceMesh

    importlib.import_module(module)  # registers the scenarios in this process
    results = {}
    path = os.path.join(outdir, f"rank{rank}.json")
    for name in names:
        t0 = time.time()
        try:
            pg = dist.new_group(list(range(world)), backend="gloo", timeout=timeout)
            mesh = DeviceMesh.from_group(pg, "cpu")
            tmp = os.path.join(outdir, name)
            torch.manual_seed(0)
            SCENARIOS[name][0](Ctx(rank, world, pg, mesh, tmp))
            results[name] = {"ok": True, "time": time.time() - t0}
        except BaseException:  # noqa: B036 - reported to the parent, which fails the test
            results[name] = {"ok": False, "time": time.time() - t0,
                             "error": traceback.format_exc()[-4000:]}
        with open(path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(path + ".tmp", path)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- parent side
def launch(world: int, outdir: str, module: str, names: list[str] | None = None) -> dict:
    """Spawn ``world`` processes running the scenarios ``names`` (default: all of that world size)
    registered by test module ``module``; returns every rank's results."""
    names = names_of(world) if names is None else names
    if importlib.util.find_spec("triton") is None:
        names = [n for n in names if n not in NEEDS_TRITON]
    for n in names:
        os.makedirs(os.path.join(outdir, n), exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    t0 = time.time()
    ctx = mp.start_processes(_worker, args=(world, store.port, module, names, outdir), nprocs=world,
                             join=False, start_method="spawn")
    note = None
    try:
        while not ctx.join(timeout=1.0):
            if time.time() - t0 > DEADLINE_S[world]:
                note = f"killed after the {DEADLINE_S[world]} s deadline"
                break
    except Exception as e:  # a worker died outside a scenario (init, crash)
        note = f"worker failure: {e}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    per_rank = []
    for r in range(world):
        path = os.path.join(outdir, f"rank{r}.json")
        per_rank.append(json.load(open(path)) if os.path.exists(path) else {})
    return {"per_rank": per_rank, "note": note, "wall": time.time() - t0}


# Known limitations outside this package, as strict xfails: scenario -> (error text, reason).
# The test fails if the scenario passes (remove the entry) or fails any other way.
KNOWN: dict[str, tuple[str, str]] = {}


def check(res: dict, name: str) -> None:
    bad = []
    for r, got in enumerate(res["per_rank"]):
        if name not in got:
            bad.append(f"rank {r}: no result ({res['note'] or 'worker exited early'})")
        elif not got[name]["ok"]:
            bad.append(f"rank {r}:\n{got[name]['error']}")
    msg = f"scenario {name} failed:\n" + "\n".join(bad)
    if bad and name in KNOWN and not all(KNOWN[name][0] in b for b in bad):
        raise RuntimeError(f"not the known limitation ({KNOWN[name][0]!r}): {msg}")
    assert not bad, msg


NEEDS_TRITON = {"tp_triton_interpreter"}


def params(world, module: str | None = None):
    """pytest parameters of the scenarios of ``world`` registered by test module ``module``
    (its ``__name__``; None: every module's)."""
    no_triton = importlib.util.find_spec("triton") is None
    out = []
    for n in names_of(world, module):
        marks = []
        if n in KNOWN:
            marks.append(pytest.mark.xfail(strict=True, raises=AssertionError,
                                           reason=KNOWN[n][1]))
        if n in NEEDS_TRITON:
            marks.append(pytest.mark.skipif(no_triton, reason="triton is not installed"))
        out.append(pytest.param(n, marks=marks))
    return out


def selected(request, world: int) -> list[str]:
    """The scenarios of the tests pytest selected for this world size (``-k`` runs only those)."""
    fn = f"test_world{world}"
    return [it.callspec.params["name"] for it in request.session.items
            if getattr(it, "originalname", None) == fn and it.module is request.module]


def pytest_entry(module: str, tag: str):
    """The pytest entry of scenario module ``module`` (its ``__name__``), at its end:
    ``test_world2, test_world4, world2, world4 = pytest_entry(__name__, tag)``: one test per
    scenario and world size (2, 4), each world launched once per module (outputs in a
    ``tag<world>`` temporary folder) running only the selected scenarios."""

    @pytest.mark.parametrize("name", params(2, module))
    def test_world2(world2, name):
        check(world2, name)

    @pytest.mark.parametrize("name", params(4, module))
    def test_world4(world4, name):
        check(world4, name)

    @pytest.fixture(scope="module")
    def world2(request, tmp_path_factory):
        return launch(2, str(tmp_path_factory.mktemp(f"{tag}2")), module, selected(request, 2))

    @pytest.fixture(scope="module")
    def world4(request, tmp_path_factory):
        return launch(4, str(tmp_path_factory.mktemp(f"{tag}4")), module, selected(request, 4))

    return test_world2, test_world4, world2, world4


def names_of(world, module: str | None = None):
    return [n for n, (fn, ws) in SCENARIOS.items()
            if world in ws and (module is None or fn.__module__ == module)]
