"""Adapters in and out of the Hugging Face world: PEFT LoRA/DoRA, our Hugging Face Aligner
format, PEFT adaption prompt, the official Aligner checkpoints, merged models, the Hub."""
