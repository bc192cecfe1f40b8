"""LoRA math and artifacts: PEFT-compatible config, the LoRA layer, file I/O, merge, store."""
