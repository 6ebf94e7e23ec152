"""Torch stand-ins for the fused kernels megatron-core takes from Transformer Engine or Apex.

Without TE or Apex, megatron-core 0.19.2 runs plain-torch fallbacks in five places of
every training step, another kernel recompiles whenever SAT's width changes, and the
norms and the loss run as several memory-bound passes where one would do. The
fallbacks cost dense and SAT steps alike, but SAT more in proportion, because none of them
shrinks with the omission rate. :func:`apply` replaces them
(docs/performance.md has the measurements):

1. **RoPE** (``--no-rope-fusion``): ``rope_utils._apply_rotary_pos_emb_bshd`` is eager
   torch, about six full-size elementwise passes forward and backward over each of Q and
   K (slices, rotate-half's negation and concatenation, two products, a sum, a final
   concatenation). It is wrapped in ``torch.compile``, which fuses each direction into
   one kernel. The head dimension is dynamic, so one compilation serves Q, K and every
   kept head count of a LORS schedule (static per head count cost 1-2 s of compilation
   per ladder on an H100 and ran no faster: docs/performance.md).
2. **Adam**: megatron builds ``torch.optim.Adam``/``AdamW`` with torch's default
   multi-tensor ``foreach`` update, about ten passes over the fp32 optimizer state. The
   param groups are switched to torch's ``fused`` update (one pass), the role Apex's
   ``FusedAdam`` plays. Checkpoints do not change (the same state keys and values).
3. **Gradient norm**: megatron's local ``multi_tensor_l2norm`` stand-in builds a host
   tensor from per-parameter norms, one device-to-host copy (a GPU sync) per parameter.
   Replaced by ``torch._foreach_norm`` and one norm on the device.
4. **Gradient-accumulation fusion** (``--gradient-accumulation-fusion``, megatron's
   default): Apex's ``fused_weight_gradient_mlp_cuda`` adds the weight gradient GEMM
   straight into the fp32 ``main_grad``. Without it megatron must be run with
   ``--no-gradient-accumulation-fusion`` and computes a bf16 ``.grad`` per micro-batch
   that DDP then adds into ``main_grad``. :func:`wgrad_gemm_accum_fp32` provides the same
   call with ``torch.addmm(..., out_dtype=torch.float32)`` (a bf16 GEMM accumulating in
   fp32 into ``main_grad``), so the flag works without Apex. On CPU, which has no such
   GEMM, it computes the product and adds it.

5. **SwiGLU with a runtime width** (:mod:`megatron_sat.swiglu`, CUDA with Triton): the
   kept MLP width changes at every LORS ladder, and megatron's compiled SwiGLU then
   compiles again (1-2 s a ladder); the Triton kernels take the width as an argument.
6. **RMSNorm** (:mod:`megatron_sat.fused_rmsnorm`, CUDA with Triton):
   :class:`~megatron_sat.norm.TorchNorm` calls Triton kernels whose backward also reduces
   the weight gradient (torch's reads the activations twice), and a layer's two norms hand
   megatron the residual so that the backward pass also adds the residual stream's
   gradient, which autograd added in a separate pass (:mod:`megatron_sat.norm`; off the
   GPU a torch reference takes the same path, for the CPU tests).
7. **Cross-entropy** (:mod:`megatron_sat.fused_cross_entropy`, CUDA with Triton):
   megatron's ``--cross-entropy-fusion-impl native`` (a chain of compiled passes keeping an
   fp32 softmax) becomes one pass over the logits forward and one backward.
8. **Gradient clipping**: megatron's local ``multi_tensor_scale`` stand-in runs
   ``dst.copy_(src * scale)`` per parameter: two kernels and a temporary per tensor, about
   400 launches and four passes over the fp32 gradients per clipped step. Replaced by one
   ``torch._foreach_mul_`` (one pass, the same products bit for bit).
9. **Host synchronisations** (:mod:`megatron_sat.host_syncs`): megatron's training loop
   reads small GPU tensors on the host several times per iteration; the reads that carry no
   information on one model-parallel rank are answered on the host, the gradient norm and
   clipping stay on the device, and with ``--rerun-mode disabled`` the NaN/Inf checks are
   read at log lines and checkpoint saves, the optimizer skipping updates on the device.
10. **Manual garbage collection** (:mod:`megatron_sat.manual_gc`): with ``--manual-gc``
    megatron's periodic full collections stop walking the objects that live for the
    whole run (0.3 s of host time each on the H100 hosts).

``--no-sat-torch-fusions`` leaves megatron's fallbacks in place (for A/B benchmarks).
Nothing is replaced where TE or Apex provide the real kernel.
"""

from __future__ import annotations

import functools
import importlib.util
import types

import torch

from megatron_sat import host_syncs, manual_gc, norm

_applied = False


def apply() -> list[str]:
    """Install the stand-ins where megatron uses its plain-torch fallbacks; returns their
    names (empty on a second call)."""
    global _applied
    if _applied:
        return []
    _applied = True
    installed = []
    import megatron.core.models.common.embeddings.rope_utils as rope_utils
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as megatron_optimizer
    import megatron.core.tensor_parallel.layers as tp_layers
    import megatron.training.training as training

    if rope_utils.fused_apply_rotary_pos_emb is None and torch.cuda.is_available():
        rope_utils._apply_rotary_pos_emb_bshd = compiled_rope(
            rope_utils._apply_rotary_pos_emb_bshd)
        installed.append("compiled RoPE")
    if clip_grads.l2_norm_impl.__module__ == "megatron.core.utils":  # the local fallback
        clip_grads.l2_norm_impl = l2_norm
        installed.append("device gradient norm")
    if clip_grads.multi_tensor_scale_impl.__module__ == "megatron.core.utils":
        clip_grads.multi_tensor_scale_impl = scale_tensors
        megatron_optimizer.multi_tensor_scale_impl = scale_tensors
        installed.append("one-pass gradient clipping")
    if not tp_layers._grad_accum_fusion_available:
        installed.append("gradient-accumulation fusion")
        tp_layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
            wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32,
            wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp16)
        tp_layers._grad_accum_fusion_available = True
    training.get_megatron_optimizer = _with_fused_adam(training.get_megatron_optimizer)
    installed.append("fused Adam")
    installed += host_syncs.apply()  # after: its optimizer hook needs the fused update
    installed += manual_gc.apply()
    if not torch.cuda.is_available():  # the torch reference, so CPU runs take this path
        norm.RMS_NORM_WITH_RESIDUAL = norm.rms_norm_with_residual
        installed.append("residual gradient in the norm backward")
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        import megatron.core.models.common.language_module.language_module as language_module

        from megatron_sat import fused_cross_entropy, fused_rmsnorm, swiglu

        swiglu.install()
        installed.append("width-generic SwiGLU")
        norm.RMS_NORM = fused_rmsnorm.rms_norm
        norm.RMS_NORM_WITH_RESIDUAL = fused_rmsnorm.rms_norm_with_residual
        installed += ["Triton RMSNorm", "residual gradient in the norm backward"]
        language_module.fused_vocab_parallel_cross_entropy = _on_cuda(
            fused_cross_entropy.vocab_parallel_cross_entropy,
            language_module.fused_vocab_parallel_cross_entropy)
        installed.append("Triton cross-entropy")
    return installed


def _on_cuda(kernel_fn, fallback):
    """``kernel_fn`` for CUDA logits, ``fallback`` (megatron's function) otherwise."""

    @functools.wraps(kernel_fn)
    def fn(logits, *args):
        return (kernel_fn if logits.is_cuda else fallback)(logits, *args)

    return fn


def compiled_rope(rope_fn, backend: str = "inductor"):
    """megatron's eager RoPE ``rope_fn(t, freqs, ...)`` on t [s, b, heads, d], compiled
    with the head count dynamic and the other sizes static."""
    compiled = torch.compile(rope_fn, backend=backend)

    @functools.wraps(rope_fn)
    def rope(t, freqs, *args, **kwargs):
        if t.dim() == 4 and t.shape[2] > 1:  # torch specialises sizes 0 and 1
            torch._dynamo.mark_dynamic(t, 2)
        return compiled(t, freqs, *args, **kwargs)

    return rope


def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """``amp_C.multi_tensor_l2norm``'s call: the L2 norm of ``tensor_lists[0]`` as a
    1-element fp32 tensor on their device, without a host sync. Per-tensor norms are not
    supported (megatron's gradient clipping does not ask for them)."""
    if per_tensor:
        raise NotImplementedError("per-tensor norms are not supported")
    tensors = tensor_lists[0]
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t
                                 for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def scale_tensors(chunk_size, noop_flag, tensor_lists, scale):
    """``amp_C.multi_tensor_scale``'s call: ``dst = src * scale`` for each pair of
    ``tensor_lists`` = [sources, destinations], in one multi-tensor pass (in place when
    they are the same tensors, as in gradient clipping; a copy when the scale is 1).
    ``scale`` may be a one-element device tensor (Transformer Engine's
    ``multi_tensor_scale_tensor``): then the host never reads it."""
    sources, destinations = tensor_lists
    if not destinations:
        return
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(())
    if all(s is d for s, d in zip(sources, destinations)):
        torch._foreach_mul_(destinations, scale)
    elif not isinstance(scale, torch.Tensor) and scale == 1.0:
        torch._foreach_copy_(destinations, sources)
    else:
        torch._foreach_copy_(destinations, torch._foreach_mul(sources, scale))


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """``main_grad += grad_output^T @ total_input`` in fp32 (Apex's call: input [tokens,
    in], grad_output [tokens, out], main_grad [out, in])."""
    if main_grad.is_cuda and total_input.dtype != torch.float32:
        torch.addmm(main_grad, grad_output.t(), total_input, out_dtype=torch.float32,
                    out=main_grad)
    else:
        main_grad.add_(torch.matmul(grad_output.t(), total_input).to(main_grad.dtype))


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor,
                          main_grad: torch.Tensor) -> None:
    """The same for a half-precision ``main_grad`` (``--accumulate-allreduce-grads-in-fp32``
    off): a plain in-place ``addmm_``."""
    main_grad.addmm_(grad_output.t().to(main_grad.dtype), total_input.to(main_grad.dtype))


def torch_adams(optimizer) -> list:
    """The torch Adam/AdamW instances inside megatron's (possibly chained) optimizer."""
    found = []
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            found.append(inner)
    return found


def use_fused_update(adam) -> None:
    """Switch a torch Adam(W) to its fused update, now and after every ``load_state_dict``
    (which would otherwise bring back the saved groups' ``fused`` setting)."""

    def fuse():
        for group in adam.param_groups:
            group["fused"], group["foreach"] = True, False
            for param in group["params"]:
                step = adam.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device != param.device:
                    adam.state[param]["step"] = step.to(param.device, torch.float32)

    load_state_dict = adam.load_state_dict

    @functools.wraps(load_state_dict)
    def load_then_fuse(state_dict):
        load_state_dict(state_dict)
        fuse()

    adam.load_state_dict = load_then_fuse
    fuse()


def _with_fused_adam(get_megatron_optimizer):
    @functools.wraps(get_megatron_optimizer)
    def wrapper(*args, **kwargs):
        optimizer = get_megatron_optimizer(*args, **kwargs)
        for adam in torch_adams(optimizer):
            use_fused_update(adam)
        return optimizer

    return wrapper
