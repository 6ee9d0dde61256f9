"""The demo: a synthetic world served over loopback HTTP, its teacher CLIP, and the experiment summary."""
