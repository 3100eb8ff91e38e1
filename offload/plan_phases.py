"""The planner's buffer rules and the phases around training (:mod:`.plan` uses them; the streamer and the
streamed save/merge size their ring and shards with the same functions, so plan and engine agree).

* :func:`ring_slots`: the block streamer's device ring;
* :func:`shard_bytes`: the shard size of a streamed save or merge;
* :func:`phases`: peak host (and device) bytes of the load and save phases of a run whose layers stream.
"""

from __future__ import annotations

from .plan_inputs import PlanRequest

BNB_QUANTIZE_BYTES_PER_VALUE = 20  # bitsandbytes 0.50's CPU quantize_4bit temporaries (backends/default/ops.py)


def shard_bytes(layer_bytes: int) -> int:
    """The shard size of a streamed save: about two decoder layers. Held twice while a shard is written (the
    tensors, and safetensors' serialized copy), so it is bounded by the layer, not the model (``save_pretrained``'s
    default is 50 GB)."""
    return max(2 * layer_bytes, 1 << 20)


def ring_slots(prefetch: int, writeback: bool) -> int:
    """Device slots of the block streamer's ring: the layer computing and ``prefetch`` fetched ahead are the most
    ever bound (a layer is released before the next fetch needs its slot), plus one absorbing a write-back in
    flight (zeroth-order streaming writes each perturbed layer home)."""
    return prefetch + 1 + int(writeback)


def phases(off: PlanRequest, sizes, plan, bd: dict[str, dict[str, int]], streamed: bool
            ) -> dict[str, dict[str, int]]:
    """Peak host (and device) bytes of the phases around training, when the layers stream.

    * ``load`` (``finetune/streamed_load.py``): the resident blocks and, for a cpu home, every layer's home, plus one
      layer in flight: its tensors materialized in the model's dtype one by one (4-bit: held as codes, the tensor
      being quantized cast and run through bitsandbytes' quantize temporaries), the tensor being read twice in the
      checkpoint's dtype (the shard's memory-mapped pages it touched, and the copy), and the packed home buffer.
      Nothing else exists yet (no ring, no optimizer, no activations).
    * ``save`` (a full model, ``finetune/streamed_save.py``): after training, with the offloaded optimizer closed
      (its staging and gradient buffers given back): the resident parameters, the cpu homes and the ring, plus one
      shard of about two layers twice (its tensors and safetensors' serialized copy), the layer being read and its
      read buffer.
    """
    layers = sizes[1:-1]
    if not streamed or not layers:
        return {}
    big = max(layers, key=lambda b: b.param_count)
    largest = max(b.largest_count for b in layers) or big.param_count
    read = 2 * largest * off.checkpoint_value_bytes  # the tensor being read: mapped pages + its copy
    if big.quant_state_bytes:  # 4-bit: the layer is held as codes; the tensor being quantized is cast to model.dtype
        # and goes through bitsandbytes' torch quantize (fp32 copy, |x|, scaled, clamped, int32 codes: ~20 B/value)
        in_flight = 2 * big.stream_bytes + read + largest * (off.value_bytes + BNB_QUANTIZE_BYTES_PER_VALUE)
    else:
        in_flight = big.param_count * off.value_bytes + read + big.stream_bytes
    resident = sum(b.param_bytes for b in (sizes[0], sizes[-1])) + sum(b.quant_state_bytes for b in layers)
    homes = bd["cpu"]["params"]
    on_host = plan.device == "cpu"
    load = {"host": plan.runtime_bytes + homes + (resident + in_flight if on_host else big.stream_bytes),
            "gpu": 0 if on_host else resident + in_flight}
    phases = {"load": load}
    if off.full:
        slot = max(b.stream_bytes for b in layers)
        kept = bd["cpu"]["params"] + ((bd["gpu"]["params"] + bd["gpu"]["buffers"]) if on_host else 0)
        shard = min(shard_bytes(slot), sum(b.param_bytes for b in sizes))  # streamed_save's shard size
        # the shard's tensors and safetensors' serialized copy of them, the layer being read and its read buffer
        phases["save"] = {"host": plan.runtime_bytes + kept + 2 * shard + 2 * slot}
    return phases
