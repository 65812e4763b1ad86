"""Exact unlearning with per-cluster adapters (LMEraser): forget an example by retraining only its cluster."""
