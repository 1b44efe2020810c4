"""Code shared by several methods (LoRA plumbing, the first-order client training step); no method of its own."""
