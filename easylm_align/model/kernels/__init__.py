"""CPU kernels in C++ for the steps XLA's CPU backend runs single-threaded: fused attention
(`cpu_attention`, `--llama.attention=cpu_fused`) and the softmax cross entropy with its gradient
(`cpu_cross_entropy`, `--objectives.loss_kernel=cpu_fused`). `native` compiles the `.cc` files
beside it on first use and registers them with XLA."""
