"""Token mixers and their primitives (volo_jax/ops): unfold/fold, outlook attention in every
implementation (Pallas included), the CPU kernels, depth-wise conv, halo and window
attention, involution, and what each platform's export contains."""
