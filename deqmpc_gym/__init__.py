"""deqmpc_gym: Deep Equilibrium Model Predictive Control for Gymnasium."""
__version__ = "0.1.0"
