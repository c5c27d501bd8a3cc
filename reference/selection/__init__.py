"""Data-selection rules: which samples a step trains on and with what weight, one module per
method; a rule that samples takes its random draws as an input."""
