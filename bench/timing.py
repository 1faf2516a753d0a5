"""Shared helpers of the benchmarks: interleaved timing, statistics, machine facts and the report files.

Every benchmark times its cases in one process, interleaved (A B A B ... after the warm-up), so that a load
change on a shared machine hits all cases alike; it reports the median, min and max of the repetitions, the ratio
of the medians, the load average before and after, and the machine (CPU model, cores, AMX, torch's CPU
capability, the precision ``auto`` picks here, torch / MONAI versions, torch threads). :func:`write_report`
writes ``runs/bench/<name>.md`` and ``runs/bench/<name>.json``.

Load: a benchmark starts on an idle machine only: :func:`start_load` waits up to :data:`IDLE_WAIT_S` for the
1-minute load average to fall below :data:`IDLE_LOAD` (1.0: the project's rule for a measurement "run alone"; the
previous benchmark of ``python -m bench all`` leaves ~2 behind, which decays below 1 in about 45 s) and refuses
(exit status 3, no report) when it does not, unless ``--allow-loaded``. A report that started at a load of 1 or
more, or whose load after the run exceeds the usable cores by more than :data:`END_MARGIN` (a 2-thread benchmark
itself brings a 2-core machine to ~2), is marked "loaded" in its header and in every table row
(``data["loaded"]``), so its numbers are never read as idle ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ALLOW_LOADED_HELP",
    "END_MARGIN",
    "IDLE_LOAD",
    "IDLE_WAIT_S",
    "ISA_LIMIT_VARS",
    "LOADED_EXIT",
    "MachineLoaded",
    "Stats",
    "bench_parser",
    "interleaved",
    "is_idle",
    "is_loaded",
    "load_average",
    "machine_facts",
    "markdown_table",
    "report_loaded",
    "set_threads",
    "start_load",
    "usable_cores",
    "write_report",
]

DEFAULT_OUT = Path("runs") / "bench"
#: exit status of a benchmark that refused to start on a loaded machine
LOADED_EXIT = 3
#: a benchmark starts only below this 1-minute load average (run alone)
IDLE_LOAD = 1.0
#: how long :func:`start_load` waits for the load to fall below :data:`IDLE_LOAD` (seconds)
IDLE_WAIT_S = 180.0
#: a report is marked loaded when the load at its end exceeds the usable cores by more than this: a benchmark's
#: own 2 threads bring a 2-core machine to about 2 (2.02 measured), another busy process to 3 or more
END_MARGIN = 0.5
#: ``--allow-loaded``'s help, shared by every benchmark
ALLOW_LOADED_HELP = (
    "start at once whatever the load average (without it a benchmark waits up to 3 min for the 1-minute load to "
    "fall below 1, then refuses); a report that started at 1 or more is marked 'loaded'"
)
#: environment variables that cap the instruction sets torch (ATen) and oneDNN use; recorded when set
ISA_LIMIT_VARS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


class MachineLoaded(SystemExit):
    """Raised by :func:`start_load` (exit status :data:`LOADED_EXIT`): the machine is not idle."""

    def __init__(self, message: str) -> None:
        super().__init__(LOADED_EXIT)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Stats:
    """Median, min and max of repeated measurements (``values``, in the unit they were taken in)."""

    def __init__(self, values: Sequence[float]) -> None:
        if not values:
            raise ValueError("no measurements")
        self.values = [float(v) for v in values]
        self.median = statistics.median(self.values)
        self.min = min(self.values)
        self.max = max(self.values)

    def inverted(self, scale: float = 1.0) -> Stats:
        """``scale / value`` of every measurement (seconds per step → samples per second)."""
        return Stats([scale / v for v in self.values])

    def fmt(self, digits: int = 2) -> str:
        """``"median (min–max)"``."""
        return f"{self.median:.{digits}f} ({self.min:.{digits}f}–{self.max:.{digits}f})"

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "values": self.values}


def load_average() -> list[float]:
    """The 1 / 5 / 15 minute load averages (``[]`` where the OS does not report them)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), else ``os.cpu_count()``."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def is_loaded(load: Sequence[float], cores: float | None = None) -> bool:
    """Whether the 1-minute load average ``load[0]`` exceeds ``cores`` (default: :func:`usable_cores`)."""
    return bool(load) and load[0] > (cores or usable_cores())


def is_idle(load: Sequence[float]) -> bool:
    """Whether the 1-minute load average is below :data:`IDLE_LOAD` (``True`` where the OS reports none)."""
    return not load or load[0] < IDLE_LOAD


def start_load(allow_loaded: bool = False, wait_s: float | None = None) -> list[float]:
    """The load averages at the start of a benchmark, once the machine is idle; refuses otherwise.

    Waits (polling every 5 s, at most ``wait_s``, default :data:`IDLE_WAIT_S`) for the 1-minute load average to
    fall below :data:`IDLE_LOAD`. ``allow_loaded`` starts at once whatever the load (the report is then marked).

    Raises:
        MachineLoaded: still not idle after the wait and ``allow_loaded`` is false (the message gives the load
            and names ``--allow-loaded``; nothing is measured or written).
    """
    import sys
    import time

    load = load_average()
    if allow_loaded or is_idle(load):
        return load
    wait_s = IDLE_WAIT_S if wait_s is None else float(wait_s)
    print(f"load average {load[0]:.2f}: waiting up to {wait_s:.0f} s for it to fall below {IDLE_LOAD}",
          file=sys.stderr, flush=True)  # fmt: skip
    deadline = time.monotonic() + wait_s
    while not is_idle(load) and time.monotonic() < deadline:
        time.sleep(5.0)
        load = load_average()
    if not is_idle(load):
        message = (
            f"load average {load[0]:.2f} (1 minute) did not fall below {IDLE_LOAD} within {wait_s:.0f} s: other jobs "
            "would distort the timings, so no report is written. Wait for a quiet machine, or pass --allow-loaded "
            "to measure anyway (the report is then marked 'loaded')."
        )
        print(message, file=sys.stderr, flush=True)
        raise MachineLoaded(message)
    return load


def report_loaded(load: Mapping[str, Sequence[float]], cores: int | None = None) -> bool:
    """Whether a report is marked loaded: started at a load of :data:`IDLE_LOAD` or more, or ended above ``cores``
    + :data:`END_MARGIN`."""
    ended_busy = is_loaded(load.get("after") or [], (cores or usable_cores()) + END_MARGIN)
    return not is_idle(load.get("before") or []) or ended_busy


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith("amx") or f in ("avx512f", "avx512_bf16"))
    except OSError:
        pass
    return []


def machine_facts() -> dict[str, Any]:
    """CPU model, cores (and the usable ones), AMX / AVX-512 flags, CPU capability, ``auto``'s precision, versions."""
    import monai
    import torch

    from medssl.precision import cpu_capability, cpu_model, precision_record

    cores = os.cpu_count()
    usable = usable_cores()
    return {
        "cpu": cpu_model(),
        "cores": cores,
        "usable_cores": usable,
        "cpu_flags": _cpu_flags(),
        "cpu_capability": cpu_capability(),
        "precision_auto": precision_record("auto", "cpu"),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        # set, these make torch / oneDNN use fewer instructions than the CPU has (e.g. an AVX2-only CPU emulated)
        "isa_limits": {k: os.environ[k] for k in ISA_LIMIT_VARS if os.environ.get(k)},
    }


def _isa_line(limits: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in limits.items()) + " (the CPU's own flags are listed above)"


def _auto_line(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "precision auto: not recorded"
    return f"precision auto -> {record['used']} ({record['reason']})"


def set_threads(threads: int) -> None:
    """Fix torch's intra-op threads (and OpenMP's for child processes) so runs compare."""
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def interleaved(
    cases: Mapping[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    on_done: Callable[[str, int, float], None] = None,
) -> dict[str, Stats]:
    """Seconds per call of every case, run A B A B ...: ``warmup`` untimed rounds, then ``reps`` timed rounds.

    Args:
        cases: name → zero-argument callable (one measured unit, e.g. one training step).
        reps: timed rounds (>= 1).
        warmup: untimed rounds first (allocator, oneDNN kernel selection, lazy init).
        on_done: called as ``on_done(name, rep, seconds)`` after every timed call (progress output).

    Returns:
        name → :class:`Stats` of the seconds per call.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(max(0, warmup)):
        for fn in cases.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            seconds[name].append(elapsed)
            if on_done is not None:
                on_done(name, rep, elapsed)
    return {name: Stats(v) for name, v in seconds.items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bench_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark shares: ``--tiny --reps --warmup --threads --seed --out-dir --allow-loaded``."""
    p = argparse.ArgumentParser(prog=f"python -m bench {name}", description=description)
    p.add_argument("--tiny", action="store_true", help="tiny model and volumes (a smoke run of seconds)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per case (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions per case first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=str(DEFAULT_OUT), help=f"report directory (default: {DEFAULT_OUT})")
    p.add_argument("--allow-loaded", action="store_true", help=ALLOW_LOADED_HELP)
    return p


def _mark_loaded(body: str) -> str:
    """``(loaded)`` after the first cell of every table row of ``body`` (header and separator rows excepted)."""
    lines = body.split("\n")
    out = []
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.startswith("| ") and not nxt.startswith("|---") and not line.startswith("|---"):
            first, sep, rest = line[2:].partition(" |")
            line = f"| {first} (loaded){sep}{rest}"
        out.append(line)
    return "\n".join(out)


def write_report(
    name: str, title: str, body: str, data: Mapping[str, Any], out_dir: str | os.PathLike = DEFAULT_OUT
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.md`` (title, machine line, ``body``) and ``<name>.json``; print the markdown.

    ``data`` must hold ``machine`` (:func:`machine_facts`) and ``load_average`` (``{"before": …, "after": …}``).
    When :func:`report_loaded` (started at a load of 1 or more, or ended above the usable cores + 0.5), the report is
    marked loaded (``data["loaded"]`` true, a line under the title, ``(loaded)`` in every table row).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = data["machine"]
    load = data.get("load_average", {})
    cores = int(m.get("usable_cores") or usable_cores())
    loaded = report_loaded(load, cores)
    data = {**data, "loaded": loaded}
    if loaded:
        body = (
            f"**Loaded machine**: load average {load.get('before')} at the start (idle: below {IDLE_LOAD}) and "
            f"{load.get('after')} at the end ({cores} usable cores); other jobs shared the CPU, so times are "
            "inflated and noisy.\n\n" + _mark_loaded(body)
        )
    header = (
        f"## {title}\n\n{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable; "
        f"{' '.join(m['cpu_flags']) or 'no AMX / AVX-512 flags'}), torch {m['torch']}, MONAI {m['monai']}, "
        f"{m['torch_threads']} torch threads; load average before {load.get('before')}, after {load.get('after')}.\n"
        f"CPU capability {m.get('cpu_capability')}; {_auto_line(m.get('precision_auto'))}.\n"
        + (
            f"Instruction sets limited by the environment: {_isa_line(m['isa_limits'])}.\n"
            if m.get("isa_limits")
            else ""
        )
    )
    text = header + "\n" + body.rstrip() + "\n"
    md, js = out / f"{name}.md", out / f"{name}.json"
    tmp_md, tmp_js = md.with_suffix(".md.tmp"), js.with_suffix(".json.tmp")
    tmp_md.write_text(text)
    tmp_js.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp_md, md)
    os.replace(tmp_js, js)
    print(text)
    print(f"wrote {md} and {js}")
    return md, js
