"""c3l-jax: a JAX / Flax NNX reference implementation of C3L (content-correlated vision-language
instruction-data generation via contrastive learning, IJCAI 2024).

Kept light on purpose: importing `c3l_jax` does not import jax.
"""

__version__ = "0.1.0"
