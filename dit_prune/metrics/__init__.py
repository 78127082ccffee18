"""Evaluation: memorization (ratio test and copy detection), Fréchet distance, quality guards."""
