"""The CPU emulation of megatron-core's CUDA calls, and the multi-rank test helper."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch

import megatron_asvr
from tests.support.multirank import MultiRankError, run_ranks


def _emulation_with_fake_cuda():
    """In a fresh rank: pretend a GPU exists, then install."""
    torch.cuda.is_available = lambda: True
    current_device, tensor_type = torch.cuda.current_device, torch.Tensor.type
    from megatron_asvr.runtime import cpu_emulation

    active = cpu_emulation.install()
    return dict(
        active=active,
        is_active=cpu_emulation.is_active(),
        untouched=torch.cuda.current_device is current_device and torch.Tensor.type is tensor_type,
        mode_stack=torch._C._len_torch_function_stack(),
    )


def test_emulation_is_a_noop_when_cuda_is_available():
    result = run_ranks(_emulation_with_fake_cuda, 1)[0]
    assert result == dict(active=False, is_active=False, untouched=True, mode_stack=0)


def _emulated_calls():
    from megatron.core.tensor_parallel import random as mp_random

    from megatron_asvr.runtime import cpu_emulation

    assert cpu_emulation.install()
    out = {}
    out["empty"] = torch.empty(2, device="cuda").device.type
    out["index"] = torch.zeros(2, device=0).device.type
    out["to"] = torch.ones(2).to("cuda", non_blocking=True).device.type
    out["dot_cuda"] = torch.ones(2).cuda().device.type
    out["current_device"] = torch.cuda.current_device()
    out["type"] = torch.ones(2).type()
    out["bf16_type"] = torch.ones(2, dtype=torch.bfloat16).type()
    out["cast"] = torch.ones(2).type("torch.cuda.HalfTensor").dtype
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    # torch.manual_seed calls cuda.manual_seed_all, which must not call back.
    torch.manual_seed(3)
    seeded = torch.rand(2)
    out["manual_seed"] = torch.equal(seeded, torch.rand(2, generator=torch.Generator().manual_seed(3)))
    # The CUDA RNG is the CPU generator: megatron's state helpers round-trip it.
    torch.cuda.manual_seed(7)
    state = mp_random._get_cuda_rng_state()
    first = torch.rand(3)
    mp_random._set_cuda_rng_state(state)
    out["rng_roundtrip"] = torch.equal(first, torch.rand(3))
    out["rng_is_cpu"] = torch.equal(torch.cuda.get_rng_state(), torch.get_rng_state())
    return out


def test_emulated_cuda_calls_run_on_cpu():
    out = run_ranks(_emulated_calls, 1)[0]
    assert out == dict(
        empty="cpu", index="cpu", to="cpu", dot_cuda="cpu", current_device="cpu",
        type="torch.cuda.FloatTensor", bf16_type="torch.cuda.BFloat16Tensor", cast=torch.float16,
        rng_roundtrip=True, rng_is_cpu=True, manual_seed=True,
    )


def test_emulation_lives_in_one_module():
    """Only cpu_emulation.py patches torch.cuda / Tensor or installs a function mode."""
    markers = ("TorchFunctionMode", "torch.cuda.current_device =", "cuda.current_device =", "torch.Tensor.type =")
    package = pathlib.Path(megatron_asvr.__file__).parent
    offenders = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if any(marker in path.read_text() for marker in markers)
    }
    assert offenders == {"runtime/cpu_emulation.py"}


def _rank_value(scale):
    return int(os.environ["RANK"]) * scale, int(os.environ["WORLD_SIZE"])


def _fails_on_rank_one():
    if os.environ["RANK"] == "1":
        raise ValueError("bad shard on rank one")
    time.sleep(60)  # the others would wait forever in a collective


def _hangs():
    time.sleep(60)


def test_run_ranks_collects_results_by_rank():
    assert run_ranks(_rank_value, 3, 10) == [(0, 3), (10, 3), (20, 3)]


def test_run_ranks_reports_the_failing_rank_traceback():
    start = time.monotonic()
    with pytest.raises(MultiRankError) as info:
        run_ranks(_fails_on_rank_one, 2, timeout=30)
    assert "failed on rank 1" in str(info.value)
    assert "ValueError: bad shard on rank one" in str(info.value)
    assert time.monotonic() - start < 20  # the other rank was killed, not waited for


def test_run_ranks_turns_a_hang_into_a_failure():
    with pytest.raises(MultiRankError, match=r"hung: ranks \[0, 1\] did not finish within 2 s"):
        run_ranks(_hangs, 2, timeout=2)


def _strict_device_rules():
    """In a fresh rank: strict mode's verdicts on the mistakes a GPU would reject, and on what it allows."""
    import torch.distributed as dist

    from megatron_asvr.runtime import cpu_emulation
    from megatron_asvr.runtime.cpu_emulation import StrictDeviceError

    assert cpu_emulation.install(strict=True)
    dist.init_process_group("gloo", rank=0, world_size=1)
    verdicts = {}

    def verdict(name, fn):
        try:
            fn()
            verdicts[name] = "ok"
        except StrictDeviceError as err:
            verdicts[name] = str(err).split(":")[0]

    host, device = torch.ones(3), torch.ones(3, device="cuda")
    layer = torch.nn.Linear(3, 2).cuda()
    moved = host.to("cuda", non_blocking=True)
    verdict("host + device", lambda: host + device)
    verdict("moved + device", lambda: moved + device)
    verdict("0-dim host scalar + device", lambda: torch.tensor(2.0) * device)
    verdict("host batch into a layer", lambda: layer(torch.ones(4, 3)))
    verdict("moved batch into a layer", lambda: layer(torch.ones(4, 3).cuda()))
    verdict("created like a device tensor", lambda: device + torch.zeros_like(device))
    verdict("host stays host after a move", lambda: host + layer.weight[0])
    verdict("copy from host", lambda: device.copy_(host))
    verdict("all_reduce on host", lambda: dist.all_reduce(torch.zeros(2)))
    verdict("all_reduce on device", lambda: dist.all_reduce(torch.zeros(2, device="cuda")))
    gloo = dist.new_group([0], backend="gloo")
    verdict("host on a gloo group", lambda: dist.all_reduce(torch.zeros(2), group=gloo))
    dist.destroy_process_group()
    return verdicts


def test_strict_device_mode_rejects_what_a_gpu_would():
    assert run_ranks(_strict_device_rules, 1)[0] == {
        "host + device": "add mixes a host tensor (3,) torch.float32 with device tensors",
        "moved + device": "ok",
        "0-dim host scalar + device": "ok",
        "host batch into a layer": "linear mixes a host tensor (4, 3) torch.float32 with device tensors",
        "moved batch into a layer": "ok",
        "created like a device tensor": "ok",
        "host stays host after a move": "add mixes a host tensor (3,) torch.float32 with device tensors",
        "copy from host": "ok",
        "all_reduce on host": "torch.distributed.all_reduce on a host tensor (2,) torch.float32",
        "all_reduce on device": "ok",
        "host on a gloo group": "ok",
    }


def test_free_port_is_below_the_ephemeral_range_and_bindable(tmp_path, monkeypatch):
    """A rendezvous port is drawn below the kernel's ephemeral range (where other jobs' gloo connections
    take their local ports), is free, and is the kernel's choice when there is no room below."""
    from megatron_asvr.runtime import ports

    low = int(pathlib.Path(ports._EPHEMERAL_RANGE).read_text().split()[0])
    drawn = {ports.free_port() for _ in range(20)}
    assert all(min(10_000, low - 1_000) <= p < low for p in drawn) and len(drawn) > 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", drawn.pop()))

    fake = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(ports, "_EPHEMERAL_RANGE", str(fake))
    fake.write_text("3000\t60999\n")
    assert all(1024 <= ports.free_port() < 3000 for _ in range(20))
    fake.write_text("")  # unreadable: Linux's default, 32768
    assert all(10_000 <= ports.free_port() < 32768 for _ in range(20))
    fake.write_text("1024\t60999\n")  # no room below: bind(0) hands out a port of the real range
    assert ports.free_port() >= low


_LAZY_COMPILE_PROBE = """
import sys
import megatron_asvr
import megatron.core
import torch
from megatron.core import jit
from megatron.core.fusions.fused_bias_swiglu import swiglu

assert jit.jit_fuser is megatron_asvr.lazy_compile, jit.jit_fuser
assert "torch._dynamo" not in sys.modules and "torch._inductor" not in sys.modules
compiled = []
torch.compile = lambda fn: compiled.append(fn.__name__) or (lambda *args: ("compiled", fn(*args)))
x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
first, second = swiglu(x), swiglu(x)
assert first[0] == "compiled" and torch.equal(first[1], torch.nn.functional.silu(x[:, :2]) * x[:, 2:])
assert second[0] == "compiled" and compiled == ["swiglu"], compiled
print("ok")
"""


def test_megatron_compiles_its_fused_kernels_at_first_call_not_at_import():
    """With megatron_asvr imported first, importing megatron-core imports no TorchDynamo; a fused
    kernel is handed to torch.compile once, at its first call, and computes what it did."""
    probe = subprocess.run([sys.executable, "-c", _LAZY_COMPILE_PROBE], capture_output=True, text=True,
                           env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert probe.returncode == 0 and probe.stdout.strip() == "ok", probe.stderr[-3000:]
