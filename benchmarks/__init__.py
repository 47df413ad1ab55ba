"""Benchmarks of lossmask against TRL and the plain template+tokenizer floor (see benchmarks/README.md)."""
