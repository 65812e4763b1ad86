"""The fine-tuning lab: the substrate that the privacy, attribution and unlearning analyses share.

Tasks with public/private/test splits, backbones pretrained on the public split, fine-tuning
methods, many small models trained at once, and one training record per model.
"""
