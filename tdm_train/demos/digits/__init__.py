"""The digits demo: a real class-conditional diffusion teacher trained on scikit-learn's 8x8
digits, a digits classifier for FID and class accuracy, and TDM distillation on the CPU."""
