"""Kernel time by class, GPU busy %, launches and host syncs per step, from a torch.profiler trace
(benchmarks/gpu_profile.py). Importable without a GPU: on a CPU the leaf `aten::`/`bitsandbytes::` ops stand in
for kernels (their self CPU time), so the same code runs in `make test`.

A kernel is classed in two declared steps, first match wins:
1. CONTEXT: the names of the ops and ranges it was launched from (innermost first), so a GEMM inside TRL's
   fused LM head (`_ChunkedLogProbFunction`, labelled by gpu_profile.py) counts as the LM head, a foreach
   kernel inside `Optimizer.step` (torch's own range) as the optimizer;
2. KERNEL: the kernel's own name (the CUDA name on a GPU, the op name on a CPU).
Anything else is "other" (copies, memsets, embedding lookups, index kernels).
"elementwise" is every memory-bound kernel: elementwise, layer norm, softmax, reductions, foreach outside the
optimizer. Typical CUDA names each row is written for: CUDA_EXAMPLES below (tests/benchmarks/test_gpu_profile.py).
"""

from __future__ import annotations

import collections
import re

CLASSES = ("gemm", "dequantize", "elementwise", "attention", "lm_head", "optimizer", "other")

CONTEXT = (  # regex on an enclosing op or range name -> class
    (r"_ChunkedLogProbFunction|profile::lm_head", "lm_head"),
    (r"^Optimizer\.step|^optimizer::", "optimizer"),
    (r"^bitsandbytes::dequantize", "dequantize"),  # its pure-torch ops on a CPU; a CUDA dequantize is one kernel
    (r"scaled_dot_product|_flash_attention|_efficient_attention|flex_attention", "attention"),
)
KERNEL = (  # regex on the kernel's (or, on a CPU, the leaf op's) own name -> class
    (r"kDequantize|kgemm_4bit|kQuantize|dequantize_4bit|dequantize_blockwise", "dequantize"),
    (r"flash_(fwd|bwd)|fmha|AttentionKernel|attention_kernel|_efficient_attention|_flash_attention", "attention"),
    (r"FusedAdam|fused_adam|_fused_adamw|adam_kernel", "optimizer"),
    (
        r"gemm|gemv|nvjet|xmma|cutlass|s16816|cublas|^aten::(mm|addmm|bmm|baddbmm|_addmm_activation|matmul|linear)$",
        "gemm",
    ),
    (
        r"elementwise|vectorized|layer_norm|softmax|SoftMax|reduce_kernel|multi_tensor_apply|GeluCUDA|"
        r"^aten::(add|sub|mul|div|pow|tanh|gelu|gelu_backward|neg|exp|log|sum|mean|native_layer_norm|"
        r"native_layer_norm_backward|_softmax|_log_softmax|logsumexp|copy|clamp|where|fill|zero|sqrt|rsqrt|"
        r"_foreach_\w+|norm|linalg_vector_norm|cat|silu|relu|dropout|native_dropout|masked_fill)_?$",
        "elementwise",
    ),
)
_CONTEXT = [(re.compile(p), c) for p, c in CONTEXT]
_KERNEL = [(re.compile(p), c) for p, c in KERNEL]

# Typical kernel names the tables are written for, and where such names come from (what a trace shows).
CUDA_EXAMPLES = {
    # cuBLAS on A100 (sm80 tensor cores), in torch.profiler traces of bf16 matmuls
    "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_nn": "gemm",
    # cuBLAS on H100/H200 (sm90 warp-group MMA), CUDA 12.x
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas": "gemm",
    # cuBLAS 12.8+/13 on Hopper names its kernels nvjet_*
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT": "gemm",
    "void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8>(cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x1_tn_align8::Params)": "gemm",
    "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false, cublasGemvParamsEx<int, float const*, float const*, float*, float>>": "gemm",
    # bitsandbytes csrc/kernels.cu: NF4 blockwise dequantization (DATA_TYPE 2) and its 4-bit inference gemv
    "void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, int, int)": "dequantize",
    "void kDequantizeBlockwise<float, 512, 64, 8, 0>(float*, unsigned char*, float*, float*, int, int)": "dequantize",
    "void kgemm_4bit_inference_naive<__nv_bfloat16, 128, 16>(int, int, int, __nv_bfloat16*, unsigned char*, float*, float const*, __nv_bfloat16*, int, int, int, int)": "dequantize",
    # PyTorch's SDPA backends: flash (aten/src/ATen/native/transformers/cuda/flash_attn) and memory-efficient
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t>>, false, true, false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)": "attention",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8, 2, 4, 2, false, false, cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 8, cutlass::bfloat16_t>>, true, false, false, false, false, false>(pytorch_flash::Flash_bwd_params)": "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)": "attention",
    # PyTorch's elementwise / norm / reduction kernels (aten/src/ATen/native/cuda)
    "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul>>(int, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, at::native::GeluType)::{lambda()#2}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul>)": "elementwise",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>, 4, TrivialOffsetCalculator<1, unsigned int>, TrivialOffsetCalculator<1, unsigned int>, at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1>>(int, ...)": "elementwise",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, float const*, float const*, float const*, float*, float*, float*)": "elementwise",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, unsigned int, float, 4, 4>>(at::native::ReduceOp<...>)": "elementwise",
    # torch.optim.AdamW(fused=True) (aten/src/ATen/native/cuda/fused_adamw_impl.cu) and a foreach kernel
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>, float*, double, double, double, double, double, bool, float*, float*>(...)": "optimizer",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<1>, at::native::(anonymous namespace)::LpNormFunctor<float, (at::native::(anonymous namespace)::NormType)1, float, float>, float*, int>(...)": "elementwise",
    # CUDA runtime copies and memsets, an embedding lookup
    "Memcpy HtoD (Pageable -> Device)": "other",
    "Memset (Device)": "other",
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>(...)": "other",
}

LAUNCHES = re.compile(r"^(cudaLaunchKernel|cudaLaunchKernelExC|cuLaunchKernel|cuLaunchKernelEx|cudaGraphLaunch)")
# Host syncs on a GPU: the runtime calls that block the host (an item()/nonzero's copy waits in one of them).
CUDA_SYNCS = re.compile(r"^(cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize|cuStreamSynchronize)")
# On a CPU: the ops that are host syncs on a GPU (benchmarks/step_work.py's SYNC_OPS).
CPU_SYNC_OPS = frozenset(
    {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim"}
)


def classify(name: str, context: tuple = ()) -> str:
    """The class of a kernel called `name` launched inside the ops/ranges `context` (innermost first)."""
    for pattern, cls in _CONTEXT:
        if any(pattern.search(outer) for outer in context):
            return cls
    for pattern, cls in _KERNEL:
        if pattern.search(name):
            return cls
    return "other"


def _context(event) -> tuple:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return tuple(names)


def summarize(events, steps: int, window_us: float | None = None) -> dict:
    """Per profiled step: kernel time (ms) by class, launches, host syncs; GPU busy % of the window. `events`:
    profiler.events() of `steps` steps. With CUDA kernels in the trace they are counted; without (a CPU), the leaf
    ops stand in for kernels: their self CPU time by class, and one launch per leaf op (as on a GPU every op that
    computes launches at least one kernel)."""
    from torch.autograd import DeviceType

    events = list(events)
    by_class = collections.Counter({c: 0.0 for c in CLASSES})
    by_name = collections.Counter()  # (class, name) -> microseconds: the largest few are reported per class
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    if device:
        source = "cuda kernels"
        for op in cpu:
            for kernel in op.kernels:
                cls = classify(kernel.name, (op.name, *_context(op)))
                by_class[cls] += kernel.duration
                by_name[cls, kernel.name] += kernel.duration
        launches = sum(1 for e in cpu if LAUNCHES.search(e.name))
        syncs = sum(1 for e in cpu if CUDA_SYNCS.search(e.name))
        intervals = sorted((e.time_range.start, e.time_range.end) for e in device)
    else:
        source = "cpu leaf ops (stand-in for kernels)"
        ops = [e for e in cpu if "::" in e.name and not e.name.startswith("profile::")]
        leaves = [e for e in ops if not any("::" in c.name for c in e.cpu_children)]
        for op in ops:  # self time: a GEMM op's time is its own, not its children's
            cls = classify(op.name, (op.name, *_context(op)))
            by_class[cls] += op.self_cpu_time_total
            by_name[cls, op.name] += op.self_cpu_time_total
        launches, syncs = len(leaves), sum(1 for e in ops if e.name in CPU_SYNC_OPS)
        intervals = sorted((e.time_range.start, e.time_range.end) for e in leaves)
    busy = _union(intervals)
    if window_us is None and events:
        window_us = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    return {
        "source": source,
        "steps": steps,
        "kernel_ms_per_step": {c: by_class[c] / 1000 / steps for c in CLASSES},
        "top": {  # per class, the 3 largest names (cut to 100 characters) and their ms per step
            c: [[n[:100], us / 1000 / steps] for (k, n), us in by_name.most_common() if k == c][:3] for c in CLASSES
        },
        "busy_pct": 100 * busy / window_us if window_us else None,
        "launches_per_step": launches / steps,
        "syncs_per_step": syncs / steps,
    }


def _union(intervals) -> float:
    """Total length covered by sorted (start, end) intervals."""
    total, end = 0.0, None
    for start, stop in intervals:
        if end is None or start > end:
            total, end = total + stop - start, stop
        elif stop > end:
            total, end = total + stop - end, stop
    return total
