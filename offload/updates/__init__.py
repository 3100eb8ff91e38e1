"""The offloaded optimizer: gradients out per block, fp32 masters + state on the CPU or NVMe, updates on the CPU
overlapped with backward, its checkpoints."""
