"""Zoos: LoRA fine-tunes of one base and one recipe, swept over dataset size N."""
