"""Distributed differential privacy under secure aggregation (docs/privacy.md).

- `rotation.py`: the randomized Hadamard rotation (public per-round sign seed) and its inverse;
- `rounding.py`: L2 clipping, scaling and conditional stochastic rounding;
- `noise.py`: discrete Gaussian and Skellam noise shares from a CSPRNG, and their tail bounds;
- `encoding.py`: the round's plan (scale, sensitivity, noise, modulus, wrap probability), a
  device's private integer vector and the server's decoding and check of the sum;
- `accountant.py`: epsilon at delta per round and over the run (dp-accounting).

Pure math, no Flower: `federation.secagg.vector` and `clients/`, `server/` wire it in.
"""
