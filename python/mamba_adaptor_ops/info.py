"""What this install is and whether it works here: ``python -m mamba_adaptor_ops`` (``--json`` for a machine).

Reports how the kernels were built (torch headers, compilers, CUDA architectures: ``_build_info.py``, written by
the build), what they run on (Python, torch, each GPU and whether the kernels cover it) and a self-test per
device: each op's forward and backward on small inputs against its reference. Each device's self-test runs in a
child process, so that a crash (a broken build, a driver mismatch) is reported instead of ending the report.
Exit status 0 when every self-test passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import traceback

import torch

import mamba_adaptor_ops as mao

from . import reference
from ._library import CUDA_KERNELS_ERROR

try:
    from . import _build_info
except ImportError:  # a source tree that was never built
    _build_info = None


def build_info() -> dict:
    """How the installed modules were built (empty strings where the build did not say)."""
    fields = ("TORCH_VERSION", "TORCH_TARGET", "CXX_COMPILER", "CUDA_COMPILER", "CUDA_ARCHS")
    info = {name.lower(): getattr(_build_info, name, "") for name in fields}
    if info["torch_target"]:  # TORCH_TARGET_VERSION: major and minor in the top two bytes
        target = int(info["torch_target"], 16)
        info["torch_target"] = f"{target >> 56 & 0xFF}.{target >> 48 & 0xFF}"
    return info


def arch_covered(archs: str, major: int, minor: int) -> str | None:
    """The entry of CMAKE_CUDA_ARCHITECTURES `archs` ("80-real;90-real;90-virtual") whose code runs on an
    sm_<major><minor> GPU, or None: a cubin runs on its own major version at an equal or higher minor one, PTX
    on its architecture and every later one (compiled by the driver)."""
    gpu = major * 10 + minor
    for entry in filter(None, archs.split(";")):
        number, _, kind = entry.partition("-")
        arch = int(number)
        if kind in ("", "real") and arch // 10 == major and arch <= gpu:
            return f"sm_{arch}"
        if kind in ("", "virtual") and arch <= gpu:
            return f"compute_{arch} (PTX)"
    return None


def gpus(archs: str) -> list[dict]:
    out = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        covered = arch_covered(archs, props.major, props.minor) if archs else None
        out.append({"index": index, "name": props.name, "arch": f"sm_{props.major}{props.minor}", "covered_by": covered})
    return out


# The self-test's tolerance per dtype, relative to the largest reference value: a few roundings of the dtype.
_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4e-2, torch.float16: 5e-3}


def self_test(device: str) -> dict:
    """Each op forward and backward on small inputs on `device` in float32, bfloat16 and float16, against its
    reference run in float64 on the same (rounded) inputs: "op dtype" -> "ok" or what went wrong."""
    torch.manual_seed(0)
    b, S, D, L = 2, 4, 3, 37
    results = {}

    def check(name, fn, ref, inputs, dtype):
        try:
            # The scan's A stays float32 (its contract); everything else in `dtype`.
            rounded = [t.to(dtype) if i != 2 or name != "selective_scan" else t for i, t in enumerate(inputs)]
            leaves = [t.to(device).requires_grad_() for t in rounded]
            out = fn(*leaves)
            grads = torch.autograd.grad(out.float().sum(), leaves)
            ref_leaves = [t.detach().double().requires_grad_() for t in rounded]
            ref_out = ref(*ref_leaves)
            ref_grads = torch.autograd.grad(ref_out.sum(), ref_leaves)
            for got, want in zip([out, *grads], [ref_out, *ref_grads], strict=True):
                tol = _TOLERANCE[dtype] * max(1.0, want.abs().max().item())
                torch.testing.assert_close(got.double().cpu(), want, rtol=_TOLERANCE[dtype], atol=tol)
            results[f"{name} {str(dtype)[6:]}"] = "ok"
        except Exception as error:  # reported, not raised: the report goes on to the next op
            results[f"{name} {str(dtype)[6:]}"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"

    scan = (torch.randn(b, S * D, L), torch.rand(b, S * D, L), -torch.rand(S * D, 2) - 0.5, torch.randn(b, S, 2, L),
            torch.randn(b, S, 2, L))
    gather = (torch.randn(b, S, D, L), 3 * torch.randn(b, S, 4, L), torch.randn(b, S, 4, L))
    conv = (torch.randn(b, 5, 9, 11), torch.randn(2, 5, 3, 3))
    for dtype in _TOLERANCE:
        check("selective_scan", lambda *x: mao.selective_scan(*x, delta_softplus=True),
              lambda *x: reference.selective_scan(*x, delta_softplus=True), scan, dtype)
        check("state_gather", mao.state_gather, reference.state_gather, gather, dtype)
        check("multi_dilation_dwconv2d", mao.multi_dilation_dwconv2d, reference.multi_dilation_dwconv2d, conv, dtype)
    return results


def run_child(command: list[str]) -> tuple[dict | None, str]:
    """Runs `command`, which prints one JSON object as its last line: (that object, "") or (None, what went wrong:
    its exit status or signal and the end of its output)."""
    proc = subprocess.run(command, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1]), ""
    status = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return None, f"crashed ({status})" + (": " + " | ".join(tail) if tail else "")


def collect() -> dict:
    built = build_info()
    found = gpus(built["cuda_archs"])
    devices = ["cpu"] + [f"cuda:{g['index']}" for g in found]
    tests = {}
    for device in devices:
        result, failure = run_child([sys.executable, "-m", "mamba_adaptor_ops", "--self-test", device])
        tests[device] = result if result is not None else {"process": failure}
    return {
        "mamba_adaptor_ops": {"version": mao.__version__, "path": os.path.dirname(mao.__file__)},
        "build": built,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": f"{platform.system()} {platform.machine()}, glibc {platform.libc_ver()[1] or '?'}",
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda or ""},
        "cuda_kernels": {
            "built": mao.CUDA_KERNELS_BUILT,
            "loaded": mao.CUDA_KERNELS_LOADED,
            "error": CUDA_KERNELS_ERROR or "",
        },
        "gpus": found,
        "self_test": tests,
    }


def format_report(info: dict) -> str:
    b = info["build"]
    cuda_build = f"{b['cuda_compiler']} for {b['cuda_archs']}" if b["cuda_compiler"] else "none"
    kernels = info["cuda_kernels"]
    if not kernels["built"]:
        cuda_state = "not built"
    elif not kernels["loaded"]:
        cuda_state = f"not loaded: {kernels['error']}"
    else:
        cuda_state = "loaded" + ("" if info["gpus"] else "; no GPU that torch can use here")
    lines = [
        f"mamba_adaptor_ops {info['mamba_adaptor_ops']['version']} ({info['mamba_adaptor_ops']['path']})",
        f"  built with      torch {b['torch_version'] or '?'} headers (stable ABI of torch >= "
        f"{b['torch_target'] or '?'}), {b['cxx_compiler'] or '?'}; CUDA: {cuda_build}",
        f"  running on      {info['python']}, {info['platform']}",
        f"  torch           {info['torch']['version']} (CUDA {info['torch']['cuda'] or 'none'})",
        f"  CUDA kernels    {cuda_state}",
    ]
    for gpu in info["gpus"]:
        cover = (f"runs {gpu['covered_by']}" if gpu["covered_by"] else
                 f"NOT covered by {b['cuda_archs']}: rebuild with MAMBA_ADAPTOR_CUDA_ARCHS={gpu['arch'][3:]}")
        lines.append(f"  GPU {gpu['index']}           {gpu['name']}, {gpu['arch']}: {cover}")
    for device, results in info["self_test"].items():
        summary = "ok" if all(r == "ok" for r in results.values()) else "FAILED"
        lines.append(f"  self-test {device:<5} {summary}")
        lines += [f"    {op}: {r}" for op, r in results.items() if r != "ok"]
    return "\n".join(lines)


def passed(info: dict) -> bool:
    return all(r == "ok" for results in info["self_test"].values() for r in results.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mamba_adaptor_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--self-test", metavar="DEVICE", help=argparse.SUPPRESS)  # the child process of collect()
    args = parser.parse_args(argv)
    if args.self_test:
        try:
            print(json.dumps(self_test(args.self_test)))
        except Exception:
            traceback.print_exc()
            return 1
        return 0
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0 if passed(info) else 1
