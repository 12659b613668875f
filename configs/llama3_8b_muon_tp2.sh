# Llama-3 8B on two GPUs with Muon (--optimizer muon): configs/llama3_8b_tp2.sh's model, layout and
# batch, the dense layers' linear weights trained with Muon (Megatron's defaults: momentum 0.9,
# 5 quintic Newton-Schulz steps, spectral scale, split QKV, blockwise tensor parallelism) and the
# output layer and the rest with Adam, as Megatron's Muon does. FORGE keeps Muon's momentum in bf16
# (its int8 states are for element-wise rules; docs/megatron.md "Muon").
source "$(dirname "${BASH_SOURCE[0]}")/llama3_8b_tp2.sh"
LLAMA3_8B_MUON_TP2_ARGS=(
    "${LLAMA3_8B_TP2_ARGS[@]}"
    --optimizer muon --forge-state-dtype bf16
)
