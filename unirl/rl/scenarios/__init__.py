"""One module per GRPO scenario (DESIGN.md section 2), each exposing ``SCENARIO``; see :mod:`unirl.rl.scenario`."""
