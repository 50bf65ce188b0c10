"""detsweep: Ray-distributed hyperparameter sweeps for detection fine-tuning."""
__version__ = "0.1.0"
