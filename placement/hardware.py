"""Hardware description: GPUs, RAM, CPU, bandwidths. From flags, a saved probe profile, or detection
(psutil + /proc; no torch here: `offload probe` adds GPUs and measured bandwidths from torch.cuda)."""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from offload.errors import ConfigError, PlacementError

GiB = 1 << 30
GB = 1e9

# name substring -> (memory bandwidth GB/s, dense bf16 TFLOP/s): public spec sheets.
GPU_SPECS = {
    "H200": (4800, 989), "H100 PCIe": (2000, 756), "H100": (3350, 989), "A100-SXM4-40GB": (1555, 312),
    "A100": (2039, 312), "L40S": (864, 362), "RTX 6000 Ada": (960, 364), "A6000": (768, 155),
    "RTX 5090": (1792, 210), "RTX 4090": (1008, 165), "RTX 3090": (936, 71), "RTX 4080": (717, 97),
}
DEFAULT_GPU = (1000, 150)  # an RTX 4090-class card when only the memory size is known
DEFAULT_DRAM_BW = 60 * GB  # dual-channel DDR5, measured; servers reach 200-400 GB/s: measure it
DEFAULT_PCIE_BW = 25 * GB  # PCIe 4.0 x16 pinned host->device
DEFAULT_DISK_BW = 3 * GB  # one NVMe drive, sequential read
PROFILE_FORMAT = "offload.hardware"


@dataclass
class GPU:
    name: str
    memory_bytes: int  # the budget the planner may fill (free memory when probed)
    mem_bw: float = DEFAULT_GPU[0] * GB  # bytes/s
    tflops: float = DEFAULT_GPU[1]


@dataclass
class Hardware:
    gpus: list[GPU]
    ram_bytes: int
    dram_bw: float  # bytes/s, what one CPU socket's cores can read
    pcie_bw: float  # bytes/s host->device, pinned
    cpu_cores: int
    cpu_model: str = "unknown CPU"
    cpu_flags: list[str] = field(default_factory=list)  # avx2 / avx512f / amx_bf16 / amx_int8
    numa_nodes: int = 1
    cpu_tflops: float = 0.0  # sustained matmul throughput for prefill; 0 = estimate from cores and flags
    disk_bw: float = DEFAULT_DISK_BW
    source: str = "flags"  # flags | probe | detected
    notes: list[str] = field(default_factory=list)  # which values were assumed rather than measured
    # what this engine measured here (`offload probe`, offload/calibrate.py): per quant type "kernels"
    # {gemv_gbs, prefill_tflops}, decode "layer_s" / "token_s" fixed costs, "dram_gbs", "gpus", "source"
    calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ram_bytes <= 0:
            raise PlacementError(f"RAM size must be positive, got {self.ram_bytes} bytes")
        for g in self.gpus:
            if g.memory_bytes <= 0:
                raise PlacementError(f"GPU budget must be positive, got {fmt_bytes(g.memory_bytes)} for {g.name}")
        for key in ("dram_bw", "pcie_bw", "disk_bw"):
            if getattr(self, key) <= 0:
                raise PlacementError(f"{key} must be positive, got {getattr(self, key)}")
        if self.cpu_cores <= 0:
            raise PlacementError(f"cpu cores must be positive, got {self.cpu_cores}")
        if not self.cpu_tflops:
            self.cpu_tflops = estimate_cpu_tflops(self.cpu_cores, self.cpu_flags)

    def to_json(self) -> dict:
        return {"format": PROFILE_FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict, where: str = "hardware profile") -> Hardware:
        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            raise ConfigError(f"{where}: not an offload hardware profile (expected format {PROFILE_FORMAT!r})")
        try:
            gpus = [GPU(**g) for g in d["gpus"]]
            keys = {k: d[k] for k in ("ram_bytes", "dram_bw", "pcie_bw", "cpu_cores")}
            opt = {k: d[k] for k in ("cpu_model", "cpu_flags", "numa_nodes", "cpu_tflops", "disk_bw", "notes",
                                     "calibration") if k in d}
            if not isinstance(opt.get("calibration", {}), dict):
                raise TypeError("calibration is not an object")
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"{where}: missing or malformed field {exc}") from None
        return cls(gpus=gpus, source=d.get("source", "probe"), **keys, **opt)


def estimate_cpu_tflops(cores: int, flags: list[str]) -> float:
    """Sustained prefill matmul TFLOP/s on quantised weights. AMX: 4.2 TFLOP/s measured on 16
    Sapphire-Rapids cores (bf16, M=256); AVX-512 / AVX2 cores: FMA peak x ~50 %."""
    if "amx_bf16" in flags or "amx_int8" in flags:
        per_core = 0.25
    elif "avx512f" in flags:
        per_core = 0.06
    else:
        per_core = 0.03
    return cores * per_core


def gpu_specs(name: str) -> tuple[float, float]:
    """(bytes/s, TFLOP/s) for a GPU name; a 4090-class card when the name is unknown."""
    for key, (bw, tf) in GPU_SPECS.items():
        if key.lower() in name.lower():
            return bw * GB, tf
    return DEFAULT_GPU[0] * GB, DEFAULT_GPU[1]


_UNITS = {"": GiB, "b": 1, "k": 1 << 10, "kb": 1e3, "kib": 1 << 10, "m": 1 << 20, "mb": 1e6, "mib": 1 << 20,
          "g": GiB, "gb": 1e9, "gib": GiB, "t": 1 << 40, "tb": 1e12, "tib": 1 << 40}


def parse_size(text: str | int | float, what: str = "size") -> int:
    """'24GiB' / '24GB' / '24G' / '24' (GiB) -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what}: cannot read {text!r}, expected a size like 24GiB, 512GB or 80G")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value <= 0:
        raise PlacementError(f"{what}: {text!r} must be positive")
    return int(value)


def parse_bandwidth(text: str | float, what: str = "bandwidth") -> float:
    """'300GB/s' / '300' (GB/s) / '1.2TB/s' -> bytes/s."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)(/s)?\s*", str(text))
    unit = (m.group(2).lower() if m else "x") or "gb"
    scale = {"gb": 1e9, "gib": GiB, "tb": 1e12, "mb": 1e6, "g": 1e9}.get(unit)
    if not m or scale is None:
        raise ConfigError(f"{what}: cannot read {text!r}, expected a bandwidth like 300GB/s")
    value = float(m.group(1)) * scale
    if value <= 0:
        raise PlacementError(f"{what}: {text!r} must be positive")
    return value


def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def cpu_info() -> dict:
    """CPU model, physical cores, SIMD flags and NUMA nodes from /proc and /sys (Linux), psutil elsewhere."""
    import psutil

    model, flags = "unknown CPU", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        model = m.group(1).strip() if m else model
        f = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        have = set(f.group(1).split()) if f else set()
        flags = [x for x in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
                 if x in have]
    except OSError:
        pass
    nodes = len(list(Path("/sys/devices/system/node").glob("node[0-9]*"))) or 1
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return {"cpu_model": model, "cpu_flags": flags, "numa_nodes": nodes, "cpu_cores": cores}


def detect(gpus: list[GPU] | None = None) -> Hardware:
    """This machine from psutil and /proc, with GPUs given by the caller (torch.cuda lives outside
    placement/); bandwidths are assumed, not measured: `offload probe` measures them."""
    import psutil

    info = cpu_info()
    notes = [f"DRAM bandwidth assumed {DEFAULT_DRAM_BW / GB:.0f} GB/s (not measured: run `offload probe` "
             "or pass --dram-bw)", f"PCIe bandwidth assumed {DEFAULT_PCIE_BW / GB:.0f} GB/s (pass --pcie-bw)"]
    return Hardware(gpus=list(gpus or []), ram_bytes=psutil.virtual_memory().total, dram_bw=DEFAULT_DRAM_BW,
                    pcie_bw=DEFAULT_PCIE_BW, source="detected", notes=notes, **info)


def measure_dram_bw(n_bytes: int = 512 << 20, threads: int | None = None, repeats: int = 3) -> float:
    """Read bandwidth (bytes/s) of summing a large float32 array in parallel chunks; numpy releases
    the GIL inside the reduction, so threads read concurrently."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = threads or os.cpu_count() or 1
    a = np.ones(n_bytes // 4, dtype=np.float32)
    chunks = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = max(best, a.nbytes / (time.perf_counter() - t))
    return best


def profile_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "offload" / "hardware.json"


def save_profile(hw: Hardware, path: str | Path | None = None) -> Path:
    path = Path(path) if path else profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(hw.to_json(), indent=2))
    return path


def read_json_file(path: str | Path, what: str):
    """A user-given JSON file (hardware or routing profile); a clear ConfigError naming it otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: {what} is not valid JSON ({exc})") from None


def load_profile(path: str | Path) -> Hardware:
    return Hardware.from_json(read_json_file(path, "hardware profile"), where=str(path))
