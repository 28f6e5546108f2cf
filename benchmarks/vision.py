"""herd vs transformers: image encode, and encode + prefill of an image prompt, on one tiny-ish multimodal config.

    python benchmarks/vision.py [--repeats 5] [--dtypes fp32,bf16] [--write]

The image is 336x1008 (1x3 grid) so herd.images tiles it into 4 tiles of pixels: 3 grid tiles + the thumbnail,
i.e. 4 x 144 = 576 <|patch|> placeholders in herd.chat's layout, after 64 text tokens and before 8 more.
Both implementations hold the same random weights: a transformers Llama4ForConditionalGeneration is built, saved,
and loaded by herd.checkpoint.load. Per dtype it reports the median wall time (after a warm-up) of
- encode: herd ``model.encode_images`` vs transformers ``get_image_features`` + ``multi_modal_projector``;
- encode + prefill to the last token's logits: herd ``model(ids, pixel_values=..., last_only=True)`` vs
  transformers' forward (``logits_to_keep=1``), and herd's Engine (chunked prefill, fresh image cache each time);
and the agreement of the two (max |herd - transformers| / max |transformers|, for features and logits).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import CONFIGS  # noqa: E402
from conftest import randomize_  # noqa: E402  (N(0, 0.08) weights, norms around 1: every tensor matters)
from llamacpp import wait_idle  # noqa: E402
from report import append_results, describe  # noqa: E402

from herd import checkpoint  # noqa: E402
from herd.chat import image_token_ids  # noqa: E402
from herd.config import VisionConfig, to_hf_dict  # noqa: E402
from herd.images import tile_image  # noqa: E402
from herd.infer.engine import Engine  # noqa: E402
from herd.infer.sampling import SamplingParams  # noqa: E402

# benchmarks/configs.py's small text decoder + a reduced vision tower at the real 336px tiles / 14px patches
SPECIAL = {n: 31990 + i for i, n in enumerate(("<|patch|>", "<|image_start|>", "<|image_end|>", "<|image|>",
                                                "<|tile_x_separator|>", "<|tile_y_separator|>"))}
CONFIG = CONFIGS["small"].replace(
    image_token_id=SPECIAL["<|patch|>"], boi_token_id=SPECIAL["<|image_start|>"], eoi_token_id=SPECIAL["<|image_end|>"],
    vision=VisionConfig(dim=256, n_layers=4, n_heads=4, hidden_dim=1024, projector_input_dim=512,
                        projector_output_dim=512, vision_output_dim=512))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tiled = tile_image(torch.randint(0, 256, (3, 336, 1008), dtype=torch.uint8, generator=g))
    rows, cols = tiled.aspect_ratio
    text = lambda n: torch.randint(3, 31000, (n,), generator=g).tolist()  # noqa: E731
    layout = image_token_ids(SimpleNamespace(special_tokens=SPECIAL), rows, cols, CONFIG.vision.tokens_per_tile)
    return torch.tensor([[1, *text(63), *layout, *text(8)]]), tiled.pixel_values


def save_hf_model(directory: str) -> None:
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    d = to_hf_dict(CONFIG)
    torch.manual_seed(0)
    cfg = Llama4Config(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    randomize_(Llama4ForConditionalGeneration(cfg)).save_pretrained(directory)


def hf_encode(hf, pixels):
    features = hf.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
    return hf.multi_modal_projector(features.view(-1, features.size(-1)))


HF_FORWARD_WORKS = True  # transformers 5.24's forward computes the logits, then fails building its output object


def hf_last_logits(hf, ids, pixels):
    """Llama4ForConditionalGeneration.forward(logits_to_keep=1), or where it crashes the same steps by its modules."""
    global HF_FORWARD_WORKS
    if HF_FORWARD_WORKS:
        try:
            return hf(input_ids=ids, pixel_values=pixels, use_cache=False, logits_to_keep=1).logits
        except AttributeError as e:
            if "image_outputs" not in str(e):
                raise
            HF_FORWARD_WORKS = False
    embeds = hf.get_input_embeddings()(ids)
    projected = hf_encode(hf, pixels).to(embeds.dtype)
    mask = hf.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=projected)
    return hf.language_model(inputs_embeds=embeds.masked_scatter(mask, projected), use_cache=False,
                             logits_to_keep=1).logits


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max())


def run(repeats: int, dtypes: list[str]) -> tuple[list[dict], int, int]:
    from transformers import Llama4ForConditionalGeneration

    ids, pixels32 = inputs()
    params = SamplingParams(max_new_tokens=1, temperature=0.0, stop_ids=[])
    rows, tmp = [], tempfile.TemporaryDirectory()
    save_hf_model(tmp.name)
    for name in dtypes:  # loaded per dtype: Module.to(float) would drop the imaginary part of HF's vision RoPE
        dtype, pixels = DTYPES[name], pixels32.to(DTYPES[name])
        hf = Llama4ForConditionalGeneration.from_pretrained(tmp.name, dtype=dtype, attn_implementation="sdpa").eval()
        ours = checkpoint.load(tmp.name, dtype=dtype).eval()
        engine = lambda: Engine(ours).generate([ids[0].tolist()], params, images=[pixels])  # noqa: E731
        with torch.inference_mode():
            ref_f, ref_l = hf_encode(hf, pixels), hf_last_logits(hf, ids, pixels)
            got_f, got_l = ours.encode_images(pixels), ours(ids, pixel_values=pixels, last_only=True)
            assert engine()[0].token_ids == [int(got_l[0, -1].argmax())]
            r = {"dtype": name, "feat_diff": rel(got_f, ref_f), "logit_diff": rel(got_l[0, -1], ref_l[0, -1]),
                 "busy": wait_idle(max_wait=120),  # the box may be shared: wait (a while) for the others
                 "hf_enc": _time(lambda: hf_encode(hf, pixels), repeats),
                 "herd_enc": _time(lambda: ours.encode_images(pixels), repeats),
                 "hf_pre": _time(lambda: hf_last_logits(hf, ids, pixels), repeats),
                 "herd_pre": _time(lambda: ours(ids, pixel_values=pixels, last_only=True), repeats),
                 "engine_pre": _time(engine, repeats)}
        rows.append(r)
        print(r, flush=True)
    tmp.cleanup()
    return rows, ids.shape[1], pixels32.shape[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--write", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = p.parse_args()
    t0 = time.perf_counter()
    rows, n_tokens, n_tiles = run(args.repeats, args.dtypes.split(","))
    import transformers

    v, busy = CONFIG.vision, ", ".join(f"{r['busy']:.0%}" for r in rows)
    head = (f"### Vision (encode + prefill, one {n_tiles}-tile image) — {datetime.date.today()} — {describe()}\n\n"
            f"torch {torch.__version__}, transformers {transformers.__version__} (sdpa attention; "
            + ("its forward" if HF_FORWARD_WORKS else "its forward's steps by its own modules: the 5.24 forward "
               "crashes after computing the logits") + "). "
            f"Image 336x1008 -> 1x3 grid + thumbnail = {n_tiles} tiles of {v.image_size}px, patch {v.patch_size}; "
            f"prompt {n_tokens} tokens ({n_tiles * v.tokens_per_tile} <|patch|>). Vision: width {v.dim}, "
            f"{v.n_layers} layers, {v.n_heads} heads, MLP {v.hidden_dim}, projector {v.projector_output_dim}. Text: "
            f"benchmarks/configs.py small ({CONFIG.n_layers} layers, width {CONFIG.dim}, {CONFIG.n_experts} experts "
            f"top-{CONFIG.top_k}, expert FFN {CONFIG.expert_hidden_dim}, vocab {CONFIG.vocab_size}). Same random "
            f"weights; median of {args.repeats}; prefill = encode + forward to the last token's logits; engine = "
            f"`Engine.generate` of 1 token (chunks of 512). diff = max |herd - transformers| / max |transformers|. "
            f"Other load on the CPUs before each dtype: {busy}; "
            f"run took {time.perf_counter() - t0:.0f} s.\n\n"
            "| dtype | encode: transformers (s) | herd (s) | transformers / herd | prefill: transformers (s) | "
            "herd (s) | herd engine (s) | transformers / herd | diff: features | diff: logits |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    table = "".join(f"| {r['dtype']} | {r['hf_enc']:.4f} | {r['herd_enc']:.4f} | {r['hf_enc'] / r['herd_enc']:.2f}x | "
                    f"{r['hf_pre']:.4f} | {r['herd_pre']:.4f} | {r['engine_pre']:.4f} | "
                    f"{r['hf_pre'] / r['herd_pre']:.2f}x | {r['feat_diff']:.1e} | {r['logit_diff']:.1e} |\n"
                    for r in rows)
    print(head + table)
    if args.write:
        append_results(f"Command: `python benchmarks/vision.py --repeats {args.repeats} --dtypes {args.dtypes} "
                       "--write`\n\n" + head + table)


if __name__ == "__main__":
    main()
