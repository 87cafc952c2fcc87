"""How fast the job trains on a GPU: padding-free batches, fused kernels, TF32 for the fp32 LoRA matmuls,
compiled decoder layers, whether to recompute activations, and checkpoints that keep off the training thread.

- plan.py: which levers a run uses, decided from the device (the GPU's memory, the run's length) unless the user
  sets them, and the one memory model behind that choice and preflight's estimates;
- attention.py: padding-free batches and the attention that keeps each sequence to itself;
- kernels.py: Liger's fused kernels, compiled decoder layers, bitsandbytes' optimizer step without its syncs;
- recompute.py: what the backward pass recomputes (GRADIENT_CHECKPOINTING: whole layers, the attention block, or
  whole layers with their inputs in host memory);
- compile_cache.py: torch.compile's portable caches in the checkpoint store, for later and resumed runs;
- warm.py: a first run's compile done by a helper process while the run checks, loads and trains eagerly;
- snapshot.py: a checkpoint's tensors copied to host memory and written off the training thread.

Everything here is off on the CPU: there the tests hold the job to bit-exact resume and exact reload logits,
and none of these levers exist or pay. docs/PERFORMANCE.md has the measurements behind each default.
"""
