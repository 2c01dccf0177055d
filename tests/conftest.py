import os

# Must be set before any @triton.jit kernel runs, or Triton finds "0 active drivers" on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
