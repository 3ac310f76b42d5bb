"""Triton source of the fused rollout; importing it needs Triton (see `lrnn_lightning.rollout.fused.launch`)."""
