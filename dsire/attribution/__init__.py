"""Training-data attribution: which private training examples made a fine-tuned model behave as it
does on a query. Source (approximate unrolled differentiation over segments of the recorded SGD
trajectory, with per-segment EK-FAC curvature), the baselines it is compared with (EK-FAC influence
function, TracIn, gradient similarity, random), and the linear datamodeling score (LDS) that judges
them against models retrained on random subsets.
"""
