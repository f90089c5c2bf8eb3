"""Builds the library's CUDA kernels for the CPU emulator (emu.h): a torch library whose ops,
torch.ops.mamba_adaptor_emu.*, run the CUDA registration, argument checks, launchers and kernels of cuda/ on
CPU tensors. Tests only; the wheel never contains it.

The sources are copied and rewritten where C++ cannot read CUDA (launches, shared memory), the registrations
are moved to the CPU dispatch key of the mamba_adaptor_emu namespace, and everything is compiled with g++
against the CUDA headers (no GPU, driver or libcudart needed). Builds are cached under build/cuda-emu/ by a
hash of the inputs. Variants: "address" (AddressSanitizer, UBSan's alignment check), "thread" (ThreadSanitizer:
the racecheck) and "traffic" (ThreadSanitizer's instrumentation counting global memory traffic: emu.cpp's
traffic).

    python tests/cuda_emu/build.py [--variant address|thread|traffic]   # prints the path of the built library
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
TORCH_TARGET_VERSION = "0x020a000000000000"  # as CMakeLists.txt
LIBRARY = "libmamba_adaptor_emu.so"
CUDA_ARCHS = "80-real,90-real,90-virtual"  # as CMakeLists.txt's default; emu.cpp runs kernels on sm_80 and newer


def available() -> str | None:
    """None when the emulator can be built here, else why not."""
    if shutil.which("g++") is None:
        return "needs g++"
    if not (CUDA_HOME / "include" / "cuda_runtime.h").exists():
        return f"needs the CUDA headers ({CUDA_HOME}/include; set CUDA_HOME)"
    if sysconfig.get_config_var("HOST_GNU_TYPE") and "x86_64" not in sysconfig.get_config_var(
        "HOST_GNU_TYPE"
    ):
        return "the emulator's thread switch is x86-64 assembly"
    return None


# ---- source rewriting --------------------------------------------------------------------------------------


def _kernel_expression_start(text: str, end: int) -> int:
    """Start of the kernel expression ending at `end` (just before `<<<`): a name, possibly qualified, with
    template arguments, e.g. `conv_kernel<T, decltype(k)::value>`."""
    i = end
    while True:
        while i > 0 and text[i - 1].isspace():
            i -= 1
        if text[i - 1] == ">":
            depth = 0
            while True:
                i -= 1
                depth += {">": 1, "<": -1}.get(text[i], 0)
                if depth == 0:
                    break
        j = i
        while j > 0 and (text[j - 1].isalnum() or text[j - 1] in "_:"):
            j -= 1
        if j == i:
            raise ValueError(f"cannot read the kernel before <<< at offset {end}")
        return j


def rewrite_launches(text: str) -> str:
    """k<<<grid, block, smem, stream>>>(args) -> ::emu::Launch(grid, block, smem, stream).run(k, args)."""
    while (start := text.find("<<<")) >= 0:
        close = text.index(">>>", start)
        paren = close + 3
        while text[paren].isspace():
            paren += 1
        assert text[paren] == "(", "a launch's >>> is followed by its arguments"
        k0 = _kernel_expression_start(text, start)
        kernel, config = text[k0:start].strip(), text[start + 3 : close]
        rest = text[paren + 1 :]
        separator = "" if rest.lstrip().startswith(")") else ", "
        text = f"{text[:k0]}::emu::Launch({config}).run({kernel}{separator}{rest}"
    return text


_SHARED_SITES = iter(range(1, 1 << 30))


def rewrite_shared(text: str) -> str:
    text = re.sub(
        r"extern\s+__shared__\s+([\w:]+)\s+(\w+)\[\];",
        lambda m: f"{m[1]}* {m[2]} = ::emu::dynamic_shared<{m[1]}>();",
        text,
    )
    return re.sub(
        r"__shared__\s+([\w:]+)\s+(\w+)\[(.+?)\];",
        lambda m: f"auto& {m[2]} = ::emu::static_shared<{m[1]}[{m[3]}]>({next(_SHARED_SITES)});",
        text,
    )


def namespace(variant: str | None) -> str:
    """The emulated ops' namespace: torch.ops.mamba_adaptor_emu, or mamba_adaptor_emu_traffic for the traffic
    build, which is loaded next to a plain one."""
    return "mamba_adaptor_emu_traffic" if variant == "traffic" else "mamba_adaptor_emu"


def rewrite_registration(text: str, ns: str) -> str:
    """The CUDA registration as CPU ops of namespace `ns`: the same checks, params and launches."""
    text = text.replace(
        "STABLE_TORCH_LIBRARY_IMPL(mamba_adaptor, CUDA, m)", f"STABLE_TORCH_LIBRARY_IMPL({ns}, CPU, m)"
    )
    return text.replace("Backend::CUDA", "Backend::CPU")


def schemas(cpp: Path, ns: str) -> str:
    """The op schemas of cpp/*.cpp, defined again in namespace `ns`."""
    defs = []
    for source in sorted(cpp.glob("*.cpp")):
        for block in re.findall(
            r"STABLE_TORCH_LIBRARY_FRAGMENT\(mamba_adaptor, m\) \{(.*?)\n\}", source.read_text(), re.S
        ):
            defs.append(block)
    if not defs:
        raise RuntimeError("no op schema found in cpp/*.cpp")
    return (
        f"#include <torch/csrc/stable/library.h>\n\nSTABLE_TORCH_LIBRARY_FRAGMENT({ns}, m) {{"
        + "".join(defs)
        + "\n}\n"
    )


CONTEXT_STUB = """// Emulator stand-in for cuda/context.h: no device to guard, no stream.
#pragma once
#include <torch/csrc/stable/tensor.h>
namespace mamba_adaptor {
class CudaScope {
 public:
  explicit CudaScope(const torch::stable::Tensor&) {}
  void* stream() const { return nullptr; }
};
}  // namespace mamba_adaptor
"""


def prepare_sources(src: Path, ns: str) -> list[Path]:
    """Copies cpp/ and cuda/ into `src`, rewritten for ops in namespace `ns`; returns the files to compile."""
    shutil.copytree(ROOT / "cpp", src / "cpp")
    (src / "cuda").mkdir()
    units = [src / "cpp" / "common" / "check.cpp", *sorted((src / "cpp").glob("*_args.cpp"))]
    for path in sorted((ROOT / "cuda").iterdir()):
        if path.name in ("context.cpp", "sources.cmake"):
            continue
        target = src / "cuda" / path.name
        text = path.read_text()
        if path.name == "context.h":
            text = CONTEXT_STUB
        elif path.suffix in (".cu", ".cuh"):
            text = rewrite_shared(rewrite_launches(text))
        elif path.suffix == ".cpp":
            text = rewrite_registration(text, ns)
        target.write_text(text)
        if path.suffix in (".cu", ".cpp"):
            units.append(target)
    (src / "schemas.cpp").write_text(schemas(ROOT / "cpp", ns))
    (src / "selftest.cu").write_text(rewrite_shared(rewrite_launches((EMU / "selftest.cu").read_text())))
    shutil.copy(EMU / "emu.cpp", src / "emu.cpp")
    return [*units, src / "schemas.cpp", src / "selftest.cu", src / "emu.cpp"]


# ---- compiling ---------------------------------------------------------------------------------------------


def _torch_paths() -> tuple[list[str], str]:
    from torch.utils import cpp_extension

    return cpp_extension.include_paths(), str(Path(cpp_extension.library_paths()[0]))


# Per variant: the flags of every unit but emu.cpp, emu.cpp's flags, and the link's flags.
_ASAN = ["-fsanitize=address,alignment", "-fno-sanitize-recover=alignment", "-fno-omit-frame-pointer"]
VARIANTS = {
    # A GPU faults on an access that is not aligned to its type's size (a float4 load off a 16-byte boundary):
    # UBSan's alignment check is that rule on the CPU.
    "address": (_ASAN, _ASAN, ["-fsanitize=address,alignment"]),
    # The racecheck build: emu.cpp, not instrumented itself, makes each emulated thread a TSan fiber.
    "thread": (["-fsanitize=thread"], ["-DEMU_RACECHECK"], ["-fsanitize=thread"]),
    # TSan's calls before each access, without its runtime: emu.cpp's counters take them. -g: traffic.py names
    # each call site's file and line.
    "traffic": (["-fsanitize=thread", "-g"], ["-DEMU_TRAFFIC"], []),
}


def _flags(src: Path, unit: Path, variant: str | None) -> list[str]:
    includes, _ = _torch_paths()
    flags = [
        "-std=c++17", "-O2", "-fPIC", "-fno-math-errno", "-Wno-unknown-pragmas", "-Wno-attributes",
        f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", "-DPy_LIMITED_API=0x030a0000",
        f"-DMAMBA_ADAPTOR_CUDA_ARCHS_BUILT=\"{CUDA_ARCHS}\"",
        f"-I{src / 'cpp'}", f"-I{src / 'cuda'}", f"-I{EMU}",
        *[f"-isystem{p}" for p in includes], f"-isystem{CUDA_HOME / 'include'}",
    ]  # fmt: skip
    if variant is None:
        return flags
    unit_flags, emu_flags, _ = VARIANTS[variant]
    return flags + (emu_flags if unit.name == "emu.cpp" else unit_flags)


def _inputs_hash(variant: str | None) -> str:
    digest = hashlib.sha256(f"{variant} {sys.version} {_torch_paths()}".encode())
    for folder in (ROOT / "cpp", ROOT / "cuda", EMU):
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix in (".h", ".cpp", ".cu", ".cuh", ".py"):
                digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build(variant: str | None = None, jobs: int | None = None, verbose: bool = False) -> Path:
    """The built library (cached): plain, or a `variant` of VARIANTS ("address", "thread", "traffic")."""
    reason = available()
    if reason:
        raise RuntimeError(f"cannot build the CUDA emulator: {reason}")
    if variant not in (None, *VARIANTS):
        raise ValueError(f"variant: expected one of {[None, *VARIANTS]}, got {variant!r}")
    out = ROOT / "build" / "cuda-emu" / ((f"{variant}-" if variant else "") + _inputs_hash(variant))
    library = out / LIBRARY
    if library.exists():
        return library
    work = out.with_name(out.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    units = prepare_sources(work / "src", namespace(variant))

    def compile_unit(unit: Path) -> Path:
        obj = work / (unit.parent.name + "_" + unit.name + ".o")
        language = ["-x", "c++", "-include", str(EMU / "emu.h")] if unit.suffix == ".cu" else []
        command = ["g++", *_flags(work / "src", unit, variant), *language, "-c", str(unit), "-o", str(obj)]
        if verbose:
            print(" ".join(command), flush=True)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {unit.name} for the emulator failed:\n{result.stderr[-6000:]}")
        return obj

    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        objects = list(pool.map(compile_unit, units))
    _, torch_lib = _torch_paths()
    # -Bsymbolic: the kernels' cudaGetDevice, cudaFuncSetAttribute, ... are emu.cpp's even in a process where a
    # CUDA build of torch has loaded the real libcudart (whose calls would fail without a GPU, or act on one).
    link = ["g++", "-shared", "-Wl,-Bsymbolic", "-o", str(work / LIBRARY), *map(str, objects), f"-L{torch_lib}",
            "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]  # fmt: skip
    if variant:
        link += VARIANTS[variant][2]
    result = subprocess.run(link, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"linking the emulator failed:\n{result.stderr[-6000:]}")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return library


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    print(build(variant=args.variant, verbose=args.verbose))
