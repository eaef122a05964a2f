"""Device profiles: what a target machine offers, as data in `edgepeft/data/devices/*.toml`.

    load_profile("raspberry-pi-5-8gb")          a name ─► profile_dirs(): EDGEPEFT_DEVICES
    load_profile("path/to/board.toml")          folders, the user's folder, the shipped
                                                profiles ─► TOML ─► checked ─► DeviceProfile
    load_profile("local")                       this machine, measured now (detect_local), with
                                                the keys of a local.toml found there over it
                                                (the decode efficiency bench_plan.py calibrated
                                                into calibration_path(), ...)

    DeviceProfile ─► runtime: providers (onnxruntime names, preference order), threads
                  ─► edgepeft.plan: memory, reserved, bandwidth, efficiency, weight formats

A profile file holds these keys (edgepeft/data/devices/README.md shows a whole file):

    name, description                   strings
    memory, reserved                    sizes: "8GiB", "512MiB", "8GB" (10^9) or bytes
    memory_kind                         "system" | "unified" (CPU and GPU share it) | "vram"
    bandwidth_gbs                       memory bandwidth in GB/s (10^9 bytes/s)
    bandwidth_kind                      "peak" (vendor figure) | "measured" (a copy test)
    cores, threads                      ints; threads: onnxruntime intra-op threads
    providers                           execution providers, preference order; short names
                                        ("CUDA", "XNNPACK", "CPU", ...) or onnxruntime's own
    weight_formats                      preferred export weight formats, best first
    efficiency                          share of bandwidth_gbs one decode step reaches
    runtime_overhead                    size: process + runtime libraries (+ CUDA context)
    host_memory                         size, optional: system RAM beside a GPU's VRAM
    torch_device                        "cpu" | "cuda": where `edgepeft plan --train` trains
    last_level_cache                    size, optional

Only the standard library and edgepeft's torch-free settings and vocab are imported here
(the device runtime imports this module); `detect_local` imports numpy and onnxruntime
when it runs.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from edgepeft.settings import format_size, parse_size, read_toml
from edgepeft.vocab import WEIGHT_FORMATS

DEVICES_DIR = Path(__file__).resolve().parent / "data" / "devices"
"""The profiles shipped inside the package (package data: the wheel holds them)."""
ENV_VAR = "EDGEPEFT_DEVICES"
"""Extra profile folders (os.pathsep-separated), searched first."""
LOCAL = "local"
FILE_KIND = "device profile"
"""How errors name a profile file ("device profile path/to/board.toml: ...")."""

PROVIDER_NAMES = {
    "TensorRT": "TensorrtExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "MIGraphX": "MIGraphXExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "QNN": "QNNExecutionProvider",
    "NNAPI": "NnapiExecutionProvider",
    "XNNPACK": "XnnpackExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "WebGPU": "WebGpuExecutionProvider",
    "CPU": "CPUExecutionProvider",
}
"""Short name -> onnxruntime's provider name; a profile may use either."""
CPU_PROVIDER = PROVIDER_NAMES["CPU"]
MEMORY_KINDS = ("system", "unified", "vram")
BANDWIDTH_KINDS = ("peak", "measured")
TORCH_DEVICES = ("cpu", "cuda")

DEFAULT_EFFICIENCY = {"peak": 0.4, "measured": 0.5}
"""Share of the profile's bandwidth a batch-1 decode step reaches, when a profile names none.

"measured" (a copy test on this machine): 0.5, what the fused int4 graphs reached on the
2-core x86 machine edgepeft is developed on before calibration (scripts/bench_plan.py
calibrates it per machine into calibration_path()). "peak" (a vendor's figure): 0.4,
because a memory system sustains roughly 60-80% of its peak in STREAM-like copies and the
decode kernels reach a part of that; an estimate, not a measurement.
"""
DEFAULT_RUNTIME_OVERHEAD = 56 * 2**20
"""Resident memory that is not the model's: Python + numpy + onnxruntime imported (44 MiB
VmRSS on x86-64 Linux, onnxruntime 1.31) and one session's own structures, thread pool and
first arena chunks (~12 MiB, measured with a tiny graph)."""


def accelerator_for(providers: tuple[str, ...] | list[str]) -> str:
    """Where the fused graph's contrib ops (MatMulNBits, GroupQueryAttention) run with these
    onnxruntime providers: "cuda" when CUDA or TensorRT is among them, else "cpu" (CoreML,
    QNN, NNAPI, XNNPACK, OpenVINO and DirectML hand those nodes back to the CPU provider)."""
    cuda = (PROVIDER_NAMES["CUDA"], PROVIDER_NAMES["TensorRT"])
    return "cuda" if any(p in cuda for p in providers) else "cpu"


@dataclass(frozen=True)
class DeviceProfile:
    """One target device (see the module docstring for the file format)."""

    name: str
    description: str
    memory: int
    """Bytes of RAM, unified memory, or VRAM (memory_kind)."""
    memory_kind: str
    reserved: int
    """Bytes the OS, display and other apps keep; the plan budgets memory - reserved."""
    bandwidth: float
    """Bytes per second (bandwidth_kind says peak or measured)."""
    bandwidth_kind: str
    cores: int
    threads: int | None
    """onnxruntime intra-op threads (None: onnxruntime's default)."""
    providers: tuple[str, ...]
    """onnxruntime execution provider names, preferred first."""
    weight_formats: tuple[str, ...]
    efficiency: float
    """Share of `bandwidth` a batch-1 decode step reaches."""
    runtime_overhead: int
    host_memory: int | None = None
    torch_device: str = "cpu"
    last_level_cache: int | None = None
    source: str = ""
    """File the profile came from, or "detected"."""

    @property
    def budget(self) -> int:
        """Bytes a model may use: memory - reserved."""
        return self.memory - self.reserved

    @property
    def accelerator(self) -> str:
        """Where the fused graph's contrib ops run: "cuda" or "cpu" (see `accelerator_for`)."""
        return accelerator_for(self.providers)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["providers"] = list(self.providers)
        out["weight_formats"] = list(self.weight_formats)
        return out


# ---------------------------------------------------------------- schema


@dataclass(frozen=True)
class _Key:
    kind: str
    """"str", "int", "float", "size", "list" (of strings)."""
    required: bool
    choices: tuple[str, ...] = ()


_SCHEMA: dict[str, _Key] = {
    "name": _Key("str", True),
    "description": _Key("str", True),
    "memory": _Key("size", True),
    "memory_kind": _Key("str", True, MEMORY_KINDS),
    "reserved": _Key("size", False),
    "bandwidth_gbs": _Key("float", True),
    "bandwidth_kind": _Key("str", True, BANDWIDTH_KINDS),
    "cores": _Key("int", True),
    "threads": _Key("int", False),
    "providers": _Key("list", True),
    "weight_formats": _Key("list", True, WEIGHT_FORMATS),
    "efficiency": _Key("float", False),
    "runtime_overhead": _Key("size", False),
    "host_memory": _Key("size", False),
    "torch_device": _Key("str", False, TORCH_DEVICES),
    "last_level_cache": _Key("size", False),
    "calibrated": _Key("str", False),
}
"""Every key a profile file may hold. `calibrated`: where/when `efficiency` was measured."""
_EXPECTED = {
    "str": "a string",
    "int": "a positive integer",
    "float": "a positive number",
    "size": "a size such as \"8GiB\" or a byte count",
    "list": "a non-empty list of strings",
}


def _provider_name(name: str, where: str) -> str:
    if name in PROVIDER_NAMES.values():
        return name
    for short, full in PROVIDER_NAMES.items():
        if name.lower() == short.lower():
            return full
    if name.endswith("ExecutionProvider"):
        return name  # a provider this table does not list yet; onnxruntime will judge it
    raise ValueError(
        f"{where}: unknown execution provider {name!r}; use onnxruntime's name "
        f"(...ExecutionProvider) or one of {sorted(PROVIDER_NAMES)}"
    )


def _check_value(key: str, value, where: str):
    """The value of `key` converted to the profile's type; ValueError naming file and key."""
    spec = _SCHEMA[key]
    bad = ValueError(
        f"{where}: key {key!r} must be {_EXPECTED[spec.kind]}"
        + (f" from {list(spec.choices)}" if spec.choices else "")
        + f", got {value!r}"
    )
    if spec.kind == "str":
        if not isinstance(value, str) or not value:
            raise bad
        if spec.choices and value not in spec.choices:
            raise bad
        return value
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad
        return value
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise bad
        return float(value)
    if spec.kind == "size":
        try:
            return parse_size(value, f"{where}: key {key!r}")
        except ValueError:
            raise bad from None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise bad
    if spec.choices and any(v not in spec.choices for v in value):
        raise bad
    if key == "providers":
        return tuple(_provider_name(v, f"{where}: key 'providers'") for v in value)
    return tuple(value)


def _checked(data: dict, where: str, partial: bool = False) -> dict:
    """Validated values by key; `partial` (a local.toml) makes no key required."""
    unknown = sorted(set(data) - set(_SCHEMA))
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {unknown}; a device profile holds {sorted(_SCHEMA)}"
        )
    if not partial:
        missing = [k for k, spec in _SCHEMA.items() if spec.required and k not in data]
        if missing:
            raise ValueError(
                f"{where}: missing key(s) {missing} (see {DEVICES_DIR / 'README.md'})"
            )
    return {key: _check_value(key, value, where) for key, value in data.items()}


def _profile(values: dict, source: str) -> DeviceProfile:
    kind = values["bandwidth_kind"]
    reserved = values.get("reserved", 0)
    if reserved >= values["memory"]:
        raise ValueError(
            f"{source}: reserved ({format_size(reserved)}) must be less than memory "
            f"({format_size(values['memory'])})"
        )
    efficiency = values.get("efficiency", DEFAULT_EFFICIENCY[kind])
    if efficiency > 1.5:
        raise ValueError(f"{source}: efficiency {efficiency} is a share of the bandwidth (0..1.5)")
    return DeviceProfile(
        name=values["name"],
        description=values["description"],
        memory=values["memory"],
        memory_kind=values["memory_kind"],
        reserved=reserved,
        bandwidth=values["bandwidth_gbs"] * 1e9,
        bandwidth_kind=kind,
        cores=values["cores"],
        threads=values.get("threads"),
        providers=values["providers"],
        weight_formats=values["weight_formats"],
        efficiency=efficiency,
        runtime_overhead=values.get("runtime_overhead", DEFAULT_RUNTIME_OVERHEAD),
        host_memory=values.get("host_memory"),
        torch_device=values.get("torch_device", "cpu"),
        last_level_cache=values.get("last_level_cache"),
        source=source,
    )


def read_profile(path: str | os.PathLike) -> DeviceProfile:
    """A profile from one TOML file, every key checked (ValueError names file and key)."""
    path = Path(path)
    return _profile(_checked(read_toml(path, FILE_KIND), f"{FILE_KIND} {path}"), str(path))


# ---------------------------------------------------------------- lookup


def user_dir() -> Path:
    """The user's own profile folder: $XDG_CONFIG_HOME/edgepeft/devices (~/.config/...)."""
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config).expanduser() / "edgepeft" / "devices"


def profile_dirs() -> list[Path]:
    """Where names are looked up, first match wins: the EDGEPEFT_DEVICES folders, the user's
    folder (user_dir), then the profiles shipped in the package (DEVICES_DIR)."""
    extra = [Path(p).expanduser() for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*extra, user_dir(), DEVICES_DIR]


def calibration_path() -> Path:
    """Where a calibration of `local` is written: local.toml in the first folder names are
    looked up in, so `load_profile("local")` finds it (never in the installed package)."""
    return profile_dirs()[0] / f"{LOCAL}.toml"


def list_profiles() -> list[str]:
    """Names of every profile `load_profile` finds, "local" included."""
    names = {LOCAL}
    for folder in profile_dirs():
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.toml"))
    return sorted(names)


def _find(name: str) -> Path | None:
    for folder in profile_dirs():
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate
    return None


def load_profile(name_or_path: str | os.PathLike | DeviceProfile) -> DeviceProfile:
    """A profile by name ("raspberry-pi-5-8gb", "local") or by path to a TOML file.

    Raises:
        FileNotFoundError: no such file or name (the message lists the names found).
        ValueError: a key is missing, unknown or of the wrong type.
    """
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix == ".toml" or os.sep in text or path.is_file():
        return read_profile(path)
    if text == LOCAL:
        return local_profile()
    found = _find(text)
    if found is None:
        raise FileNotFoundError(
            f"no device profile {text!r} in {', '.join(str(d) for d in profile_dirs())}; "
            f"known: {', '.join(list_profiles())}. Add a file {text}.toml to {user_dir()} "
            f"(or to a folder named in ${ENV_VAR}), or pass a path to a .toml file"
        )
    return read_profile(found)


def available_providers(profile: DeviceProfile) -> list[str]:
    """The profile's providers this onnxruntime has, in its order, CPU last."""
    try:
        import onnxruntime
    except ImportError:
        return [CPU_PROVIDER]
    have = set(onnxruntime.get_available_providers())
    chosen = [p for p in profile.providers if p in have and p != CPU_PROVIDER]
    return [*chosen, CPU_PROVIDER]


# ---------------------------------------------------------------- this machine


def _meminfo() -> dict[str, int]:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return {}
    return {m.group(1): int(m.group(2)) * 1024 for m in re.finditer(r"(\w+):\s+(\d+) kB", text)}


def _total_memory() -> int:
    info = _meminfo()
    if "MemTotal" in info:
        return info["MemTotal"]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _available_memory(total: int) -> int:
    """MemAvailable where Linux reports it; else three quarters of the total."""
    return _meminfo().get("MemAvailable", total * 3 // 4)


def last_level_cache() -> int:
    """Bytes of the largest CPU cache (Linux sysfs, macOS sysctl); 32 MiB if unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            sizes.append(parse_size(f.read_text().strip().replace("K", "KiB").replace("M", "MiB")))
        except (OSError, ValueError):
            continue
    if not sizes and sys.platform == "darwin":
        import subprocess

        for key in ("hw.l3cachesize", "hw.l2cachesize"):
            out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout) > 0:
                sizes.append(int(out.stdout))
                break
    return max(sizes) if sizes else 32 * 2**20


def measure_bandwidth(
    threads: int | None = None, nbytes: int | None = None, repeats: int = 5
) -> float:
    """Memory bandwidth in bytes/s: a numpy copy of a buffer well beyond the last-level cache.

    The buffer (8x the LLC, at least 64 MiB, at most 512 MiB or an eighth of the free
    memory) is copied in `threads` slices at once (numpy releases the GIL while copying);
    best of `repeats`. Each copy reads and writes every byte, counted twice as STREAM's
    "copy" does. Well under a second on a laptop.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = threads or os.cpu_count() or 1
    if nbytes is None:
        free = _available_memory(_total_memory())
        nbytes = min(max(8 * last_level_cache(), 64 * 2**20), 512 * 2**20, max(free // 8, 2**20))
    src = np.ones(nbytes, np.uint8)  # written, so every page is really there
    dst = np.zeros(nbytes, np.uint8)
    bounds = [(i * nbytes // threads, (i + 1) * nbytes // threads) for i in range(threads)]

    def copy(bound: tuple[int, int]) -> None:
        np.copyto(dst[bound[0] : bound[1]], src[bound[0] : bound[1]])

    import time

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(copy, bounds))
            best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


@functools.lru_cache(maxsize=1)
def detect_local() -> DeviceProfile:
    """This machine: cores, memory (reserved = what is in use now), onnxruntime's providers,
    and bandwidth measured by `measure_bandwidth`. Cached per process."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    total = _total_memory()
    try:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    except ImportError:
        providers = (CPU_PROVIDER,)
    # Azure is a remote-inference provider, not a place the graph runs.
    skip = (CPU_PROVIDER, "AzureExecutionProvider")
    providers = tuple(p for p in providers if p not in skip) + (CPU_PROVIDER,)
    cuda = PROVIDER_NAMES["CUDA"] in providers
    return DeviceProfile(
        name=LOCAL,
        description=f"this machine ({sys.platform}, {cores} cores), measured now",
        memory=total,
        memory_kind="system",
        reserved=max(total - _available_memory(total), 0),
        bandwidth=measure_bandwidth(cores),
        bandwidth_kind="measured",
        cores=cores,
        threads=cores,
        providers=providers,
        weight_formats=("int4", "int8", *(("fp16", "nf4") if cuda else ())),
        efficiency=DEFAULT_EFFICIENCY["measured"],
        runtime_overhead=DEFAULT_RUNTIME_OVERHEAD,
        torch_device="cuda" if cuda else "cpu",
        last_level_cache=last_level_cache(),
        source="detected",
    )


def local_profile(overrides: str | os.PathLike | None = None) -> DeviceProfile:
    """`detect_local()` with the keys of a local.toml over it (found like any profile name;
    it usually holds `efficiency`, calibrated by scripts/bench_plan.py)."""
    profile = detect_local()
    path = Path(overrides) if overrides is not None else _find(LOCAL)
    if path is None or not path.is_file():
        return profile
    where = f"{FILE_KIND} {path}"
    values = _checked(read_toml(path, FILE_KIND), where, partial=True)
    values.pop("calibrated", None)
    if "bandwidth_gbs" in values:
        values["bandwidth"] = values.pop("bandwidth_gbs") * 1e9
    if values.get("efficiency", 0) > 1.5:
        raise ValueError(f"{where}: efficiency {values['efficiency']} is a share (0..1.5)")
    return replace(profile, **values, source=f"detected + {path}")


__all__ = [
    "DEFAULT_EFFICIENCY",
    "DEVICES_DIR",
    "DeviceProfile",
    "accelerator_for",
    "available_providers",
    "calibration_path",
    "detect_local",
    "format_size",
    "list_profiles",
    "load_profile",
    "local_profile",
    "measure_bandwidth",
    "parse_size",
    "profile_dirs",
    "read_profile",
    "user_dir",
]
