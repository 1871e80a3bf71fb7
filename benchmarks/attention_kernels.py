"""The image tower's attention through each CPU kernel at hand, against the fp32 matmul peak (the README's Performance
figures on what limits the peak fractions).

One layer's masked self-attention at full size (1 + prompts + 32 x 32 patches + 16 region tokens: 1051 with VOC's
presets, 1141 with COCO-Stuff's; 12 heads of 64, the Region-Level Bridge's additive mask; random fp32 states,
inference), timed through:

- `blocked attention`: the model's kernel ([`~clip_rc.fused_ops.blocked_attention`]);
- `SDPA`: PyTorch's `scaled_dot_product_attention` (its CPU flash kernel);
- `flex_attention, compiled` (with `--flex`; needs a C++ compiler): Inductor's fused CPU attention;
- the blocked kernel's parts alone: its two products per block (`QK^T` and `PV`, no softmax), the ceiling of any
  kernel built from these products, and the masked softmax of its blocks (no products);
- for scale, the layer's six linear products (`q`, `k`, `v`, output projection, the two feed-forward layers).

Each variant runs `--repeats` times in turns with the others (a change of machine load hits all alike); the table gives
the best time, the GFLOP/s (attention: 4 x tokens^2 x head_dim x heads) and their share of the matmul peak measured in
the same run, and the largest difference of each full kernel's output from SDPA's. The last line bounds a tower
layer's share of the peak: its linear products at their rate and its attention at the products-only rate.

    python benchmarks/attention_kernels.py --threads 2 --repeats 10 --flex
"""

import argparse
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from clip_rc import CLIPRCConfig
from clip_rc.fused_ops import _query_blocks, blocked_attention
from clip_rc.modeling_clip_rc import build_region_attention_mask
from clip_rc.onednn import interleaved_best_seconds, linear
from clip_rc.profiling import matmul_peak_gflops


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="voc-inductive")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--flex", action="store_true", help="Also Inductor's compiled flex_attention.")
    parser.add_argument("--grid_size", type=int, help="Patch grid side (default: the preset's; small for tests).")
    return parser.parse_args(argv)


class Variant(NamedTuple):
    function: Callable[[], torch.Tensor | None]
    gflop: float | None  # None: no rate (the softmax alone)
    full_kernel: bool  # returns the attention's output, compared with SDPA's


PRODUCTS_ONLY, LINEAR_PRODUCTS = "blocked: its two products only", "the layer's six linear products"


def attention_inputs(preset: str, grid_size: int | None) -> dict:
    """Random `(1, heads, tokens, head_dim)` queries, keys and values laid out as the tower makes them (views of
    `(1, tokens, heads * head_dim)` projections), the additive region mask `(tokens, tokens)`, and the layer's
    hidden states `(tokens, width)` and linear weights (`q`, `k`, `v`, output, feed-forward in and out)."""
    config = CLIPRCConfig.from_preset(preset)
    grid_size = grid_size or config.patch_grid_size
    allowed = build_region_attention_mask(config.num_prompt_tokens, grid_size, grid_size, config.region_grid_size)
    num_tokens, num_heads = allowed.shape[0], config.vision_config.num_attention_heads
    width, intermediate = config.vision_config.hidden_size, config.vision_config.intermediate_size
    generator = torch.Generator().manual_seed(0)
    states = {
        name: torch.randn(1, num_tokens, width, generator=generator)
        .view(1, num_tokens, num_heads, width // num_heads)
        .transpose(1, 2)
        for name in ("query", "key", "value")
    }
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    weight_shapes = [(width, width)] * 4 + [(intermediate, width), (width, intermediate)]
    weights = [torch.randn(shape, generator=generator) / shape[1] ** 0.5 for shape in weight_shapes]
    hidden_states = torch.randn(num_tokens, width, generator=generator)
    return {**states, "mask": mask, "hidden_states": hidden_states, "weights": weights}


def _blocks_of(inputs: dict):
    """Per head and block of queries: `(scaled queries, keys, value columns, mask rows)`, dense rows as the blocked
    kernel makes them."""
    query, key, value, mask = inputs["query"][0], inputs["key"][0], inputs["value"][0], inputs["mask"]
    scale = query.shape[-1] ** -0.5
    blocks = _query_blocks(query.shape[1], key.shape[1])
    for head in range(query.shape[0]):
        scaled_query, keys = (query[head] * scale).contiguous(), key[head].contiguous()
        value_columns = value[head].t().contiguous()
        for block in blocks:
            yield scaled_query[block], keys, value_columns, mask[block]


def products_only(inputs: dict) -> None:
    for scaled_query, keys, value_columns, _ in _blocks_of(inputs):
        linear(linear(scaled_query, keys), value_columns)


def softmax_only(inputs: dict) -> None:
    scores = torch.randn(_query_blocks(*inputs["mask"].shape)[0].stop, inputs["mask"].shape[1])
    for _, _, _, mask_rows in _blocks_of(inputs):
        # The copy stands for the product that writes the block's scores.
        block_scores = scores[: mask_rows.shape[0]].clone()
        block_scores += mask_rows
        block_scores.softmax(dim=-1)


def linear_products(inputs: dict) -> None:
    *projections, feed_forward_in, feed_forward_out = inputs["weights"]
    for weight in projections:
        linear(inputs["hidden_states"], weight)
    linear(linear(inputs["hidden_states"], feed_forward_in), feed_forward_out)


def variants(inputs: dict, flex: bool) -> dict[str, Variant]:
    """The timed variants by name; the full attention kernels return `(1, heads, tokens, head_dim)`."""
    query, key, value, mask = inputs["query"], inputs["key"], inputs["value"], inputs["mask"]
    _, num_heads, num_tokens, head_dim = query.shape
    attention_gflop = 4 * num_tokens**2 * head_dim * num_heads / 1e9
    linear_gflop = sum(2 * num_tokens * weight.numel() for weight in inputs["weights"]) / 1e9
    scale = head_dim**-0.5
    functions = {
        "blocked attention": Variant(
            lambda: blocked_attention(query, key, value, scale, additive_mask=mask[None, None]), attention_gflop, True
        ),
        "SDPA": Variant(
            lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale),
            attention_gflop,
            True,
        ),
    }
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)

        def add_mask(score, batch, head, query_index, key_index):
            return score + mask[query_index, key_index]

        functions["flex_attention, compiled"] = Variant(
            lambda: compiled(query, key, value, score_mod=add_mask, scale=scale), attention_gflop, True
        )
    functions[PRODUCTS_ONLY] = Variant(lambda: products_only(inputs), attention_gflop, False)
    functions["blocked: its masked softmax only"] = Variant(lambda: softmax_only(inputs), None, False)
    functions[LINEAR_PRODUCTS] = Variant(lambda: linear_products(inputs), linear_gflop, False)
    return functions


def report(inputs: dict, functions: dict[str, Variant], seconds: dict[str, float], peak: float, threads: int) -> str:
    """What was measured, a Markdown table of the variants, and the bound on a tower layer's share of the peak."""
    _, num_heads, num_tokens, head_dim = inputs["query"].shape
    with torch.no_grad():
        expected = functions["SDPA"].function()
        differences = {
            name: (variant.function() - expected).abs().max().item()
            for name, variant in functions.items()
            if variant.full_kernel
        }
    lines = [
        f"{num_tokens} tokens, {num_heads} heads of {head_dim}, {threads} threads; fp32 matmul peak {peak:.0f} GFLOP/s",
        "| variant | ms | GFLOP/s | % of peak | max difference from SDPA |",
        "|---|---|---|---|---|",
    ]
    for name, variant in functions.items():
        rate = variant.gflop / seconds[name] if variant.gflop else None
        rate_cells = f"| {rate:.0f} | {rate / peak:.0%} " if rate else "| | "
        difference = f"{differences[name]:.1e}" if name in differences else ""
        lines.append(f"| {name} | {1000 * seconds[name]:.1f} {rate_cells}| {difference} |")
    layer_gflop = functions[PRODUCTS_ONLY].gflop + functions[LINEAR_PRODUCTS].gflop
    bound = layer_gflop / (seconds[PRODUCTS_ONLY] + seconds[LINEAR_PRODUCTS]) / peak
    lines.append(
        f"a tower layer at best (its linear products, attention at the products-only rate): {bound:.0%} of peak"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    inputs = attention_inputs(args.preset, args.grid_size)
    functions = variants(inputs, args.flex)
    with torch.no_grad():
        seconds = interleaved_best_seconds(
            {name: variant.function for name, variant in functions.items()}, args.repeats
        )
    peak = matmul_peak_gflops(torch.float32, args.threads, "cpu")
    sys.stdout.write(report(inputs, functions, seconds, peak, args.threads) + "\n")


if __name__ == "__main__":
    main()
