"""Compile every megaseg Triton kernel for a CUDA target without a GPU (Triton's own ptxas), so that code the
interpreter accepts but the compiler would refuse is caught on a CPU-only machine. Run in a process without
TRITON_INTERPRET (``test_kernels_compile.py`` does); prints one JSON object: {kernel variant: "ok" | error}.

    python tests/kernels/kernel_compile.py [--arch 90]
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def _variants():
    from megaseg.kernels import reward_shaping, scan, segment_reduce, vocab_partials

    p32, p64, pu8, pi64, pi32 = "*fp32", "*fp64", "*u8", "*i64", "*i32"
    for how in range(4):
        for acc, ptr in ((tl.float32, p32), (tl.float64, p64)):
            sig = {"values_ptr": ptr, "ends_ptr": pu8, "cu_ptr": pi64, "out_ptr": ptr, "count_ptr": pi64,
                   "aux_ptr": pi64, "HOW": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr"}
            consts = {"HOW": how, "ACC": acc, "BLOCK": segment_reduce.BLOCK}
            yield f"segment_reduce_forward[how={how},{ptr}]", segment_reduce._segment_reduce_forward, sig, consts
            sig_b = dict(sig, grad_out_ptr=ptr, grad_ptr=ptr)
            sig_b = {k: sig_b[k] for k in segment_reduce._segment_reduce_backward.arg_names}
            yield (f"segment_reduce_backward[how={how},{ptr}]", segment_reduce._segment_reduce_backward, sig_b,
                   consts)
    for dtype in ("*bf16", "*fp32"):
        for has_tokens in (True, False):
            sig = {"logits_ptr": dtype, "row_stride": "i64", "tokens_ptr": pi64, "vocab_start": "i64",
                   "vocab": "i32", "partials_ptr": p32, "HAS_TOKENS": "constexpr", "BLOCK_V": "constexpr"}
            yield (f"shard_partials[{dtype},tokens={has_tokens}]", vocab_partials._shard_partials_kernel, sig,
                   {"HAS_TOKENS": has_tokens, "BLOCK_V": vocab_partials.BLOCK_V})
        for log_prob, entropy in ((True, False), (False, True), (True, True)):
            sig = {"logits_ptr": dtype, "row_stride": "i64", "grad_ptr": dtype, "lse_ptr": p32,
                   "grad_log_probs_ptr": p32, "grad_entropy_ptr": p32, "entropy_ptr": p32, "tokens_ptr": pi64,
                   "vocab_start": "i64", "vocab": "i32", "LOG_PROB": "constexpr", "ENTROPY": "constexpr",
                   "BLOCK_V": "constexpr"}
            yield (f"shard_grad[{dtype},log_prob={log_prob},entropy={entropy}]", vocab_partials._shard_grad_kernel,
                   sig, {"LOG_PROB": log_prob, "ENTROPY": entropy, "BLOCK_V": vocab_partials.BLOCK_V})
    for acc, ptr in ((tl.float32, p32), (tl.float64, p64)):
        sig = {"rewards_ptr": ptr, "values_ptr": ptr, "mask_ptr": pu8, "cu_ptr": pi64, "adv_ptr": ptr,
               "ret_ptr": ptr, "gamma": "fp32", "log2_decay": "fp32", "ACC": "constexpr", "BLOCK": "constexpr"}
        yield f"gae[{ptr}]", scan._gae_kernel, sig, {"ACC": acc, "BLOCK": scan.GAE_BLOCK}
    sig = {"values_ptr": p32, "mask_ptr": pu8, "num": "i64", "partials_ptr": p64, "BLOCK": "constexpr"}
    yield "masked_moments", scan._moments_kernel, sig, {"BLOCK": scan.MOMENTS_BLOCK}
    for norm in range(3):
        for mode in range(3):
            for kl in range(4):
                sig = {"raw_ptr": p32, "ends_ptr": pu8, "mask_ptr": pu8, "logp_ptr": p32, "ref_ptr": p32,
                       "end_at_ptr": pi32, "end_raw_ptr": p32, "normalized_ptr": p32, "token_ptr": p32, "rewards_ptr": p32,
                       "kl_ptr": p32, "seq": "i32",
                       **{k: "fp32" for k in ("p_min", "w_mu", "b_mu", "w_sigma", "b_sigma", "log_eps", "clip",
                                             "kl_coef")},
                       "NORM": "constexpr", "MODE": "constexpr", "KL": "constexpr", "BLOCK": "constexpr"}
                yield (f"shape_rewards[norm={norm},mode={mode},kl={kl}]", reward_shaping._shape_rewards_kernel, sig,
                       {"NORM": norm, "MODE": mode, "KL": kl, "BLOCK": reward_shaping.BLOCK})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="one variant per kernel")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    results, seen = {}, set()
    for name, fn, signature, constexprs in _variants():
        kernel = name.split("[")[0]
        if args.quick and kernel in seen:
            continue
        seen.add(kernel)
        assert isinstance(fn, triton.runtime.JITFunction), "the kernels were defined in the interpreter"
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target)
            results[name] = "ok" if compiled.asm.get("cubin") else "no cubin"
        except Exception as error:  # report every kernel, not only the first failure
            results[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
