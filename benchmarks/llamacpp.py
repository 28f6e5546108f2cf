"""llama.cpp as a CPU anchor for herd's inference benchmarks.

    python benchmarks/llamacpp.py [--configs small,medium] [--outtypes f32,bf16] [--threads 2]
                                  [--prompt 512,2048] [--n-gen 128] [--reps 3]

llama.cpp is built from the copy vendored inside PyPI's ``llama-cpp-python`` sdist (PyPI is reachable where
GitHub is not), and run on GGUF files converted, with that copy's own ``convert_hf_to_gguf.py`` and gguf-py, from
the same HF directories that herd loads (``benchmarks/configs.py``). Everything lives under
``benchmarks/.cache`` (llamacpp/: sdist, sources, build; gguf/: converted models; models/: HF directories).

API:
    build(work_dir)                      -> bin dir with llama-bench (+ llama-quantize), or None and a printed reason
    convert(hf_dir, outtype, out)        -> GGUF path (outtype: f32, bf16, q8_0)
    bench(gguf, threads, prompt_len, n_gen, reps) -> {"prefill_tok_s", "decode_tok_s", "prefill_std", "decode_std"}
    copy_bandwidth_gbs()                 -> memory copy bandwidth in GB/s (read + write bytes)
    read_bandwidth_gbs()                 -> read-only memory bandwidth in GB/s
    wait_idle() / cpu_busy()             -> wait for / measure other load on a shared machine

Needs cmake and a C++ compiler; the converter runs with this interpreter (torch, transformers, tokenizers,
numpy, pyyaml, tqdm, requests, safetensors), with the vendored gguf-py on PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from report import cpu_name

BENCH_DIR = Path(__file__).resolve().parent
CACHE = BENCH_DIR / ".cache"
DEFAULT_WORK_DIR = CACHE / "llamacpp"
SDIST_VERSION = "0.3.36"  # newest llama-cpp-python checked to build and convert Llama 4 text models
TARGETS = ("llama-bench", "llama-quantize")


def _log(msg: str) -> None:
    print(f"[llamacpp] {msg}", flush=True)


def _run(cmd: list[str], log: Path, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``, appending its output to ``log``; raise CalledProcessError with the log's tail on failure."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise subprocess.CalledProcessError(r.returncode, cmd, output=tail[0])
    return r


def source_dir(work_dir: Path = DEFAULT_WORK_DIR) -> Path | None:
    """The vendored llama.cpp tree of the unpacked sdist, if any."""
    hits = sorted(Path(work_dir).glob("src/llama_cpp_python-*/vendor/llama.cpp"))
    return hits[-1] if hits else None


def build(work_dir: Path = DEFAULT_WORK_DIR, version: str = SDIST_VERSION) -> Path | None:
    """Download the llama-cpp-python sdist, build llama-bench/llama-quantize, return the bin dir (cached).

    Returns None, after printing a one-line reason, when anything fails (no network, no cmake, compile error):
    callers then skip the llama.cpp anchor.
    """
    work_dir = Path(work_dir).resolve()
    build_dir = work_dir / "build"
    bin_dir = build_dir / "bin"
    stamp = work_dir / "BUILT"
    if stamp.exists() and all((bin_dir / t).exists() for t in TARGETS):
        return bin_dir
    log = work_dir / "build.log"
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        for tool in ("cmake", "c++"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} not found on PATH")
        src = source_dir(work_dir)
        if src is None:
            sdists = sorted((work_dir / "sdist").glob(f"llama_cpp_python-{version}.tar.gz"))
            if not sdists:
                _log(f"downloading llama-cpp-python=={version} sdist")
                _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                      f"llama-cpp-python=={version}", "-d", str(work_dir / "sdist")],
                     log, timeout=600)
                sdists = sorted((work_dir / "sdist").glob("llama_cpp_python-*.tar.gz"))
            if not sdists:
                raise RuntimeError("pip download produced no sdist")
            with tarfile.open(sdists[-1]) as tf:
                tf.extractall(work_dir / "src", filter="data")
            src = source_dir(work_dir)
            if src is None:
                raise RuntimeError("sdist has no vendor/llama.cpp")
        jobs = str(os.cpu_count() or 2)
        _log(f"building {', '.join(TARGETS)} from {src} (-j{jobs}; log: {log})")
        t = time.perf_counter()
        _run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
              "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
              "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]
             + (["-G", "Ninja"] if shutil.which("ninja") else []), log, timeout=600)
        _run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", jobs, "--target", *TARGETS],
             log, timeout=3600)
        missing = [tt for tt in TARGETS if not (bin_dir / tt).exists()]
        if missing:
            raise RuntimeError(f"build finished without {missing}")
        stamp.write_text(f"{src}\n")
        _log(f"built in {time.perf_counter() - t:.0f} s")
        return bin_dir
    except subprocess.CalledProcessError as e:
        print(f"llama.cpp unavailable: `{' '.join(map(str, e.cmd[:3]))} ...` failed ({e.output}); see {log}",
              flush=True)
    except (OSError, RuntimeError, tarfile.TarError, subprocess.TimeoutExpired) as e:
        print(f"llama.cpp unavailable: {type(e).__name__}: {e}", flush=True)
    return None



# -- conversion ---------------------------------------------------------------------------------------------------
OUTTYPES = ("f32", "bf16", "q8_0")
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
# llama 3's pre-tokenizer split, the one llama.cpp names "llama-bpe"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Runs convert_hf_to_gguf.py in a subprocess. A synthetic tokenizer's chkhsh is unknown to get_vocab_base_pre,
# which raises NotImplementedError: fall back to "llama-bpe", the pre-tokenizer that tokenizer imitates.
_CONVERT_DRIVER = """
import runpy, sys
import conversion.base as base
_pre = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _pre(self, tokenizer)
    except NotImplementedError:
        return "llama-bpe"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def write_tokenizer(directory: Path, vocab_size: int, bos_id: int = 1, eos_id: int = 2) -> None:
    """Write a byte-level BPE tokenizer.json (+ tokenizer_config.json) of exactly ``vocab_size`` ids.

    The converter needs a tokenizer and herd's random-weight checkpoints have none. This one is synthetic, no
    training data: ids 0..2 are special tokens (unk, bos, eos), then the 256 byte-level symbols, then merges of
    symbol pairs in a fixed order until the vocab is full. Its pre-tokenizer is llama 3's split + byte level.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = {0: "<|unk|>", bos_id: BOS, eos_id: EOS}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for i in sorted(specials):
        vocab[specials[i]] = i
    for ch in alphabet:
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    if len(vocab) != vocab_size or max(vocab.values()) != vocab_size - 1:
        raise ValueError(f"cannot build a byte-level BPE of {vocab_size} tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
        "unk_token": specials[0], "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")


def _stage(hf_dir: Path, stage: Path) -> Path:
    """A directory with links to ``hf_dir``'s config and weights plus a tokenizer (the source stays untouched)."""
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.name == "config.json" or f.name.endswith(".safetensors") or f.name.endswith(".safetensors.index.json"):
            (stage / f.name).symlink_to(f.resolve())
        elif f.name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            shutil.copy2(f, stage / f.name)
    if not (stage / "tokenizer.json").exists():
        cfg = json.loads((hf_dir / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        eos = cfg.get("eos_token_id", 2)
        write_tokenizer(stage, cfg["vocab_size"], bos_id=cfg.get("bos_token_id") or 1,
                        eos_id=(eos[0] if isinstance(eos, list) else eos) or 2)
    return stage


def convert(hf_dir: Path, outtype: str, out: Path, work_dir: Path = DEFAULT_WORK_DIR, force: bool = False) -> Path:
    """Convert an HF ``Llama4ForCausalLM`` directory to GGUF ``out`` with the vendored convert_hf_to_gguf.py.

    outtype: f32, bf16 or q8_0 (the converter's own --outtype). Cached: an existing ``out`` newer than the
    weights is returned as is unless ``force``. Raises RuntimeError with the converter's last lines on failure.
    """
    hf_dir, out = Path(hf_dir).resolve(), Path(out).resolve()
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, got {outtype!r}")
    weights = [f for f in hf_dir.iterdir() if f.name.endswith(".safetensors")]
    if not weights or not (hf_dir / "config.json").exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json + *.safetensors")
    if out.exists() and not force and out.stat().st_mtime >= max(f.stat().st_mtime for f in weights):
        return out
    src = source_dir(work_dir)
    if src is None:
        # the converter comes with the sdist; build() fetches it (and a failed compile still leaves it here)
        build(work_dir)
        src = source_dir(work_dir)
    if src is None:
        raise RuntimeError("llama.cpp sources unavailable (see build())")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = _stage(hf_dir, out.parent / f".{out.name}.hf")
    tmp = out.with_name(f".{out.name}.tmp")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), str(src / "gguf-py"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("NO_LOCAL_GGUF", "")  # the script itself prefers ./gguf-py; both are the vendored copy
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [sys.executable, "-c", _CONVERT_DRIVER, str(src / "convert_hf_to_gguf.py"), str(stage),
           "--outtype", outtype, "--outfile", str(tmp), "--model-name", out.stem]
    _log(f"converting {hf_dir.name} -> {out.name} ({outtype})")
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    shutil.rmtree(stage, ignore_errors=True)
    if r.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed (exit {r.returncode}):\n{tail}")
    os.replace(tmp, out)
    _log(f"converted in {time.perf_counter() - t:.0f} s: {out} ({out.stat().st_size / 2**30:.2f} GiB)")
    return out


# -- benchmarking -------------------------------------------------------------------------------------------------
def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of the machine's CPU time spent busy (all processes) over ``interval`` seconds, from /proc/stat."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v[:8])  # idle + iowait, total (without guest time, counted in user)
    try:
        i0, t0 = sample()
        time.sleep(interval)
        i1, t1 = sample()
    except OSError:
        return 0.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_idle(threshold: float = 0.15, max_wait: float = 300.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` of the CPUs; the benchmark
    machine may be shared and a 2-core box gives noisy numbers under any load. Returns the last busy fraction."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        busy = cpu_busy(2.0)
    if busy > threshold:
        _log(f"warning: the CPUs are {busy:.0%} busy with other work; timings will be noisy")
    return busy


def bench(gguf: Path, threads: int = 2, prompt_len: int = 512, n_gen: int = 128, reps: int = 3,
          bin_dir: Path | None = None, extra_args: list[str] | None = None, idle_wait: float = 60.0) -> dict:
    """Run llama-bench on ``gguf``: prefill of ``prompt_len`` tokens (pp) and decode of ``n_gen`` tokens (tg).

    Returns {"prefill_tok_s", "decode_tok_s", "prefill_std", "decode_std"} (tokens/s, mean and stddev over
    ``reps`` after llama-bench's warm-up run), "prefill_best"/"decode_best" (the fastest repetition: the robust
    figure when other processes share the CPUs, since llama.cpp's spinning threads slow down by several times
    when one is preempted), "raw": llama-bench's JSON records and "cpu_busy_before": the
    CPU load of the machine just before the run (it first waits up to ``idle_wait`` s for other work to stop).
    prompt_len=0 or n_gen=0 skips that test (its values are None). llama-bench's decode test starts from an empty
    context (add ``extra_args=["-d", "N"]`` for decode at depth N).
    """
    bin_dir = Path(bin_dir) if bin_dir is not None else build()
    if bin_dir is None:
        raise RuntimeError("llama.cpp is not built")
    busy = wait_idle(max_wait=idle_wait) if idle_wait > 0 else None
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt_len),
           "-n", str(n_gen), "-r", str(reps), "-o", "json", *(extra_args or [])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"llama-bench failed (exit {r.returncode}): {tail}")
    records = json.loads(r.stdout)
    res: dict = {"prefill_tok_s": None, "decode_tok_s": None, "prefill_std": None, "decode_std": None,
                 "prefill_best": None, "decode_best": None, "raw": records, "cpu_busy_before": busy}
    for rec in records:
        kind = "prefill" if rec["n_prompt"] > 0 and rec["n_gen"] == 0 else \
            "decode" if rec["n_gen"] > 0 and rec["n_prompt"] == 0 else None
        if kind:
            res[f"{kind}_tok_s"], res[f"{kind}_std"] = rec["avg_ts"], rec["stddev_ts"]
            res[f"{kind}_best"] = max(rec.get("samples_ts") or [rec["avg_ts"]])
    return res


def copy_bandwidth_gbs(size_bytes: int = 2**30, reps: int = 5) -> float:
    """Memory bandwidth in GB/s (1e9 bytes): best of ``reps`` copies of a ``size_bytes`` buffer with torch's
    threads, counting the bytes read plus the bytes written (2 x size per copy)."""
    import torch

    src = torch.ones(size_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best / 1e9


def read_bandwidth_gbs(size_bytes: int = 2**30, reps: int = 5) -> float:
    """Read-only memory bandwidth in GB/s: best of ``reps`` sums over a ``size_bytes`` buffer (torch's threads).

    Decode streams weights without writing them, and a copy's writes cost more than their bytes (read-for-
    ownership), so this is the bound that decode can approach; copy_bandwidth_gbs() is the conservative one."""
    import torch

    x = torch.ones(size_bytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * x.element_size() / best / 1e9

# -- script -------------------------------------------------------------------------------------------------------
def _fmt(v: float | None, sd: float | None, best: float | None = None) -> str:
    return "-" if v is None else f"{v:.1f} ± {sd:.1f}" + (f" (best {best:.1f})" if best is not None else "")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="small,medium")
    p.add_argument("--outtypes", default="f32,bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", default="512", help="comma-separated prompt lengths for prefill (pp)")
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--idle-wait", type=float, default=300.0,
                   help="before each run, wait up to this many seconds for other processes to leave the CPUs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)

    sys.path.insert(0, str(BENCH_DIR))
    from configs import CONFIGS, make_model_dir, param_counts

    bin_dir = build()
    if bin_dir is None:
        print("skipping the llama.cpp anchor")
        return 0
    wait_idle(max_wait=a.idle_wait)
    bw, bw_read = copy_bandwidth_gbs(), read_bandwidth_gbs()
    prompts = [int(x) for x in a.prompt.split(",") if x]
    rows = []
    for name in a.configs.split(","):
        counts = param_counts(CONFIGS[name])
        for outtype in a.outtypes.split(","):
            src_dtype = "bf16" if outtype == "bf16" else "f32"
            gguf = convert(make_model_dir(name, src_dtype), outtype, CACHE / "gguf" / f"{name}-{outtype}.gguf")
            row = {"config": name, "outtype": outtype, "gguf_gib": gguf.stat().st_size / 2**30, "prefill": {},
                   "cpu_busy_before": []}
            for i, pl in enumerate(prompts):
                r = bench(gguf, a.threads, pl, a.n_gen if i == 0 else 0, a.reps, bin_dir=bin_dir,
                          idle_wait=a.idle_wait)
                row["cpu_busy_before"].append(r["cpu_busy_before"])
                row["prefill"][pl] = (r["prefill_tok_s"], r["prefill_std"], r["prefill_best"])
                if i == 0:
                    row["decode"] = (r["decode_tok_s"], r["decode_std"], r["decode_best"])
                _log(f"{name} {outtype} pp{pl}: {_fmt(*row['prefill'][pl])} tok/s"
                     + (f", tg{a.n_gen}: {_fmt(*row['decode'])} tok/s" if i == 0 else ""))
            # decode floor: every active weight (+ the lm head) read once per token at the measured bandwidth;
            # as a tok/s ceiling, with the copy (read+write) and the read-only figure
            bpe = {"f32": 4, "bf16": 2, "q8_0": 34 / 32}[outtype]
            row["active_weight_gb"] = counts["active"] * bpe / 1e9
            row["decode_floor_tok_s"] = bw / row["active_weight_gb"]
            row["decode_floor_read_tok_s"] = bw_read / row["active_weight_gb"]
            rows.append(row)

    print(f"\nllama.cpp ({source_dir().parent.parent.name}), {cpu_name()}, {a.threads} threads, "
          f"copy bandwidth {bw:.1f} GB/s (read+write), read bandwidth {bw_read:.1f} GB/s\n")
    heads = [f"pp{pl} tok/s" for pl in prompts]
    print("| config | type | GGUF GiB | " + " | ".join(heads)
          + f" | tg{a.n_gen} tok/s | tg ceiling copy / read bw tok/s | CPU busy before |")
    print("|---|---|---:|" + "---:|" * len(heads) + "---:|---:|---:|")
    for r in rows:
        pp = " | ".join(_fmt(*r["prefill"][pl]) for pl in prompts)
        print(f"| {r['config']} | {r['outtype']} | {r['gguf_gib']:.2f} | {pp} | {_fmt(*r['decode'])} | "
              f"{r['decode_floor_tok_s']:.1f} / {r['decode_floor_read_tok_s']:.1f} | "
              f"{max(r['cpu_busy_before']):.0%} |")
    if a.json:
        a.json.write_text(json.dumps({"bandwidth_gbs": bw, "read_bandwidth_gbs": bw_read, "threads": a.threads,
                                      "cpu": cpu_name(), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
