"""One layer's LoRA initialisation replayed allocation by allocation, in peft 0.21.2's order, for
``memplan.plan.init_phase`` (which sums it with what is resident). Sizes in bytes; fp32 is 4 bytes a value.

Each step cites the peft / bitsandbytes line it stands for; tests/plan/test_init_phase.py compares the replay with
peft's real initialisation on CPU under the storage tracker (memplan.measure.init_measure).
"""

from __future__ import annotations

from memplan.units import ceil_div, round_up

from .weights import NF4_BLOCK, NF4_CODE_VALUES

__all__ = ["layer_replay", "own_weight_bytes"]




class _Live:
    """Named allocations alive now; remembers what was alive at the highest level."""

    def __init__(self, rnd: int):
        self.rnd, self.live, self.level, self.peak, self.at_peak = rnd, {}, 0, 0, {}

    def add(self, name: str, nbytes: int) -> None:
        self.live[name] = round_up(nbytes, self.rnd) if nbytes else 0
        self.level += self.live[name]
        if self.level > self.peak:
            self.peak, self.at_peak = self.level, dict(self.live)

    def drop(self, *names: str) -> None:
        for name in names:
            self.level -= self.live.pop(name, 0)


def _decompose(d: _Live, tag: str, m: int, n: int, r: int, cuda: bool) -> None:
    """peft/utils/loftq_utils.py _low_rank_decomposition: svd, then L = U @ sqrt(diag(S)[:, :r]) and
    R = sqrt(diag(S)[:r, :]) @ Vh, each with a k x k diag(S) alive while its sqrt is taken."""
    k = min(m, n)
    if cuda:
        d.add("solver: svd input copy", m * n * 4)
    d.add(f"U{tag} ({m} x {k})", m * k * 4)
    d.add(f"S{tag}", k * 4)
    d.add(f"Vh{tag} ({k} x {n})", k * n * 4)
    d.drop("solver: svd input copy")
    d.add("diag(S) (k x k)", k * k * 4)
    d.add("sqrt(diag(S)) slice", k * r * 4)
    d.drop("diag(S) (k x k)")
    d.add(f"L{tag} (m x r)", m * r * 4)
    d.drop("sqrt(diag(S)) slice")
    d.add("diag(S) (k x k)", k * k * 4)
    d.add("sqrt(diag(S)) slice", r * k * 4)
    d.drop("diag(S) (k x k)")
    d.add(f"R{tag} (r x n)", r * n * 4)
    d.drop("sqrt(diag(S)) slice")


def _bnb_layer(d: _Live, tag: str, m: int, n: int, bits: int, double_quant: bool) -> tuple[str, ...]:
    """A bitsandbytes weight's storage (memplan.plan.weights): 4-bit packed + constants, or int8 + row scales."""
    if bits == 8:
        d.add(f"int8 W {tag}", m * n)
        d.add(f"SCB {tag}", m * 4)
        return f"int8 W {tag}", f"SCB {tag}"
    blocks = ceil_div(m * n, NF4_BLOCK)
    d.add(f"4-bit W {tag}", ceil_div(m * n, 2))
    d.add(f"4-bit code {tag}", NF4_CODE_VALUES * 4)
    if not double_quant:
        d.add(f"absmax {tag}", blocks * 4)
        return f"4-bit W {tag}", f"4-bit code {tag}", f"absmax {tag}"
    d.add(f"absmax {tag}", blocks)
    d.add(f"absmax2 {tag}", ceil_div(blocks, 256) * 4 + 256 * 4 + 4)  # (DQ_BLOCK; 256-entry code, offset)
    return f"4-bit W {tag}", f"4-bit code {tag}", f"absmax {tag}", f"absmax2 {tag}"


def layer_replay(kind: str, path: str, *, m: int, n: int, r: int, wb: int, compute_b: int, bits: int,
                 loftq_bits: int, loftq_iter: int, niter: int, double_quant: bool, adapter_b: int, cuda: bool,
                 rnd: int) -> tuple[dict[str, int], dict[str, int]]:
    """(device components at this layer's peak, host components at its host peak), the layer's own weight and
    adapter included. ``wb``: bytes per value of the float load; ``adapter_b``: what peft casts adapters to."""
    d, h = _Live(rnd), _Live(rnd)
    kbit = path == "kbit_model"
    if kbit:
        old_w = _bnb_layer(d, "(this layer)", m, n, bits, double_quant)
    else:
        old_w = ("W (this layer)",)
        d.add("W (this layer)", m * n * wb)
    replace = kind == "loftq" and kbit
    a_b = adapter_b if replace else 4  # update_layer's nn.Linear adapters are fp32 until peft casts them
    d.add("LoRA A before (r x n)", r * n * a_b)
    d.add("LoRA B before (m x r)", m * r * a_b)
    if replace:  # peft/utils/loftq_utils.py _loftq_init_new
        h.add("layer read from safetensors (host)", m * n * wb)
        d.add("dequantized W (compute dtype)", m * n * compute_b)
        if cuda or wb != 4:
            d.add("W fp32 (checkpoint .to(cuda, float32))", m * n * 4)
        d.add("residual fp32", m * n * 4)
        _decompose(d, "", m, n, r, cuda)
        d.drop("dequantized W (compute dtype)", "W fp32 (checkpoint .to(cuda, float32))", "residual fp32",
               *(k for k in list(d.live) if k.startswith(("U (", "Vh (")) or k == "S"), "LoRA A before (r x n)",
               "LoRA B before (m x r)")
        return d.at_peak, h.at_peak
    if kind == "loftq":
        _loftq_full(d, h, m, n, r, wb, loftq_bits, loftq_iter, cuda)
    else:
        if kbit:  # peft/utils/integrations.py dequantize_module_weight, then .to(float32)
            d.add("dequantized W", m * n * (4 if bits == 8 else compute_b))
            if bits != 8:
                d.add("W fp32", m * n * 4)
                d.drop("dequantized W")
        elif wb != 4:
            d.add("W fp32", m * n * 4)
        wf = "dequantized W" if (kbit and bits == 8) else "W fp32"
        k = min(m, n)
        if kind == "olora":
            if cuda:
                d.add("solver: qr input copy", m * n * 4)
            d.add(f"Q ({m} x {k})", m * k * 4)
            d.add(f"R ({k} x {n})", k * n * 4)
            d.drop("solver: qr input copy")
            outs = (f"Q ({m} x {k})", f"R ({k} x {n})")
        elif niter:  # torch.svd_lowrank (torch/_lowrank.py): its m x r / n x r temporaries are not counted
            d.add(f"svd_lowrank U ({m} x {r})", m * r * 4)
            d.add("svd_lowrank S", r * 4)
            d.add(f"svd_lowrank V ({n} x {r})", n * r * 4)
            outs = (f"svd_lowrank U ({m} x {r})", "svd_lowrank S", f"svd_lowrank V ({n} x {r})")
        else:
            if cuda:
                d.add("solver: svd input copy", m * n * 4)
            d.add(f"V ({m} x {k})", m * k * 4)
            d.add("S", k * 4)
            d.add(f"Uh ({k} x {n})", k * n * 4)
            d.drop("solver: svd input copy")
            outs = (f"V ({m} x {k})", "S", f"Uh ({k} x {n})")
        d.add("LoRA A new (r x n, fp32)", r * n * 4)
        d.add("LoRA B new (m x r, fp32)", m * r * 4)
        d.drop("LoRA A before (r x n)", "LoRA B before (m x r)")
        d.add("scaling * B", m * r * 4)
        d.add("B @ A (m x n fp32)", m * n * 4)
        d.drop("scaling * B")
        if kind == "pissa":  # W - scaling * B @ A: a new tensor; olora subtracts in place
            d.add("W - scaling * B @ A (fp32)", m * n * 4)
            wf = "W - scaling * B @ A (fp32)"
            d.drop("W fp32", "B @ A (m x n fp32)")
        d.drop("B @ A (m x n fp32)")
        if kbit:  # a fresh Params4bit / Int8Params from the residual, then the old one is released
            if bits == 8:
                d.add("fp16 copy for Int8Params", m * n * 2)
                _bnb_layer(d, "(requantized)", m, n, 8, double_quant)
                d.drop("fp16 copy for Int8Params")
            else:
                _bnb_layer(d, "(requantized)", m, n, 4, double_quant)
        elif wb != 4:
            d.add("W residual (load dtype)", m * n * wb)
        d.drop(*old_w, wf, *outs)
    _cast_adapters(d, r, m, n, adapter_b)
    return d.at_peak, h.at_peak


def _loftq_full(d: _Live, h: _Live, m, n, r, wb, bits, iters, cuda) -> None:
    """peft/utils/loftq_utils.py loftq_init, called by LoraLayer.loftq_init."""
    if wb != 4:
        d.add("W fp32", m * n * 4)
    d.add("res", m * n * 4)
    prev_q: tuple[str, ...] = ()
    for i in range(1, iters + 1):
        if cuda:
            h.add("residual copied to the host (res.to('cpu'))", m * n * 4)
        if bits == 4:
            if cuda:  # Params4bit._quantize: self.data.contiguous().to(device)
                d.add("residual back on the device (Params4bit._quantize)", m * n * 4)
            q = _bnb_layer(d, f"(LoftQ quantized, iter {i})", m, n, 4, False)
            d.drop("residual back on the device (Params4bit._quantize)")
        else:  # Int8Params._quantize: .to(device, float16), int8_vectorwise_quant
            d.add("fp16 copy for Int8Params", m * n * 2)
            q = _bnb_layer(d, f"(LoftQ quantized, iter {i})", m, n, 8, False)
            d.drop("fp16 copy for Int8Params")
        h.drop("residual copied to the host (res.to('cpu'))")
        d.drop(*prev_q)
        prev_q = q
        d.add(f"dequantized fp32 (iter {i})", m * n * 4)
        d.drop(f"dequantized fp32 (iter {i - 1})")
        d.add("res = W - dequantized", m * n * 4)
        d.drop("res")
        d.live["res"] = d.live.pop("res = W - dequantized")
        _decompose(d, f" (iter {i})", m, n, r, cuda)
        d.drop(*(k for k in list(d.live) if k.startswith(("U (iter", "S (iter", "Vh (iter", "L (iter", "R (iter"))
                 and f"(iter {i})" not in k))
        if i < iters:
            d.add("L @ R", m * n * 4)
            d.add("res = W - L @ R", m * n * 4)
            d.drop("L @ R", "res")
            d.live["res"] = d.live.pop("res = W - L @ R")
    if wb != 4:
        d.add("dequantized W returned (load dtype)", m * n * wb)
    d.drop("W fp32", "res", *prev_q, f"dequantized fp32 (iter {iters})", "LoRA A before (r x n)",
           "LoRA B before (m x r)", "W (this layer)",
           *(k for k in list(d.live) if k.startswith(("U (iter", "S (iter", "Vh (iter"))))
    d.live["LoRA A new (r x n, fp32)"] = d.live.pop(f"R (iter {iters}) (r x n)")
    d.live["LoRA B new (m x r, fp32)"] = d.live.pop(f"L (iter {iters}) (m x r)")


def _cast_adapters(d: _Live, r: int, m: int, n: int, adapter_b: int) -> None:
    """peft's _move_adapter_to_device_of_base_layer: the new fp32 A and B cast to the base layer's dtype."""
    if adapter_b != 4:
        d.add("LoRA A cast", r * n * adapter_b)
        d.drop("LoRA A new (r x n, fp32)")
        d.add("LoRA B cast", m * r * adapter_b)
        d.drop("LoRA B new (m x r, fp32)")


def own_weight_bytes(path: str, m: int, n: int, wb: int, bits: int, double_quant: bool, rnd: int) -> int:
    """Bytes of the layer's own base weight as the resident model holds it (replaced by the replay's copy)."""
    d = _Live(rnd)
    if path == "kbit_model":
        _bnb_layer(d, "", m, n, bits, double_quant)
    else:
        d.add("W", m * n * wb)
    return d.level
