"""Package data: the embedded digits and the digit classifier of gan_fast.eval (see README.md here)."""
