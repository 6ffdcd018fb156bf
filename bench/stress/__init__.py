"""Reliability under load (make stress): one scenario a module, run by bench.stress.run."""
