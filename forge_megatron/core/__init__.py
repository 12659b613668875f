"""The Megatron-free core: rules and their vocabulary, numerics, the step plan, the Triton kernel and
its tiled torch twin, per-weight state, the fused update and the covered-weight object."""
