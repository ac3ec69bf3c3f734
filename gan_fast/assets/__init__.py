"""Package data: the embedded digits (see README.md here)."""
