"""Framework integrations (DeepSpeed now). They import the math, never the reverse."""
