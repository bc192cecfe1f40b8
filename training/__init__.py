"""Multi-task LoRA training: data, samplers, gradient surgery, the trainer, evaluation, reports."""
