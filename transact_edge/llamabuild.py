"""Build llama.cpp's own tools (llama-bench, llama-completion, llama-perplexity, llama-quantize, llama-imatrix)
for a target.

The source is the sdist of the installed llama-cpp-python version, so the binaries run the same
llama.cpp as the Python runtime. Builds are static, cached under $TRANSACT_EDGE_BUILDS (default
~/.cache/transact_edge/builds) keyed by version and target, and reused when complete. Alongside the
tools each build holds `membw`, the memory-bandwidth probe used by the roofline (data/membw.c).

In this llama.cpp version the classic one-shot `llama-cli` is `llama-completion`; the new
`llama-cli` is a chat client built on the server, which we do not build.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transact_edge.checkpoint import atomic_dir, atomic_file
from transact_edge.lock import claim, held
from transact_edge.errors import UserError

TOOLS = ("llama-bench", "llama-completion", "llama-perplexity", "llama-quantize", "llama-imatrix")
DEVICE_TOOLS = ("llama-bench", "llama-completion")  # all `bench` runs on a device (speed, then the greedy check)
# These VMs advertise AMX but fault on its instructions (SIGILL in ggml's tileloadd); the README
# builds llama-cpp-python with the same flags, so native tools and the Python runtime match.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
COMMON = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
          "-DLLAMA_OPENSSL=OFF", "-DGGML_OPENMP=OFF"]


@dataclass(frozen=True)
class Target:
    """How to configure one target: CMake arguments, the C compiler for membw, and its runner."""
    cmake: tuple[str, ...]
    cc: str
    cflags: str = ""
    membw_flags: str = ""        # for the probe: vectorised loads like ggml's kernels
    needs_ndk: bool = False
    machine: str = ""            # `uname -m` of devices this build runs on
    tools: tuple[str, ...] = TOOLS  # cross builds: only what a device runs (quantize and score here)


def _ndk_clang(ndk: str) -> str:
    return str(Path(ndk) / "toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android28-clang")


TARGETS: dict[str, Target] = {
    "native": Target(cmake=("-DGGML_NATIVE=ON",), cc="cc",
                     cflags=NO_AMX if platform.machine() == "x86_64" else "", membw_flags="-march=native",
                     machine=platform.machine()),
    # x86-64 without -march=native, statically linked: runs on another x86-64 host (e.g. a GPU machine
    # that scores the frontier's GGUFs where they were made)
    "x86-64-portable": Target(cmake=("-DGGML_NATIVE=OFF", "-DCMAKE_EXE_LINKER_FLAGS=-static"), cc="cc",
                              cflags=NO_AMX, machine="x86_64"),
    "aarch64-linux-gnu": Target(
        cmake=("-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
               "-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc", "-DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++",
               "-DGGML_NATIVE=OFF", "-DCMAKE_EXE_LINKER_FLAGS=-static"),
        cc="aarch64-linux-gnu-gcc", machine="aarch64", tools=DEVICE_TOOLS),
    # llama.cpp's docs/android.md recipe
    "android-arm64": Target(
        cmake=("-DANDROID_ABI=arm64-v8a", "-DANDROID_PLATFORM=android-28", "-DGGML_NATIVE=OFF",
               "-DGGML_LLAMAFILE=OFF"),
        cc="", needs_ndk=True, machine="aarch64", tools=DEVICE_TOOLS),
}


def version() -> str:
    return importlib.metadata.version("llama-cpp-python")


def builds_root() -> Path:
    return Path(os.environ.get("TRANSACT_EDGE_BUILDS", Path.home() / ".cache" / "transact_edge" / "builds"))


def bin_dir(target: str) -> Path:
    """Keyed by llama-cpp-python version, target, and a digest of how it is built."""
    recipe = repr((COMMON, TARGETS[target])) + (Path(__file__).parent / "data" / "membw.c").read_text()
    digest = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    return builds_root() / f"llama.cpp-{version()}" / f"{target}-{digest}" / "bin"


def find(target: str, tool: str = "llama-bench") -> Path | None:
    """The built tool for a target, or None when `build-llama` has not been run for it."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    path = bin_dir(target) / tool
    return path if path.is_file() else None


def vendored_source() -> Path:
    """llama.cpp as vendored in the installed llama-cpp-python's sdist (fetched once with pip)."""
    root = builds_root() / "sdist" / f"llama_cpp_python-{version()}"
    source = root / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                   f"llama-cpp-python=={version()}", "-d", tmp], capture_output=True, text=True)
            if proc.returncode:
                raise UserError(f"cannot fetch the llama-cpp-python {version()} sdist: "
                                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
            with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
                tar.extractall(root.parent, filter="data")
    return source


def _require(program: str, why: str) -> None:
    if shutil.which(program) is None:
        raise UserError(f"{program} not found ({why})")


def published(target: str) -> tuple[str, ...]:
    """The files a target's build publishes: its tools and the bandwidth probe."""
    return (*TARGETS[target].tools, "membw")


def _complete(out: Path, target: str) -> bool:
    return all((out / t).is_file() for t in published(target))


def build(target: str, ndk: str | None = None, jobs: int | None = None, force: bool = False) -> Path:
    """Configure and build the tools for `target`; return the directory holding them.

    Concurrent builds of one target take turns (the second finds the first's result); the tools are
    published by one rename, so a build killed at any moment leaves either the old set or none."""
    if target not in TARGETS:
        raise UserError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    out = bin_dir(target)
    out.parent.mkdir(parents=True, exist_ok=True)
    with claim(out, wait=True):  # also sweeps what a killed build left, when the cached one is reused
        if not force and _complete(out, target):  # cached, or built by the run we waited for
            return out
        _require("cmake", "install cmake")
        cmake, cc = _configure_args(target, ndk)
        source = vendored_source()
        work = out.parent / "cmake-build"
        _run(["cmake", "-S", str(source), "-B", str(work), *cmake], f"configure {target}")
        _run(["cmake", "--build", str(work), "--target", *TARGETS[target].tools, "-j", str(jobs or os.cpu_count() or 1)],
             f"build {target}")
        with atomic_dir(out, force=True) as staging:
            for tool in TARGETS[target].tools:
                shutil.copy2(work / "bin" / tool, staging / tool)
            _compile_membw(target, cc, staging / "membw")
    return out


def _configure_args(target: str, ndk: str | None) -> tuple[list[str], str]:
    """CMake arguments and the C compiler (for membw) of a target."""
    spec = TARGETS[target]
    cmake = list(COMMON) + list(spec.cmake)
    cc = spec.cc
    if spec.needs_ndk:
        ndk = ndk or os.environ.get("ANDROID_NDK") or os.environ.get("ANDROID_NDK_HOME")
        if not ndk or not (Path(ndk) / "build/cmake/android.toolchain.cmake").is_file():
            raise UserError("android-arm64 needs the Android NDK: pass --ndk PATH or set ANDROID_NDK")
        cmake.append(f"-DCMAKE_TOOLCHAIN_FILE={Path(ndk) / 'build/cmake/android.toolchain.cmake'}")
        cc = _ndk_clang(ndk)
    elif cc != "cc":
        _require(cc, "install gcc-aarch64-linux-gnu and g++-aarch64-linux-gnu")
    if spec.cflags:
        cmake += [f"-DCMAKE_C_FLAGS={spec.cflags}", f"-DCMAKE_CXX_FLAGS={spec.cflags}"]
    if shutil.which("ninja"):
        cmake += ["-G", "Ninja"]
    return cmake, cc


def _compile_membw(target: str, cc: str, out: Path) -> None:
    spec = TARGETS[target]
    static = ["-static"] if target != "native" and not spec.needs_ndk else []
    _run([cc, "-O3", "-pthread", *spec.cflags.split(), *spec.membw_flags.split(),
          str(Path(__file__).parent / "data" / "membw.c"), "-o", str(out), *static], f"compile membw for {target}")


def membw(target: str) -> Path | None:
    """The bandwidth probe for a target: from its build, or (native) compiled on demand with cc."""
    if target not in TARGETS:
        return None
    built = bin_dir(target) / "membw"
    if built.is_file():
        return built
    if target != "native" or shutil.which("cc") is None:
        return None
    out = builds_root() / "membw-native" / "membw"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:
            _compile_membw(target, "cc", tmp)
    return out


def _run(cmd: list[str], what: str) -> None:
    """Run a build step with its output streamed to the terminal; fail with one line."""
    print(f"[build-llama] {what}: {' '.join(cmd[:3])} ...", file=sys.stderr, flush=True)
    # fd 2: stdout stays for results; the lock goes with the child, which may outlive a killed parent
    proc = subprocess.run(cmd, stdout=2, stderr=subprocess.STDOUT, pass_fds=held())
    if proc.returncode:
        raise UserError(f"build-llama: {what} failed (exit {proc.returncode}); see the output above")
