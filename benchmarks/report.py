"""What a benchmark ran on, and how its section lands in benchmarks/RESULTS.md."""

from pathlib import Path

import torch

from herd.info import cpu_name

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = ("# Benchmark results\n\nEach section: one command, one machine, one date. Ratios are against an anchor "
           "measured in the same run.\n\n")


def describe(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def append_results(section: str) -> None:
    """Append ``section`` to RESULTS.md (created with its header if missing), one blank line before it."""
    if not RESULTS.exists():
        RESULTS.write_text(_HEADER)
    text = RESULTS.read_text()
    sep = "" if text.endswith("\n\n") else "\n" if text.endswith("\n") else "\n\n"
    with RESULTS.open("a") as f:
        f.write(sep + section.rstrip("\n") + "\n")


def section_command(script: str, argv: list[str]) -> str:
    """The command line that makes a RESULTS.md section: the run's own arguments plus --write, without the side
    outputs (--out, --json and their values)."""
    argv, kept = list(argv), []
    while argv:
        x = argv.pop(0)
        if x in ("--out", "--json"):
            argv = argv[1:]
        elif x != "--write" and not x.startswith(("--out=", "--json=")):
            kept.append(x)
    return " ".join([f"python benchmarks/{script}", *kept, "--write"])

